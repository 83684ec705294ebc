"""The HTTP schema of POST /score, POST /get_reward and GET /v1/model (pydantic), with examples
for OpenAPI; the published request schemas state the server's rules, its limits included."""

from __future__ import annotations

import copy
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

Span = Annotated[list[StrictInt], Field(min_length=2, max_length=2,
                                        description="[start, end) character offsets")]

# ---------------------------------------------------------------- the published item schema
# What a caller may send, as OpenAPI tells it: a text item or an ids item (oneOf), each with
# its required fields, no others, and the bounds the server checks. A field of the other kind
# may be null (null is taken as absent). Requests are parsed with the looser `Item` below,
# whose errors name the item and field; the service's rules then refuse what this schema does.

NonNegative = Annotated[StrictInt, Field(ge=0)]
TokenId = Annotated[StrictInt, Field(ge=0, description="below the model's vocabulary size "
                                                       "(GET /v1/model: vocab_size)")]
NOT_HERE = "null or absent: a field of the other kind of item"


class TextItem(BaseModel):
    """Text: the server tokenizes prompt (with BOS, as usual) and response."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "Where does Ana live?", "response": "Ana lives in Lima.",
         "spans": [[0, 3], [3, 9], [9, 12], [12, 18]]}]})

    prompt: StrictStr = Field(description="context text, may be empty; a long one is cut "
                                          "from the left to fit")
    response: StrictStr = Field(min_length=1, description="the scored text, one reward per "
                                "token of it: at least one token and at most "
                                "max_tokens_per_item (GET /v1/model: limits)")
    spans: list[Annotated[list[NonNegative], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="character spans [start, end) of your own tokens, sorted and not "
                          "overlapping, 0 <= start < end <= the response's length; each gets the "
                          "sum of the rewards of the RM tokens ending in it")
    prompt_ids: None = Field(None, description=NOT_HERE)
    response_ids: None = Field(None, description=NOT_HERE)


class IdsItem(BaseModel):
    """Token ids: the exact model input, prompt_ids + response_ids, nothing added."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt_ids": [1, 57, 80], "response_ids": [311, 279, 12]}]})

    prompt_ids: list[TokenId] = Field(description="context token ids, may be empty; cut from "
                                                  "the left to fit")
    response_ids: list[TokenId] = Field(min_length=1, description="the scored token ids: at "
                                        "most max_tokens_per_item (GET /v1/model: limits)")
    prompt: None = Field(None, description=NOT_HERE)
    response: None = Field(None, description=NOT_HERE)
    spans: None = Field(None, description=NOT_HERE)


class Item(BaseModel):
    """One (prompt, response) to score: as text, or as the exact token ids of the model input.
    Parses any combination of the fields (so that errors name the item and field); which
    combinations are valid is the service's rule (both transports share it), which OpenAPI
    shows as the schema of this model."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | None = None
    response: StrictStr | None = None
    prompt_ids: list[StrictInt] | None = None
    response_ids: list[StrictInt] | None = None
    spans: list[Span] | None = None

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # A text item's prompt is a string, an ids item's null or absent: no item is both, so
        # the union's anyOf is a oneOf.
        published = handler(TypeAdapter(TextItem | IdsItem).core_schema)
        return {"oneOf": published["anyOf"], "description": "A text item or an ids item"}


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "items": [{"prompt": "Where does Ana live?", "response": "Ana lives in Lima."}],
        "return_tokens": True}]})

    items: list[Item] = Field(min_length=1, description="the items to score, in order: at "
                              "most max_items_per_request (GET /v1/model: limits)")
    return_tokens: StrictBool = Field(False, description="add token strings and offsets")


class ItemResult(BaseModel):
    rewards: list[float] = Field(description="one reward per response token")
    total: float = Field(description="sum of rewards")
    token_ids: list[int] = Field(description="the response token ids that were scored")
    tokens: list[str] | None = Field(None, description="token strings (return_tokens)")
    offsets: list[list[int]] | None = Field(
        None, description="character [start, end) of each token in the response (text items)")
    span_rewards: list[float] | None = Field(None, description="one reward per given span")


class Usage(BaseModel):
    items: int
    tokens: int = Field(description="model input tokens, prompts included")


class ScoreResponse(BaseModel):
    model: str
    model_version: str = Field(description="the version of the model that scored it")
    results: list[ItemResult]
    usage: Usage


class ErrorBody(BaseModel):
    code: str
    message: str
    item: int | None = None
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ReadyResponse(BaseModel):
    status: str = Field(description="ready, or not ready (loading or draining)")
    queued: int | None = Field(None, description="items waiting to be scored (when ready)")


class Limits(BaseModel):
    max_items_per_request: int
    max_tokens_per_item: int
    max_body_bytes: int
    max_batch_tokens: int


class ModelInfoResponse(BaseModel):
    name: str
    version: str = Field(description="given (TOKENRM_MODEL_VERSION), or a hash of the "
                         "checkpoint's config and weights; every answer names it")
    kind: str = Field(description="token: a reward per token; sequence: one, on the last token")
    labels: list[str]
    reward_rule: str
    tokenizer: str
    tokenizer_sha256: str = Field(description="sha256 of the vocabulary and special token "
                                  "ids: callers with the same one can send token ids")
    vocab_size: int
    max_len: int
    dtype: str = Field(description="what serves: float32, bfloat16, float16 or int8")
    dtype_delta: float | None = Field(description="max |reward - float32's| measured on probe "
                                      "batches at start-up; null when not checked")
    device: str
    prefix_reuse: bool = Field(description="rows that share their prompt compute it once")
    limits: Limits


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward request: one query (prompt + response text) per sample."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "query": ["<|im_start|>user\nWhere does Ana live?<|im_end|>\n<|im_start|>assistant\n"
                  "Ana lives in Lima.<|im_end|>"],
        "prompts": ["<|im_start|>user\nWhere does Ana live?<|im_end|>\n<|im_start|>assistant\n"],
        "labels": [None]}]})

    query: list[StrictStr] = Field(description="decode(prompt_ids + response_ids), special "
                                   "tokens kept: at most max_items_per_request (GET /v1/model: "
                                   "limits); each holds its prompt (whole, near its start, or "
                                   "the tail of a prompt cut from the left) and, after it, a "
                                   "response of at least one token")
    prompts: list[StrictStr] = Field(description="the prompt of each query, as the policy saw "
                                     "it: as many as there are queries")
    labels: list[Any] | None = Field(None, description="not used by a reward model")


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="one reward per query (the reduction of its "
                                             "token rewards; total by default)")
    scores: list[float] = Field(description="the same as rewards")
    extra_logs: dict[str, list[float]] = Field(description="per-query scalars worth logging")
    token_rewards: list[list[float]] = Field(description="the per-token rewards of each "
                                                         "response (OpenRLHF ignores them)")
    model: str
    model_version: str


def with_limits(spec: dict[str, Any], *, max_items: int, max_tokens: int,
                vocab_size: int) -> dict[str, Any]:
    """A copy of the OpenAPI `spec` whose request schemas bound what the running server
    bounds: items per request, response token ids per item, token ids below the vocabulary.
    (Settings and the model set them, so the schema of a server without a model omits them.)"""
    spec = copy.deepcopy(spec)
    schemas = spec["components"]["schemas"]
    schemas["ScoreRequest"]["properties"]["items"]["maxItems"] = max_items
    for name in ("query", "prompts"):
        schemas["GetRewardRequest"]["properties"][name]["maxItems"] = max_items
    ids = schemas["IdsItem"]["properties"]
    for name in ("prompt_ids", "response_ids"):
        ids[name]["items"]["maximum"] = vocab_size - 1
    ids["response_ids"]["maxItems"] = max_tokens
    return spec
