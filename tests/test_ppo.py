"""Fine-grained PPO against real `tokenrm serve` processes on 127.0.0.1: the CLI smoke run and its
resume, a run on a prompt file with no judge, HTTP by URL, token ids and text with spans giving
the same rewards, a server killed and restarted mid-run, an overloaded server, bad answers that
stop the run, and the small helpers.

Every run uses the same tiny SFT policy and seeds, so each one is compared with one uninterrupted
reference run: the same iterations must give the same rewards, KL and response lengths (a lost,
repeated or misplaced rollout would change them)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.faulty_proxy import FaultyProxy
from tokenrm.client import Item, ResultError, RewardClient
from tokenrm.core.spans import decoded_with_offsets
from tokenrm.core.tokenizer import fingerprint
from tokenrm.server.launcher import Running, free_port, serve, start, stop
from tokenrm.training import synth
from tokenrm.training.ppo.oracle import OracleJudge, Verdict, preference, verdict
from tokenrm.training.ppo.policy import Policy
from tokenrm.training.ppo.prompts import FilePrompts, SyntheticPrompts
from tokenrm.training.ppo.rewards import RewardSource, Send
from tokenrm.training.ppo.rollout import Sampling
from tokenrm.training.ppo.run import Connection, PPOError, run_ppo
from tokenrm.training.ppo.run_dir import open_run, trim_log
from tokenrm.training.ppo.trainer import CHECKPOINT, CONFIG, LOG, PPOConfig
from tokenrm.training.tokenizer import train_tokenizer

TIMEOUT = 120.0  # generous: the machine may be busy with other work
SMALL = PPOConfig(iterations=2, prompts_per_iteration=4, samples_per_prompt=2, generation_batch=4,
                  sampling=Sampling(max_new_tokens=24), epochs=1, minibatch=4, save_every=1)
ROLLOUTS = SMALL.rollouts_per_iteration  # 8
REFERENCE_ITERATIONS = 6
ISSUE_KEYS = ("rm_reward", "kl", "entropy", "clip_fraction", "value_loss", "oracle_error_rate",
              "reward_wait_share")
ORACLE_KEYS = ("oracle_error_rate", "oracle_errors", "oracle_answered")
OWN_PROMPTS = ("Where does Ana live?", "Tell me about Oslo.", "Say something kind.",
               "What is 2 + 3?", "Describe a cat for me.")


def config(**changes: Any) -> PPOConfig:
    return replace(SMALL, **changes)


def connect(url: str, send: Send = "auto") -> Connection:
    return Connection([url], send=send, timeout_s=TIMEOUT)


def read_log(out: Path) -> list[dict[str, Any]]:
    path = out / LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def logged(out: Path) -> int:
    """Complete lines in the log (safe to call while the run writes it)."""
    path = out / LOG
    return path.read_text().count("\n") if path.exists() else 0


def saved_iteration(out: Path) -> int:
    state = torch.load(out / CHECKPOINT / "trainer.pt", weights_only=True)
    return int(state["iteration"])


def assert_same_training(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """The same iterations with the same rollouts: equal rewards, KL, lengths and oracle scores
    (up to float rounding in other server batch shapes)."""
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["rollouts"] == w["rollouts"]
        for key in ("response_tokens", "oracle_errors", "oracle_error_rate"):
            assert g[key] == w[key], (g["iteration"], key)
        for key in ("rm_reward", "kl", "value_loss", "entropy"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), (g["iteration"], key)


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer(policy_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(policy_dir)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Running]:
    with serve(tiny_checkpoint) as running:
        yield running


@pytest.fixture(scope="module")
def reference(server: Running, policy_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The log of an uninterrupted run over gRPC: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer = run_ppo(out, config(iterations=REFERENCE_ITERATIONS),
                      connect(f"grpc://{server.grpc_target}"), policy_dir, progress=False)
    assert trainer.iteration == REFERENCE_ITERATIONS
    records = read_log(out)
    assert [r["iteration"] for r in records] == list(range(1, REFERENCE_ITERATIONS + 1))
    return records


# ---------------------------------------------------------------- 1. the CI smoke run (CLI)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenrm.cli.main", "ppo", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_cli_smoke_two_iterations_against_a_real_server_then_resume(
        server: Running, policy_dir: Path, reference: list[dict[str, Any]],
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--out", str(out), "--server", f"grpc://{server.grpc_target}", "--no-progress"]
    started = time.monotonic()
    done = _cli(*common, "--policy", str(policy_dir), "--iterations", "2", "--prompts", "4",
                "--samples", "2", "--generation-batch", "4", "--max-new-tokens", "24",
                "--epochs", "1", "--minibatch", "4")
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    assert seconds <= 120, seconds  # the issue's budget for this run
    assert "2 iterations" in done.stdout
    records = read_log(out)
    assert [r["iteration"] for r in records] == [1, 2]
    assert [r["rollouts"] for r in records] == [ROLLOUTS, 2 * ROLLOUTS]
    for record in records:
        assert set(ISSUE_KEYS) <= record.keys(), record.keys()
        for key, value in record.items():
            assert isinstance(value, int | float) and math.isfinite(value), (key, value)
        assert 0.0 <= record["oracle_error_rate"] <= 1.0
        assert 0.0 <= record["reward_wait_share"] <= 1.0
        assert 0.0 <= record["clip_fraction"] <= 1.0
        assert record["entropy"] > 0.0
    assert_same_training(records, reference[:2])  # the CLI's settings are the ones above
    assert json.loads((out / CONFIG).read_text())["policy"] == str(policy_dir)

    trained, start = Policy.load(out / CHECKPOINT), Policy.load(policy_dir)
    assert saved_iteration(out) == 2
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT, CONFIG, LOG]  # no staging
    assert trained.tokenizer.get_vocab() == start.tokenizer.get_vocab()
    assert any(not torch.equal(a, b) for a, b in
               zip(trained.lm.parameters(), start.lm.parameters(), strict=True)), "not trained"
    assert trained.value_head.weight.abs().sum() > 0  # the value head was trained and saved

    done = _cli(*common, "--resume", "--iterations", "3")
    assert done.returncode == 0, done.stderr[-4000:]
    records = read_log(out)
    assert [r["iteration"] for r in records] == [1, 2, 3]  # no duplicates
    assert [r["rollouts"] for r in records] == [ROLLOUTS, 2 * ROLLOUTS, 3 * ROLLOUTS]
    assert saved_iteration(out) == 3
    # The resumed iteration is the one an uninterrupted run makes.
    assert_same_training(records, reference[:3])


class Crash(Exception):
    """Stands for the trainer's process dying between two checkpoints."""


def test_a_crash_between_checkpoints_resumes_without_counting_an_iteration_twice(
        server: Running, policy_dir: Path, reference: list[dict[str, Any]],
        tmp_path: Path) -> None:
    out = tmp_path / "run"

    def crash_after_the_third(record: dict[str, Any]) -> None:
        if record["iteration"] == 3:  # logged, but the last checkpoint holds 2
            raise Crash

    with RewardClient(f"grpc://{server.grpc_target}", timeout_s=TIMEOUT) as client:
        trainer = open_run(out, config(iterations=4, save_every=2), policy_dir,
                           lambda p: RewardSource(client, p.tokenizer), resume=False,
                           prompts=SyntheticPrompts(SMALL.prompt_seed), judge=OracleJudge())
        with pytest.raises(Crash):
            trainer.run(crash_after_the_third)
    assert [r["iteration"] for r in read_log(out)] == [1, 2, 3]
    assert saved_iteration(out) == 2

    run_ppo(out, config(iterations=4), connect(f"grpc://{server.grpc_target}"), None,
            resume=True, progress=False)
    records = read_log(out)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]  # iteration 3 once, redone
    assert_same_training(records, reference[:4])
    assert saved_iteration(out) == 4


# ---------------------------------------------------------------- 1b. own prompts, no judge


def test_without_a_judge_the_log_has_no_oracle_fields_and_training_is_the_same(
        server: Running, policy_dir: Path, reference: list[dict[str, Any]],
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RewardClient(f"grpc://{server.grpc_target}", timeout_s=TIMEOUT) as client:
        trainer = open_run(out, config(iterations=1), policy_dir,
                           lambda p: RewardSource(client, p.tokenizer), resume=False,
                           prompts=SyntheticPrompts(SMALL.prompt_seed), judge=None)
        trainer.run()
    [record] = read_log(out)
    assert record.keys() == reference[0].keys() - set(ORACLE_KEYS)
    assert {"rm_reward", "kl", "response_tokens"} <= record.keys()
    # The judge only watches: without it the same rollouts and update.
    assert record["response_tokens"] == reference[0]["response_tokens"]
    for key in ("rm_reward", "kl", "value_loss", "entropy"):
        assert record[key] == pytest.approx(reference[0][key], rel=1e-4, abs=1e-5), key


def test_cli_trains_on_a_prompt_file_then_resumes_it_and_refuses_when_it_is_gone(
        server: Running, policy_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in OWN_PROMPTS))
    out = tmp_path / "run"
    common = ["--out", str(out), "--server", f"grpc://{server.grpc_target}", "--no-progress"]
    done = _cli(*common, "--prompt-file", str(prompts), "--policy", str(policy_dir),
                "--iterations", "1", "--prompts", "4", "--samples", "2",
                "--generation-batch", "4", "--max-new-tokens", "24", "--epochs", "1",
                "--minibatch", "4")
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / CONFIG).read_text())["prompts"] == \
        FilePrompts.load(prompts, SMALL.prompt_seed).spec()
    done = _cli(*common, "--resume", "--iterations", "2")  # the file, from config.json
    assert done.returncode == 0, done.stderr[-4000:]
    records = read_log(out)
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:
        assert not set(ORACLE_KEYS) & record.keys(), record.keys()
        assert record["response_tokens"] > 0
        for key, value in record.items():
            assert isinstance(value, int | float) and math.isfinite(value), (key, value)

    # An uninterrupted run on the same file: the resumed iteration saw the same prompts.
    with RewardClient(f"grpc://{server.grpc_target}", timeout_s=TIMEOUT) as client:
        open_run(tmp_path / "whole", config(iterations=2), policy_dir,
                 lambda p: RewardSource(client, p.tokenizer), resume=False,
                 prompts=FilePrompts.load(prompts, SMALL.prompt_seed)).run()
    whole = read_log(tmp_path / "whole")
    assert [r["response_tokens"] for r in records] == [r["response_tokens"] for r in whole]
    assert [r["rm_reward"] for r in records] == pytest.approx([r["rm_reward"] for r in whole],
                                                              rel=1e-4, abs=1e-5)

    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "Something else?"}\n')
    done = _cli(*common, "--resume", "--iterations", "3", "--prompt-file", str(other))
    assert done.returncode == 1 and "--resume goes on with the run's own prompts" in done.stderr
    prompts.unlink()
    done = _cli(*common, "--resume", "--iterations", "3")
    assert done.returncode == 1, done.stderr[-4000:]
    assert done.stderr.strip() == (f"tokenrm ppo: {prompts}: the run's prompt file (named in "
                                   "its config.json) is gone; put it back to resume the run")
    assert [r["iteration"] for r in read_log(out)] == [1, 2]


def test_cli_with_a_missing_prompt_file_says_so_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    done = _cli("--out", str(tmp_path / "run"), "--prompt-file", str(missing))
    assert done.returncode == 2, done.stderr[-4000:]
    assert done.stderr.strip() == \
        f"tokenrm ppo: error: argument --prompt-file: {missing}: no such file"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 2. HTTP by URL


def test_a_run_over_http_by_url_sends_token_ids(server: Running, policy_dir: Path,
                                               tokenizer: PreTrainedTokenizerBase,
                                               reference: list[dict[str, Any]],
                                               tmp_path: Path) -> None:
    with RewardClient(server.url, timeout_s=TIMEOUT) as client:
        assert client.model_info().tokenizer_sha256 == fingerprint(tokenizer)
        assert RewardSource(client, tokenizer).sends_ids
    trainer = run_ppo(tmp_path / "run", config(iterations=1), connect(server.url), policy_dir,
                      progress=False)
    assert trainer.rewards.sends_ids
    assert_same_training(read_log(tmp_path / "run"), reference[:1])
    assert saved_iteration(tmp_path / "run") == 1


# ---------------------------------------------------------------- 3. ids and text agree


def _canonical(tok: PreTrainedTokenizerBase, n: int = 4
               ) -> tuple[list[str], list[list[int]], list[list[int]], list[str]]:
    """Prompts, their ids, and the canonical tokenization (+ EOS) of real synthetic responses."""
    prompts, prompt_ids, responses, texts = [], [], [], []
    for pair in synth.generate(31, n):
        for text in (pair.rejected, pair.edited):
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            assert tok.decode(ids) == text  # the text the server will tokenize again
            prompts.append(pair.prompt)
            prompt_ids.append(list(tok(pair.prompt)["input_ids"]))
            responses.append([*ids, tok.eos_token_id])
            texts.append(text)
    return prompts, prompt_ids, responses, texts


@pytest.fixture(scope="module")
def ids_and_text(server: Running, tokenizer: PreTrainedTokenizerBase
                 ) -> tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]:
    """(responses, rewards sent as ids, rewards sent as text with spans) for the canonical
    tokenizations of real synthetic responses, on one client; checks what both share."""
    prompts, prompt_ids, responses, _ = _canonical(tokenizer)
    with RewardClient(f"grpc://{server.grpc_target}", timeout_s=TIMEOUT) as client:
        by_ids = RewardSource(client, tokenizer, "ids")
        by_text = RewardSource(client, tokenizer, "text")
        assert by_ids.sends_ids and not by_text.sends_ids
        ids_out = by_ids.submit(prompts, prompt_ids, responses).result(TIMEOUT)
        text_out = by_text.submit(prompts, prompt_ids, responses).result(TIMEOUT)
        direct = client.score([Item.tokens(p, r[:-1])
                               for p, r in zip(prompt_ids, responses, strict=True)])
    assert len(ids_out) == len(text_out) == len(responses)
    for response, a, b, d in zip(responses, ids_out, text_out, direct, strict=True):
        assert len(a) == len(b) == len(response)
        assert a[-1] == 0.0 and b[-1] == 0.0  # EOS: the reward model never sees it
        np.testing.assert_array_equal(a[:-1], d.rewards)  # what the server gives for the ids
        assert np.abs(a).max() > 0  # real rewards, not zeros that agree trivially
        assert float(b.sum()) == pytest.approx(float(a.sum()), abs=1e-4)  # totals are kept
    return responses, ids_out, text_out


def _has_a_space_token(tok: PreTrainedTokenizerBase, response: list[int]) -> bool:
    """Whether a token of the response is whitespace alone (the tiny vocabulary has few merges:
    " miner" is " " + "m" + "in" + "er")."""
    return any(not tok.decode([t]).strip() for t in response[:-1])


def test_token_ids_and_text_with_spans_give_the_same_rewards(
        tokenizer: PreTrainedTokenizerBase,
        ids_and_text: tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]) -> None:
    responses, ids_out, text_out = ids_and_text
    checked = 0
    for response, a, b in zip(responses, ids_out, text_out, strict=True):
        if not _has_a_space_token(tokenizer, response):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
            checked += 1
    assert checked >= 2, checked


def test_token_ids_and_text_agree_on_whitespace_only_tokens(  # trimmed, empty offsets
        tokenizer: PreTrainedTokenizerBase,
        ids_and_text: tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]) -> None:
    responses, ids_out, text_out = ids_and_text
    spaced = [(a, b) for r, a, b in zip(responses, ids_out, text_out, strict=True)
              if _has_a_space_token(tokenizer, r)]
    assert spaced  # the tiny vocabulary makes some: this test is not vacuous
    for a, b in spaced:
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_a_foreign_tokenizer_cannot_send_ids_and_auto_sends_text(
        server: Running, tokenizer: PreTrainedTokenizerBase) -> None:
    texts = [t for p in synth.generate(77, 100) for t in (p.prompt, p.rejected)]
    foreign = train_tokenizer(texts, vocab_size=320)
    assert fingerprint(foreign) != fingerprint(tokenizer)
    prompts, _, native_responses, response_texts = _canonical(tokenizer)
    foreign_responses = [[*foreign(t, add_special_tokens=False)["input_ids"], foreign.eos_token_id]
                         for t in response_texts]
    assert foreign_responses != native_responses  # really another tokenization
    foreign_prompt_ids = [list(foreign(p)["input_ids"]) for p in prompts]
    with RewardClient(server.url, timeout_s=TIMEOUT) as client:
        with pytest.raises(ValueError, match="not the policy's"):
            RewardSource(client, foreign, "ids")
        auto = RewardSource(client, foreign, "auto")
        assert not auto.sends_ids
        got = auto.submit(prompts, foreign_prompt_ids, foreign_responses).result(TIMEOUT)
        native = RewardSource(client, tokenizer, "ids").submit(
            prompts, [list(tokenizer(p)["input_ids"]) for p in prompts],
            native_responses).result(TIMEOUT)
    for response, g, n in zip(foreign_responses, got, native, strict=True):
        assert len(g) == len(response) and g[-1] == 0.0
        # The server moves its rewards onto the foreign tokens: the response total is kept.
        assert float(g.sum()) == pytest.approx(float(n.sum()), abs=1e-4)


# ---------------------------------------------------------------- 4. server killed mid-run


def test_a_server_killed_and_restarted_mid_run_loses_no_rollout(
        tiny_checkpoint: Path, policy_dir: Path, reference: list[dict[str, Any]],
        tmp_path: Path) -> None:
    port, grpc_port = free_port(), free_port()
    out = tmp_path / "run"
    proc = start(tiny_checkpoint, port, grpc_port)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            run_ppo(out, config(iterations=REFERENCE_ITERATIONS),
                    connect(f"grpc://127.0.0.1:{grpc_port}"), policy_dir, progress=False)
        except BaseException as exc:  # reported by the test thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="ppo-run", daemon=True)
    try:
        thread.start()
        wait_until(lambda: logged(out) >= 1 or not thread.is_alive())
        proc.kill()
        proc.wait(timeout=30)
        logged_at_kill = logged(out)
        assert thread.is_alive() and not failure, failure
        time.sleep(1.5)
        proc = start(tiny_checkpoint, port, grpc_port)
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the run did not finish after the restart"
        assert not failure, failure
    finally:
        stop(proc)
    # At least two iterations were scored by the restarted server alone.
    assert logged_at_kill <= REFERENCE_ITERATIONS - 2, logged_at_kill
    records = read_log(out)
    assert [r["iteration"] for r in records] == list(range(1, REFERENCE_ITERATIONS + 1))
    assert [r["rollouts"] for r in records] == [ROLLOUTS * i for i in range(1, 7)]
    assert_same_training(records, reference)
    assert saved_iteration(out) == REFERENCE_ITERATIONS


# ---------------------------------------------------------------- 5. an overloaded server


@pytest.mark.parametrize("status", [429, 503])
def test_refused_requests_are_retried_and_the_run_completes(
        server: Running, policy_dir: Path, reference: list[dict[str, Any]], tmp_path: Path,
        status: int) -> None:
    with FaultyProxy(server.url, lifetime_s=TIMEOUT) as proxy:
        proxy.refuse(3, status, retry_after="0.2")
        run_ppo(tmp_path / "run", config(iterations=2), connect(proxy.url), policy_dir,
                progress=False)
        requests = proxy.score_requests
    assert_same_training(read_log(tmp_path / "run"), reference[:2])
    # 2 iterations x 2 generation batches of 4 rollouts: one scoring call each, one request
    # each when answered, plus the 3 refused ones.
    assert requests == 4 + 3, requests


# ---------------------------------------------------------------- 6. bad answers stop the run


BAD = {"nan": "non-finite rewards", "drop": "rewards for"}


@pytest.mark.parametrize("how", sorted(BAD))
def test_a_bad_answer_stops_the_run_before_training_on_it(
        server: Running, policy_dir: Path, tmp_path: Path, how: str) -> None:
    out = tmp_path / "run"
    with FaultyProxy(server.url, lifetime_s=TIMEOUT) as proxy:
        proxy.tamper(how)
        with pytest.raises(PPOError) as stopped:
            run_ppo(out, config(iterations=2), connect(proxy.url), policy_dir, progress=False)
    message = str(stopped.value)
    assert "stopped at iteration 1: the reward server's answer cannot be used" in message, \
        message
    assert "ResultError" in message and BAD[how] in message, message
    assert isinstance(stopped.value.__cause__, ResultError)
    assert read_log(out) == []  # the failed iteration was not logged
    assert saved_iteration(out) == 0  # the untrained start, so that --resume can go on
    run_ppo(out, config(iterations=2), connect(server.url), None, resume=True, progress=False)
    assert [r["iteration"] for r in read_log(out)] == [1, 2]


def test_a_bad_answer_mid_run_keeps_the_finished_iterations_and_resume_goes_on(
        server: Running, policy_dir: Path, reference: list[dict[str, Any]],
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    with FaultyProxy(server.url, lifetime_s=TIMEOUT) as proxy:
        # Iteration 1 is answered well, then every answer is bad. save_every=10: iteration 1 is
        # only saved because the run stops.
        with RewardClient(proxy.url, timeout_s=TIMEOUT) as client:
            trainer = open_run(out, config(iterations=2, save_every=10), policy_dir,
                               lambda p: RewardSource(client, p.tokenizer), resume=False,
                               prompts=SyntheticPrompts(SMALL.prompt_seed),
                               judge=OracleJudge())
            with pytest.raises(ResultError, match="non-finite rewards"):
                trainer.run(lambda record: proxy.tamper("nan"))
        assert trainer.iteration == 1
        assert [r["iteration"] for r in read_log(out)] == [1]
        assert saved_iteration(out) == 1

        # Resumed while the answers are still bad (one reward short): stops again, keeps 1.
        proxy.tamper("drop")
        with pytest.raises(PPOError, match=r"stopped at iteration 2: .* cannot be used") as err:
            run_ppo(out, config(iterations=2), connect(proxy.url), None, resume=True,
                    progress=False)
        assert "holds the run after iteration 1" in str(err.value)
        assert "rewards for" in str(err.value)  # the one short
        assert [r["iteration"] for r in read_log(out)] == [1]
        assert saved_iteration(out) == 1

        # Good answers again: the run goes on as if nothing had happened.
        proxy.tamper(None)
        run_ppo(out, config(iterations=2), connect(proxy.url), None, resume=True,
                progress=False)
    assert_same_training(read_log(out), reference[:2])
    assert saved_iteration(out) == 2


# ---------------------------------------------------------------- 7. small units


def test_training_prompts_depend_on_the_seed_and_iteration_alone() -> None:
    first = SyntheticPrompts(3).prompts(0, 6)
    assert first == SyntheticPrompts(3).prompts(0, 6)
    assert len(first) == 6
    assert SyntheticPrompts(3).prompts(1, 6) != first
    assert SyntheticPrompts(4).prompts(0, 6) != first
    for prompt in first:
        synth.parse_prompt(prompt)  # a prompt of the task: raises otherwise


def test_trim_log_keeps_the_iterations_a_checkpoint_holds(tmp_path: Path) -> None:
    path = tmp_path / LOG
    trim_log(path, 3)  # no log yet: nothing to do
    assert not path.exists()
    path.write_text("".join(json.dumps({"iteration": i, "rm_reward": -i}) + "\n"
                            for i in (1, 2, 3, 4, 5)))
    trim_log(path, 3)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3]
    trim_log(path, 5)  # keeps what is there
    assert len(path.read_text().splitlines()) == 3
    trim_log(path, 0)
    assert path.read_text() == ""


def test_decoded_with_offsets_tiles_the_decoded_text(tokenizer: PreTrainedTokenizerBase) -> None:
    pair = next(synth.generate(41, 1))
    for text in (pair.rejected, "Ana lives in Lima. Oslo.", "Köln Łódź"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded, offsets = decoded_with_offsets(tokenizer, ids)
        assert decoded == tokenizer.decode(ids) == text
        assert len(offsets) == len(ids)
        assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
        for (_, end), (next_start, _) in pairwise(offsets):
            assert next_start == end  # contiguous, no gaps, no overlaps
        if text.isascii():  # every token has its own characters
            for token, (a, b) in zip(ids, offsets, strict=True):
                assert a < b and text[a:b] == tokenizer.decode([token])


def test_the_oracle_prefers_answers_then_fewer_errors() -> None:
    for pair in synth.generate(42, 20):
        edited, rejected = verdict(pair.prompt, pair.edited), verdict(pair.prompt, pair.rejected)
        assert edited.errors == 0 and edited.answered, pair.edited
        assert rejected.errors >= max(1, len(pair.errors)), pair.rejected
        assert preference(edited, rejected) == 1.0 and preference(rejected, edited) == 0.0
        silent = verdict(pair.prompt, "")
        assert silent == Verdict(0, 0) and not silent.answered
        # Saying nothing never beats an answer, however many errors the answer has; it only
        # beats a non-answer, which has errors.
        assert preference(silent, rejected) == (0.0 if rejected.answered else 1.0)
        assert preference(edited, edited) == 0.5
    assert preference(Verdict(errors=1, facts=3), Verdict(errors=2, facts=1)) == 1.0
    assert preference(Verdict(errors=0, facts=0), Verdict(errors=3, facts=0)) == 1.0
