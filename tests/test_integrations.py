"""OpenRLHF, verl and TRL calling a real tokenrm server: each trainer's own code, in its own venv
(`make trainer-venvs`: the trainer's package from the registry plus tokenrm's light client),
against `tokenrm serve` on 127.0.0.1 from this venv. Expected values come from POST /score.

Without the venvs these tests are skipped, unless TOKENRM_TRAINER_VENVS is set (as `make test`
sets it after building them), when a missing venv fails."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tokenrm.core.spans import decoded_with_offsets
from tokenrm.server.launcher import Running, free_port, serve
from tokenrm.training import synth
from tokenrm.training.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "trainers"
TIMEOUT_S = 600


def venv_python(trainer: str) -> Path:
    python = ROOT / f".venv-{trainer}" / "bin" / "python"
    if not python.exists():
        if os.environ.get("TOKENRM_TRAINER_VENVS"):
            pytest.fail(f"{python} is missing: `make trainer-venvs` builds it")
        pytest.skip(f"no {trainer} venv (`make trainer-venvs`)")
    return python


def launch_in(trainer: str, script: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv_python(trainer)), str(SCRIPTS / script), *args],
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def run_in(trainer: str, script: str, *args: str, env: dict[str, str] | None = None) -> Any:
    done = launch_in(trainer, script, *args, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Running]:
    with serve(tiny_checkpoint) as running:
        yield running


def score(server: Running, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r = httpx.post(f"{server.url}/score", json={"items": items}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def policy(path: Path, tokenizer: Any) -> Path:
    """A tiny random causal LM with `tokenizer`, saved as a Hugging Face directory."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def same_policy(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy on the reward model's own tokenizer: token ids are sent."""
    return policy(tmp_path_factory.mktemp("same") / "policy",
                  AutoTokenizer.from_pretrained(tiny_checkpoint))


@pytest.fixture(scope="module")
def other_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy with a tokenizer of its own: text and spans are sent."""
    texts = [t for p in synth.generate(11, 200) for t in (p.prompt, p.edited)]
    return policy(tmp_path_factory.mktemp("other") / "policy",
                  train_tokenizer(texts, vocab_size=300))


def prompts_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([p.prompt for p in synth.generate(21, n)]))
    return path


# ---------------------------------------------------------------- verl


def expected_dense(server: Running, tok: Any, prompt_ids: list[int], response_ids: list[int],
                   width: int, by_ids: bool) -> np.ndarray:
    """What a row of the dense tensor must hold, from POST /score: the ids item's rewards, or
    the text item's span rewards on the policy tokens with characters; 0 elsewhere."""
    out = np.zeros(width, dtype=np.float32)
    ids = response_ids[:-1] if response_ids and response_ids[-1] == tok.eos_token_id \
        else response_ids
    if not ids:
        return out
    if by_ids:
        [result] = score(server, [{"prompt_ids": prompt_ids, "response_ids": ids}])
        out[:len(ids)] = result["rewards"]
        return out
    text, offsets = decoded_with_offsets(tok, ids)
    kept = [t for t, (a, b) in enumerate(offsets) if a < b]
    [result] = score(server, [{"prompt": tok.decode(prompt_ids, skip_special_tokens=False),
                               "response": text, "spans": [offsets[t] for t in kept]}])
    out[kept] = result["span_rewards"]
    assert float(out.sum()) == pytest.approx(result["total"], abs=1e-4)  # nothing lost
    return out


@pytest.mark.parametrize("tokenizers", ["same", "different"])
def test_verl_reward_manager_gives_the_dense_rewards_of_score(
        server: Running, same_policy: Path, other_policy: Path, tmp_path: Path,
        tokenizers: str) -> None:
    policy_dir = same_policy if tokenizers == "same" else other_policy
    out = run_in("verl", "run_verl.py", str(policy_dir), str(prompts_file(tmp_path, 4)),
                 env={"TOKENRM_URL": f"grpc://{server.grpc_target}"})
    assert out["manager"] == "TokenRMRewardManager"
    tok = AutoTokenizer.from_pretrained(policy_dir)
    mask = np.array(out["attention_mask"], dtype=bool)                   # (B, P + R)
    width = len(out["prompts"][0])
    for i, prompt in enumerate(out["prompts"]):
        prompt_ids = np.array(prompt)[mask[i, :width]].tolist()
        response_ids = np.array(out["responses"][i])[mask[i, width:]].tolist()
        want = expected_dense(server, tok, prompt_ids, response_ids, len(mask[i]) - width,
                              by_ids=tokenizers == "same")
        for interface in ("legacy", "current"):
            np.testing.assert_allclose(out[interface][i], want, atol=1e-5, err_msg=interface)
        assert not np.any(np.array(out["legacy"][i])[~mask[i, width:]])  # padding stays 0
        last = np.zeros_like(want)  # TOKENRM_DENSE=0: the total on the last response token
        if mask[i, width:].any():
            last[int(mask[i, width:].sum()) - 1] = want.sum()
        np.testing.assert_allclose(out["totals_only"][i], last, atol=1e-4)
        assert out["current_extra"][i]["tokenrm_total"] == pytest.approx(float(want.sum()),
                                                                         abs=1e-4)
    assert out["legacy_extra"]["tokenrm_total"] == pytest.approx(
        [e["tokenrm_total"] for e in out["current_extra"]], abs=1e-6)


# ---------------------------------------------------------------- TRL


def test_trl_grpo_trains_on_tokenrm_rewards(server: Running, same_policy: Path,
                                            tmp_path: Path) -> None:
    out = run_in("trl", "run_trl.py", str(same_policy), str(prompts_file(tmp_path, 4)),
                 str(tmp_path / "trl"), env={"TOKENRM_URL": server.url})
    assert out["name"] == "tokenrm" and len(out["calls"]) >= 2
    tok = AutoTokenizer.from_pretrained(same_policy)
    for call in out["calls"]:
        for prompt, ids, reward in zip(call["prompts"], call["completion_ids"], call["rewards"],
                                       strict=True):
            kept = ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids
            want = score(server, [{"prompt_ids": tok(prompt)["input_ids"],  # as TRL encodes
                                   "response_ids": kept}])[0]["total"] if kept else 0.0
            assert reward == pytest.approx(want, abs=1e-4)
    means = [float(np.mean(c["rewards"])) for c in out["calls"]]
    assert out["logged_means"] == pytest.approx(means[:len(out["logged_means"])], abs=1e-4)


# ---------------------------------------------------------------- OpenRLHF


def openrlhf_cases(n: int) -> list[dict[str, str]]:
    cases = []
    for i, pair in enumerate(synth.generate(31, n)):
        response = (pair.rejected if i % 2 else pair.edited) + "</s>"
        prompt = pair.prompt
        query = (prompt[30:] if i % 4 == 3 else prompt) + response  # some cut from the left
        cases.append({"query": query, "prompt": prompt,
                      "scored_prompt": prompt[30:] if i % 4 == 3 else prompt,
                      "response": response})
    return cases


@pytest.mark.parametrize("remote", ["get_reward", "reward_func"])
def test_openrlhf_own_client_gets_the_totals_of_score(server: Running, tmp_path: Path,
                                                      remote: str) -> None:
    cases = openrlhf_cases(32)
    bad = {"query": "Something else entirely, not the prompt at all.",
           "prompt": cases[0]["prompt"]}
    (tmp_path / "cases.json").write_text(json.dumps([*cases, bad]))
    url = f"{server.url}/get_reward" if remote == "get_reward" else \
        str(ROOT / "integrations" / "openrlhf.py")
    out = run_in("openrlhf", "run_openrlhf.py", url, str(tmp_path / "cases.json"),
                 env={"TOKENRM_URL": f"grpc://{server.grpc_target}"})
    want = score(server, [{"prompt": c["scored_prompt"], "response": c["response"]}
                          for c in cases])
    for case, got, expected in zip(cases, out, want, strict=False):
        assert "answer" in got, (case, got)
        assert got["answer"]["rewards"] == pytest.approx([expected["total"]], abs=1e-4)
        assert got["answer"]["scores"] == got["answer"]["rewards"]
        assert got["answer"]["extra_logs"]["tokenrm_response_tokens"] == \
            [len(expected["rewards"])]
    # A query without its prompt: the reward function says why at once; OpenRLHF's HTTP client
    # gives up after its 5 tries on the 422 (the answer's body is tested in test_get_reward.py).
    assert "error" in out[-1], out[-1]
    if remote == "reward_func":
        assert "does not hold" in out[-1]["error"], out[-1]
    else:
        assert "Request error for 5 times" in out[-1]["error"], out[-1]


# ---------------------------------------------------------------- no server there


def test_every_trainer_gets_a_clear_error_from_a_stopped_server(same_policy: Path,
                                                               tmp_path: Path) -> None:
    """A port nothing listens on: each trainer's call fails within its retry budget (here a
    3 s deadline for tokenrm's client; OpenRLHF's own client: 5 tries 1 s apart), naming it."""
    dead = f"127.0.0.1:{free_port()}"
    env = {"TOKENRM_URL": f"grpc://{dead}", "TOKENRM_TIMEOUT_S": "3"}
    prompts = str(prompts_file(tmp_path, 2))
    for trainer, script, args in (("verl", "run_verl.py", (str(same_policy), prompts)),
                                  ("trl", "run_trl.py", (str(same_policy), prompts,
                                                         str(tmp_path / "trl")))):
        done = launch_in(trainer, script, *args, env=env)
        assert done.returncode != 0, (trainer, done.stdout[-2000:])
        assert dead in done.stderr, (trainer, done.stderr[-3000:])
    (tmp_path / "cases.json").write_text(json.dumps(openrlhf_cases(1)))
    for url in (f"http://{dead}/get_reward", str(ROOT / "integrations" / "openrlhf.py")):
        [got] = run_in("openrlhf", "run_openrlhf.py", url, str(tmp_path / "cases.json"),
                       env=env)
        assert "error" in got and got["seconds"] < 30, got
