"""The HTTP schema of POST /score and GET /v1/model (pydantic), with examples for OpenAPI."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Span = Annotated[list[StrictInt], Field(min_length=2, max_length=2,
                                        description="[start, end) character offsets")]


class Item(BaseModel):
    """One (prompt, response) to score: as text, or as the exact token ids of the model input.
    Which combinations are valid is the service's rule (both transports share it)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "Where does Ana live?", "response": "Ana lives in Lima."},
        {"prompt_ids": [1, 57, 80], "response_ids": [311, 279, 12]},
    ]})

    prompt: StrictStr | None = Field(None, description="text; tokenized with BOS as usual")
    response: StrictStr | None = Field(None, description="text; one reward per token of it")
    prompt_ids: list[StrictInt] | None = Field(None, description="context token ids, as is")
    response_ids: list[StrictInt] | None = Field(None, description="scored token ids, as is")
    spans: list[Span] | None = Field(
        None, description="text items: sorted character spans of your own tokens; each gets "
                          "the sum of the rewards of the RM tokens ending in it")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "items": [{"prompt": "Where does Ana live?", "response": "Ana lives in Lima."}],
        "return_tokens": True}]})

    items: list[Item] = Field(min_length=1, description="the items to score, in order")
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
    dtype: str
    device: str
    limits: Limits


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward request: one query (prompt + response text) per sample."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "query": ["<|im_start|>user\nWhere does Ana live?<|im_end|>\n<|im_start|>assistant\n"
                  "Ana lives in Lima.<|im_end|>"],
        "prompts": ["<|im_start|>user\nWhere does Ana live?<|im_end|>\n<|im_start|>assistant\n"],
        "labels": [None]}]})

    query: list[StrictStr] = Field(description="decode(prompt_ids + response_ids), special "
                                               "tokens kept")
    prompts: list[StrictStr] = Field(description="the prompt of each query, as the policy saw it")
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
