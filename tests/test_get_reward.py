"""POST /get_reward (OpenRLHF's remote reward protocol), in process, on a checkpoint whose
tokenizer has a chat template and chat special tokens; and the query splitting it relies on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import LlamaConfig, LlamaForTokenClassification

from tokenrm.core.queries import MIN_TAIL, Split, split_query
from tokenrm.core.reductions import reduce_rewards
from tokenrm.server.app import create_app
from tokenrm.server.settings import Settings

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = "Facts: Ana is 30 years old. Ana lives in Lima. Question: Who is Ana?"
ANSWER = "Ana lives in Oslo. Ana is 30 years old."


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny random 3-label token RM whose tokenizer knows <|im_start|> and <|im_end|>."""
    path = tmp_path_factory.mktemp("chat") / "rm"
    tok = tokenizer.__class__.from_pretrained  # a copy, so the session fixture is not changed
    tokenizer.save_pretrained(path)
    chat = tok(path)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(chat),
                         pad_token_id=chat.pad_token_id, num_labels=3,
                         id2label={0: "negative", 1: "neutral", 2: "positive"},
                         label2id={"negative": 0, "neutral": 1, "positive": 2})
    LlamaForTokenClassification(config).save_pretrained(path)
    chat.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def client(chat_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model=chat_checkpoint, max_items_per_request=8))) as c:
        yield c


def chat_prompt(client: TestClient) -> str:
    tok = client.app.state.tokenrm.service.model.tokenizer
    return tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                   add_generation_prompt=True)


def scored(client: TestClient, prompt: str, response: str) -> dict:
    r = client.post("/score", json={"items": [{"prompt": prompt, "response": response}],
                                     "return_tokens": True})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def test_a_chat_query_is_scored_as_its_response_with_special_tokens_whole(
        client: TestClient) -> None:
    prompt = chat_prompt(client)
    query = prompt + ANSWER + "<|im_end|>"
    r = client.post("/get_reward", json={"query": [query], "prompts": [prompt], "labels": [None]})
    assert r.status_code == 200, r.text
    body = r.json()
    direct = scored(client, prompt, ANSWER + "<|im_end|>")
    assert direct["tokens"][-1] == "<|im_end|>"            # one token, not its characters
    assert "<|im_start|>" not in "".join(direct["tokens"])
    np.testing.assert_allclose(body["token_rewards"][0], direct["rewards"], atol=1e-6)
    assert body["rewards"] == pytest.approx([direct["total"]], abs=1e-5)
    assert body["scores"] == body["rewards"]
    logs = body["extra_logs"]
    assert logs["tokenrm_response_tokens"] == [len(direct["rewards"])]
    assert logs["tokenrm_min_token_reward"] == pytest.approx([min(direct["rewards"])], abs=1e-6)
    assert logs["tokenrm_negative_tokens"] == [sum(x < 0 for x in direct["rewards"])]
    assert body["extra_logs"].keys() == {"tokenrm_min_token_reward", "tokenrm_negative_tokens",
                                         "tokenrm_response_tokens"}
    assert body["model"] == "rm"


def test_a_prompt_cut_from_the_left_is_found_by_its_tail(client: TestClient) -> None:
    prompt = chat_prompt(client)
    tail = prompt[25:]
    body = client.post("/get_reward", json={"query": [tail + ANSWER], "prompts": [prompt]}).json()
    direct = scored(client, tail, ANSWER)
    np.testing.assert_allclose(body["token_rewards"][0], direct["rewards"], atol=1e-6)


def test_text_the_policy_added_before_the_prompt_is_dropped(client: TestClient) -> None:
    prompt = chat_prompt(client)
    body = client.post("/get_reward", json={"query": ["<s>" + prompt + ANSWER],
                                            "prompts": [prompt]}).json()
    direct = scored(client, prompt, ANSWER)
    np.testing.assert_allclose(body["token_rewards"][0], direct["rewards"], atol=1e-6)


@pytest.mark.parametrize("how", ["total", "mean", "min", "last"])
def test_the_reduction_is_chosen_per_url(client: TestClient, how: str) -> None:
    prompt = chat_prompt(client)
    body = client.post(f"/get_reward?reduction={how}",
                       json={"query": [prompt + ANSWER], "prompts": [prompt]}).json()
    assert body["rewards"] == pytest.approx(
        [reduce_rewards(body["token_rewards"][0], how)], abs=1e-6)


def test_empty_lists_get_empty_answers(client: TestClient) -> None:
    r = client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert r.status_code == 200, r.text
    assert r.json()["rewards"] == [] and r.json()["token_rewards"] == []


@pytest.mark.parametrize("body, params, field, item", [
    ({"query": ["Something else entirely."], "prompts": ["Where does Ana live?"]}, "", "query",
     0),
    ({"query": ["a", "b"], "prompts": ["a"]}, "", "prompts", None),
    ({"query": [1], "prompts": ["a"]}, "", "query", 0),
    ({"query": ["Where? Lima."], "prompts": ["Where?"]}, "?reduction=median", "reduction", None),
    ({"query": ["Where?"], "prompts": ["Where?"]}, "", "response", 0),
])
def test_bad_requests_name_the_field(client: TestClient, body: dict, params: str, field: str,
                                     item: int | None) -> None:
    r = client.post(f"/get_reward{params}", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["field"], error["item"]) == (field, item), error
    assert field in error["message"]


def test_split_query_cases() -> None:
    prompt = "P" * 10 + "0123456789abcdefghij"
    assert split_query(prompt + "resp", prompt) == Split(prompt, "resp")
    assert split_query("<|begin_of_text|>" + prompt + "resp", prompt) == Split(prompt, "resp")
    assert split_query(prompt[5:] + "resp", prompt) == Split(prompt[5:], "resp")
    tail = prompt[-MIN_TAIL:]
    assert split_query(tail + "resp", prompt) == Split(tail, "resp")
    assert split_query(prompt[-MIN_TAIL + 1:] + "resp", prompt) is None  # too short to trust
    assert split_query("unrelated text here, long enough", prompt) is None
    assert split_query("anything", "") == Split("", "anything")
