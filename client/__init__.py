"""tokenrm.client: per-token rewards from a tokenrm server, over HTTP or gRPC, sync or async.

    from tokenrm.client import Item, RewardClient

    with RewardClient("grpc://127.0.0.1:50051") as client:      # or http://, https://, grpcs://
        scores = client.score([Item.text("Where does Ana live?", "Ana lives in Lima."),
                               Item.tokens([1, 57, 80], [311, 279, 12])])
        scores[0].rewards        # float32, one per response token; .token_ids, .total

The names are the wire's (HTTP JSON and gRPC alike): `Item(prompt, response, prompt_ids,
response_ids, spans)`; `score(items, return_tokens=True)` also fills each result's `tokens` and,
for text items, `offsets`; a text item's `spans` (the character spans of another tokenizer's
tokens) give `span_rewards`, one per span.

`score` takes any number of items: it splits them into requests under the server's limits, keeps
a bounded number in flight, retries what is worth retrying (429, 503, UNAVAILABLE,
RESOURCE_EXHAUSTED, lost connections, and a 500 / INTERNAL that is not tokenrm's own answer,
such as Ray Serve's when a replica dies) with backoff and jitter within one deadline, spreads
requests over several endpoints (a list of URLs) and checks every answer before returning it, in
input order. Installing it needs no torch: `pip install "tokenrm[client]"`.
"""

from tokenrm.client.async_client import AsyncRewardClient
from tokenrm.client.errors import (
    AuthenticationError,
    CertificateError,
    DeadlineError,
    InputError,
    ResultError,
    RewardClientError,
    ServerError,
)
from tokenrm.client.retry import RetryPolicy
from tokenrm.client.sync_client import RewardClient
from tokenrm.client.types import Item, ItemScore, Limits, ModelInfo

__all__ = [
    "AsyncRewardClient",
    "AuthenticationError",
    "CertificateError",
    "DeadlineError",
    "InputError",
    "Item",
    "ItemScore",
    "Limits",
    "ModelInfo",
    "ResultError",
    "RetryPolicy",
    "RewardClient",
    "RewardClientError",
    "ServerError",
]
