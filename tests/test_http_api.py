"""POST /score and the other routes, in process (TestClient enters the app's lifespan)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tokenrm.server.app import create_app
from tokenrm.server.settings import Settings

TEXT = {"prompt": "Facts: Ana lives in Lima. Question: Who is Ana?",
        "response": "Ana lives in Lima."}


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    settings = Settings(model=tiny_checkpoint, max_items_per_request=8, max_body_bytes=4096)
    with TestClient(create_app(settings)) as c:
        yield c


def test_text_item_gets_one_reward_per_response_token(client: TestClient) -> None:
    r = client.post("/score", json={"items": [TEXT], "return_tokens": True})
    assert r.status_code == 200
    body = r.json()
    result = body["results"][0]
    assert len(result["rewards"]) == len(result["token_ids"]) == len(result["tokens"])
    assert result["total"] == pytest.approx(sum(result["rewards"]), abs=1e-5)
    pieces = [TEXT["response"][a:b] for a, b in result["offsets"]]
    assert "".join(pieces).replace(" ", "") == TEXT["response"].replace(" ", "")
    assert body["model"] == "rm" and body["usage"]["items"] == 1


def test_token_item_scores_exactly_the_given_ids(client: TestClient) -> None:
    text = client.post("/score", json={"items": [TEXT]}).json()["results"][0]
    prompt_ids = client.app.state.tokenrm.service.model.encode(TEXT["prompt"], "").prompt_ids
    ids = {"prompt_ids": prompt_ids, "response_ids": text["token_ids"]}
    same = client.post("/score", json={"items": [ids]}).json()["results"][0]
    assert same["rewards"] == pytest.approx(text["rewards"], abs=1e-6)
    assert same["offsets"] is None and same["tokens"] is None


def test_spans_conserve_the_total(client: TestClient) -> None:
    item = {**TEXT, "spans": [[0, 3], [3, 9], [9, 12], [12, 18]]}
    result = client.post("/score", json={"items": [item]}).json()["results"][0]
    assert len(result["span_rewards"]) == 4
    assert sum(result["span_rewards"]) == pytest.approx(result["total"], abs=1e-5)


def test_health_ready_model_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    info = client.get("/v1/model").json()
    assert info["labels"] == ["negative", "neutral", "positive"]
    assert info["reward_rule"] == "pos_minus_neg"
    assert info["limits"]["max_items_per_request"] == 8
    client.post("/score", json={"items": [TEXT]})
    metrics = client.get("/metrics").text
    assert "tokenrm_forward_seconds_count" in metrics and "tokenrm_queue_depth" in metrics


def test_openapi_documents_the_request_with_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["ScoreRequest"]
    assert request["examples"] and "Item" in schema["components"]["schemas"]
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"] == "#/components/schemas/ScoreRequest"


def _ids(n: int) -> dict[str, list[int]]:
    return {"prompt_ids": [1, 5], "response_ids": [7] * n}


BAD = [
    # (name, body, status, item, field, words in the message)
    ("malformed JSON", b'{"items": [', 400, None, None, "not valid JSON"),
    ("invalid UTF-8", b'{"items": [{"prompt": "\xff\xfe"}]}', 400, None, None, "JSON"),
    ("deep nesting", b"[" * 1500 + b"]" * 1500, 400, None, None, "JSON"),
    ("not an object", b"[1, 2]", 422, None, None, "should be an object"),
    ("no items", b'{"items": []}', 422, None, "items", "at least 1"),
    ("items missing", b"{}", 422, None, "items", "Field required"),
    ("wrong type", b'{"items": [{"prompt": 3, "response": "a"}]}', 422, 0, "prompt", "string"),
    ("bool as id", b'{"items": [{"prompt_ids": [], "response_ids": [true]}]}', 422, 0,
     "response_ids", "integer"),
    ("unknown field", b'{"items": [{"prompt": "a", "response": "b", "x": 1}]}', 422, 0, "x",
     "Extra inputs"),
    ("text and ids", b'{"items": [{"prompt": "a", "response": "b", "prompt_ids": [1]}]}', 422, 0,
     None, "not both"),
    ("empty response", b'{"items": [{"prompt": "a", "response": ""}]}', 422, 0, "response",
     "empty"),
    ("empty response ids", b'{"items": [{"prompt_ids": [1], "response_ids": []}]}', 422, 0,
     "response_ids", "empty"),
    ("negative id", b'{"items": [{"prompt_ids": [1], "response_ids": [-1]}]}', 422, 0,
     "response_ids", "outside the vocabulary"),
    ("out-of-vocabulary id", b'{"items": [{"prompt_ids": [99999], "response_ids": [5]}]}', 422,
     0, "prompt_ids", "outside the vocabulary"),
    ("span out of range", b'{"items": [{"prompt": "a", "response": "abc", "spans": [[0, 9]]}]}',
     422, 0, "spans", "<= 3"),
    ("span not finite", b'{"items": [{"prompt": "a", "response": "abc", "spans": [[0, 1e999]]}]}',
     422, 0, "spans", "integer"),
    ("overlapping spans",
     b'{"items": [{"prompt": "a", "response": "abc", "spans": [[0, 2], [1, 3]]}]}', 422, 0,
     "spans", "overlap"),
    ("spans on ids", b'{"items": [{"prompt_ids": [1], "response_ids": [2], "spans": [[0, 1]]}]}',
     422, 0, "spans", "text items only"),
]


@pytest.mark.parametrize(("name", "body", "status", "item", "field", "words"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx(client: TestClient, name: str, body: bytes, status: int,
                                  item: int | None, field: str | None, words: str) -> None:
    r = client.post("/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"]
    assert error["item"] == item
    if field is not None:
        assert error["field"] == field
    assert client.post("/score", json={"items": [TEXT]}).status_code == 200  # still serving


def test_a_wrong_route_or_method_gets_the_same_error_body(client: TestClient) -> None:
    missing = client.post("/scores", json={"items": []})
    assert missing.status_code == 404
    assert missing.json() == {"error": {
        "code": "not_found", "message": "nothing at this path (the routes are in the README)",
        "item": None, "field": None}}
    wrong = client.get("/score")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"] == {"code": "method_not_allowed", "item": None, "field": None,
                                     "message": "GET is not allowed on /score; allowed: POST"}


def test_the_second_item_is_named(client: TestClient) -> None:
    r = client.post("/score", json={"items": [TEXT, {"prompt": "a", "response": ""}]})
    assert r.status_code == 422 and r.json()["error"]["item"] == 1
    assert r.json()["error"]["message"].startswith("items[1].response")


def test_too_many_items(client: TestClient) -> None:
    r = client.post("/score", json={"items": [_ids(1)] * 9})
    assert r.status_code == 422
    assert "9 items; the limit is 8" in r.json()["error"]["message"]


def test_a_response_over_the_model_maximum_is_refused(client: TestClient) -> None:
    r = client.post("/score", json={"items": [_ids(500)]})
    assert r.status_code == 422
    assert "500 tokens; the limit is 192" in r.json()["error"]["message"]


def test_an_over_long_prompt_is_cut_from_the_left(client: TestClient) -> None:
    r = client.post("/score", json={"items": [{"prompt_ids": [5] * 400, "response_ids": [7] * 10}]})
    assert r.status_code == 200
    assert len(r.json()["results"][0]["rewards"]) == 10
    assert r.json()["usage"]["tokens"] == 192


def test_a_huge_body_is_413(client: TestClient) -> None:
    r = client.post("/score", content=b'{"items": [' + b" " * 5000 + b"]}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "limit is 4096" in r.json()["error"]["message"]


def test_api_keys_guard_every_route_but_healthz(tiny_checkpoint: Path) -> None:
    settings = Settings(model=tiny_checkpoint, api_keys=("k1", "k2"))
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        # Every route the app documents when it has no keys: a new route cannot slip through.
        schema = create_app(Settings(model=tiny_checkpoint)).openapi()
        routes = [(method, path) for path, ops in schema["paths"].items() for method in ops
                  if path != "/healthz"]
        assert {p for _, p in routes} >= {"/readyz", "/v1/model", "/metrics", "/score"}
        for method, path in routes:
            for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "k1"}):
                r = c.request(method, path, headers=headers, json={"items": [TEXT]})
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "unauthenticated"
        good = {"authorization": "Bearer k2"}
        assert c.post("/score", json={"items": [TEXT]}, headers=good).status_code == 200
        for public_by_default in ("/openapi.json", "/docs", "/redoc"):
            assert c.get(public_by_default).status_code == 404
