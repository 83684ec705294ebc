"""Prompt-prefix reuse (server/prefix.py, batching.pick_shared_batch / reuse_saves): rows that
share a prompt compute it once and get the full forward's rewards; encoders are left alone."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import (
    BertConfig,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.app import create_app
from tokenrm.server.batching import (
    ReusePlan,
    length_groups,
    pick_shared_batch,
    plan_reuse,
    prompt_groups,
)
from tokenrm.server.launcher import serve
from tokenrm.server.model import RewardModel
from tokenrm.server.settings import Settings

THREE = {0: "negative", 1: "neutral", 2: "positive"}


def _llama(path: Path, tokenizer, cls=LlamaForTokenClassification, labels: int = 3) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64,
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         num_labels=labels, **({"id2label": THREE} if labels == 3 else {}))
    cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rows(vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Three prompts of unlike lengths with 1-4 responses each, interleaved."""
    rng = random.Random(seed)
    rows = []
    for prompt_len, lengths in ((23, (5, 40, 1, 12)), (2, (9, 3)), (61, (17,)), (7, (30, 30))):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        rows += [(prompt + [rng.randrange(3, vocab) for _ in range(n)], n) for n in lengths]
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("cls", [LlamaForTokenClassification, LlamaForSequenceClassification])
def test_shared_prompts_give_the_full_forwards_rewards(tmp_path: Path, tokenizer, cls) -> None:
    labels = 3 if cls is LlamaForTokenClassification else 1
    rm = RewardModel.load(_llama(tmp_path / "rm", tokenizer, cls, labels), dtype="float32")
    assert rm.info.prefix_reuse
    rows = _rows(rm.info.vocab_size)
    full = rm.score(rows)
    groups = prompt_groups(rows)
    one_pass_each = ReusePlan(groups, [sorted(set(groups))], [
        [i for i in range(len(rows)) if groups[i] == g] for g in sorted(set(groups))], 0)
    planned = plan_reuse(rows, overhead_tokens=4)
    assert planned is not None and len(planned.response_passes) > len(set(groups))
    reused = rm.score(rows, reuse=planned)
    for (_, n), want, got, got_too in zip(rows, full, rm.score(rows, reuse=one_pass_each),
                                          reused, strict=True):
        assert got.shape == got_too.shape == want.shape == (n,)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_too, want, atol=1e-5, rtol=0)
    # and each row scored alone, unpadded, by the plain model
    for (ids, n), got in zip(rows, reused, strict=True):
        with torch.no_grad():
            out = rm.model(input_ids=torch.tensor([ids])).logits[0]
        if labels == 1:
            assert got[-1] == pytest.approx(float(out[0]), abs=1e-5)
            assert not got[:-1].any()
        else:
            probs = out.softmax(-1)[len(ids) - n:]
            np.testing.assert_allclose(got, (probs[:, 2] - probs[:, 0]).numpy(), atol=1e-5)


def test_an_encoder_is_detected_and_served_with_the_full_forward(tmp_path: Path,
                                                                 tokenizer) -> None:
    torch.manual_seed(0)
    path = tmp_path / "bert"
    BertForTokenClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label=THREE,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    rm = RewardModel.load(path, dtype="float32")
    assert not rm.info.prefix_reuse
    rows = _rows(rm.info.vocab_size)
    # the engine asks for reuse only when the model has it; asked anyway, the model says no
    plan = plan_reuse(rows, overhead_tokens=0)
    assert plan is not None
    for want, got in zip(rm.score(rows), rm.score(rows, reuse=plan), strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_plan_computes_each_prompt_once_when_that_pays() -> None:
    a, b = [1, 2, 3, 4], [1, 2, 9]
    rows = [([*a, 5, 6], 2), ([*b, 7], 1), ([*a, 8], 1), ([*a, 5, 6, 7], 3)]
    assert prompt_groups(rows) == [0, 1, 0, 0]
    plan = plan_reuse(rows, overhead_tokens=0)
    assert plan is not None
    assert plan.groups == [0, 1, 0, 0]
    assert sorted(map(sorted, plan.prompt_passes)) == [[0], [1]]   # lengths 4 and 3: apart
    assert sorted(map(sorted, plan.response_passes)) == [[0], [1], [2], [3]]
    assert plan.saved == 2 * 4                            # a's prompt twice more
    # a forward's fixed cost of 100 tokens: the plan's three passes or more (a prompt pass,
    # one response pass per prompt) cost more than one pass of the whole rows (4 x 7 + 100)
    assert plan_reuse(rows, overhead_tokens=100) is None
    assert plan_reuse(rows[:2], overhead_tokens=0) is None   # no prompt shared
    assert plan_reuse([*rows, (a, 0)], overhead_tokens=0) is None        # nothing to score
    assert plan_reuse([*rows, ([5, 6], 2)], overhead_tokens=0) is None   # no prompt


def test_responses_run_in_groups_of_like_lengths() -> None:
    assert length_groups([30, 2, 31, 3, 29], overhead_tokens=4) == [[1, 3], [4, 0, 2]]
    assert length_groups([30, 2, 31, 3, 29], overhead_tokens=float("inf")) == [[1, 3, 4, 0, 2]]
    assert length_groups([], overhead_tokens=4) == []


def test_the_oldest_rows_prompt_makes_the_batch() -> None:
    # prompts by id; lengths of whole rows; the oldest row's prompt (7) has rows far back
    groups = [7, 1, 2, 1, 7, 3, 7, 2]
    lengths = [10, 10, 10, 10, 12, 10, 11, 10]
    assert pick_shared_batch(groups, lengths, max_tokens=1000, max_rows=64) == [0, 4, 6]
    assert pick_shared_batch(groups, lengths, max_tokens=1000, max_rows=2) == [0, 4]
    assert pick_shared_batch(groups, lengths, max_tokens=12 * 2, max_rows=64) == [0, 4]
    assert pick_shared_batch([2, 1, 1], [5, 5, 5], 100, 64) is None   # the oldest is alone


@pytest.mark.parametrize("path", ["/score", "/get_reward"])
def test_the_server_gives_the_same_rewards_with_and_without_reuse(
        tmp_path: Path, tokenizer, path: str) -> None:
    """Text items, several samples per prompt, in one request: the engine batches them and
    computes each prompt once (its metric counts the tokens); rewards equal reuse off's."""
    model = _llama(tmp_path / "rm", tokenizer)
    prompts = ["Facts: Ana is 30. Ana lives in Lima. Question: Who is Ana?",
               "Facts: Bo is a gardener. Question: What does Bo do?"]
    responses = ["Ana lives in Lima.", "Ana is 31 years old.", "Ana lives in Oslo, I think.",
                 "Bo is a gardener.", "Bo is a pilot."]
    items = [{"prompt": p, "response": r} for p in prompts for r in responses]
    body = ({"items": items} if path == "/score" else
            {"query": [i["prompt"] + " " + i["response"] for i in items],
             "prompts": [i["prompt"] + " " for i in items]})
    answers, reused = [], []
    for reuse in (True, False):
        settings = Settings(model=model, dtype="float32", prefix_reuse=reuse, grpc_port=0,
                            batch_overhead_tokens=0, max_wait_ms=50)
        with TestClient(create_app(settings)) as client:
            assert client.get("/v1/model").json()["prefix_reuse"] is reuse
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json())
            reused.append(_metric(client.get("/metrics").text,
                                  "tokenrm_prompt_tokens_reused_total"))
    assert reused[0] > 0 and reused[1] == 0
    if path == "/score":
        for on, off in zip(answers[0]["results"], answers[1]["results"], strict=True):
            np.testing.assert_allclose(on["rewards"], off["rewards"], atol=1e-5, rtol=0)
    else:
        np.testing.assert_allclose(answers[0]["rewards"], answers[1]["rewards"], atol=1e-5)


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_grpc_id_items_share_their_prompt_in_a_real_server(tmp_path: Path, tokenizer) -> None:
    """Token-id items over a real gRPC channel to `tokenrm serve`: several samples per prompt,
    each in its own call at once (as trainers send them); the server computes shared prompts
    once (its metric says so) and answers what the server without reuse answers."""
    model = _llama(tmp_path / "rm", tokenizer)
    rows = _rows(len(tokenizer), seed=1)
    items = [pb.Item(prompt_ids=ids[:len(ids) - n], response_ids=ids[len(ids) - n:])
             for ids, n in rows]
    answers, reused = [], []
    for reuse in ("true", "false"):
        env = {"TOKENRM_PREFIX_REUSE": reuse, "TOKENRM_DTYPE": "float32",
               "TOKENRM_BATCH_OVERHEAD_TOKENS": "0", "TOKENRM_MAX_WAIT_MS": "200"}
        with serve(model, env=env) as running, grpc.insecure_channel(running.grpc_target) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).prefix_reuse is (
                reuse == "true")
            calls = [stub.Score.future(pb.ScoreRequest(items=[item]), timeout=60)
                     for item in items]
            answers.append([list(c.result().results[0].rewards) for c in calls])
            reused.append(_metric(httpx.get(f"{running.url}/metrics").text,
                                  "tokenrm_prompt_tokens_reused_total"))
    assert reused[0] > 0 and reused[1] == 0
    for (_, n), on, off in zip(rows, *answers, strict=True):
        assert len(on) == len(off) == n
        np.testing.assert_allclose(on, off, atol=1e-5, rtol=0)
