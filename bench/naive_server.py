"""A naive reward server to compare against: one padded forward per request, in the handler.

The OpenRLHF `serve_rm` pattern: the async handler pads all items of its request into one batch
and runs the model right there, on the event loop; requests are never batched together. It takes
the same token items as `POST /score`, and OpenRLHF's `POST /get_reward` (its `serve_rm`: the
queries tokenized and scored in the handler), so that one load generator measures both
servers. Binds 127.0.0.1 only.

    python bench/naive_server.py --model DIR --port P
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from transformers import AutoModelForTokenClassification, AutoTokenizer

from tokenrm.core.encoding import encode
from tokenrm.core.queries import split_query
from tokenrm.core.scoring import row_rewards


def create_app(path: Path) -> FastAPI:
    """The app around a token-classification checkpoint loaded with plain transformers."""
    model = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    app = FastAPI(title="naive reward server")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        items: list[dict[str, Any]] = (await request.json())["items"]
        rows = [it["prompt_ids"] + it["response_ids"] for it in items]
        rewards = row_rewards(model, rows, pad_id)  # on the event loop: the naive part
        results = []
        for i, (row, item) in enumerate(zip(rows, items, strict=True)):
            values = rewards[i, len(row) - len(item["response_ids"]):len(row)].tolist()
            results.append({"rewards": values, "total": sum(values)})
        return JSONResponse({"results": results})

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        """OpenRLHF's serve_rm: tokenize the queries and run the model in the handler."""
        data: dict[str, Any] = await request.json()
        encoded = []
        for query, prompt in zip(data["query"], data["prompts"], strict=True):
            split = split_query(query, prompt)
            assert split is not None, "the bench sends queries that hold their prompts"
            encoded.append(encode(tokenizer, split.prompt, split.response))
        rows = [e.prompt_ids + e.response_ids for e in encoded]
        rewards = row_rewards(model, rows, pad_id)  # on the event loop, one request's rows
        totals = [float(rewards[i, len(e.prompt_ids):len(rows[i])].sum())
                  for i, e in enumerate(encoded)]
        return JSONResponse({"rewards": totals, "scores": totals, "extra_logs": {}})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
