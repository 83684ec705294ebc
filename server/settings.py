"""Server settings: one pydantic-settings class, read from TOKENRM_* environment variables once."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tokenrm.core.reductions import Reduction


class Settings(BaseSettings):
    """Everything the server can be told. Built once at start-up and passed down."""

    model_config = SettingsConfigDict(env_prefix="TOKENRM_", frozen=True)

    model: Path | None = Field(None, description="checkpoint directory; unset: the demo model")
    model_name: str | None = Field(None, description="name reported to clients; default: dir name")
    model_version: str | None = Field(
        None, description="version reported with every answer; default: a hash of the "
        "checkpoint's config and weight files")
    cache_dir: Path | None = Field(None, description="where the demo model is cached")
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 in the container)")
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535, description="0: no gRPC server")
    grpc_max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="gRPC message size limit, received and sent")
    grpc_tls_cert: Path | None = Field(None, description="PEM certificate chain: gRPC over TLS")
    grpc_tls_key: Path | None = Field(None, description="PEM private key of grpc_tls_cert")
    grace_s: float = Field(10.0, ge=0, description="on SIGTERM: how long in-flight work may finish")

    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "auto", description="auto: bfloat16 where the device runs it natively (CUDA with bf16, "
        "a CPU with avx512_bf16 or AMX) and its rewards are within 0.02 of float32's on probe "
        "batches, else float32; int8: dynamic quantization of the Linear layers (CPU), with "
        "the same check; float32/bfloat16/float16 are used as given")
    prefix_reuse: bool = Field(
        True, description="rows that share their prompt compute it once (a causal model's KV "
        "cache), where that reproduces the full forward (checked at load)")
    workers: int | None = Field(
        None, ge=1, description="forward passes at once, each on its own thread; unset: 2 on a "
        "CPU with 2+ cores (the Python between kernels overlaps), 1 on an accelerator")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads per forward pass; unset: the cores / workers")
    trace: bool | None = Field(
        None, description="run the forward as a TorchScript trace when it reproduces the "
        "eager model (checked at load); unset: on the CPU, where it was measured to help (the "
        "eager forward's Python waits for the GIL beside a busy event loop), not on an "
        "accelerator, where it was not measured")

    def parallelism(self, cores: int) -> tuple[int, int]:
        """(workers, torch threads per worker) for a machine with `cores` CPU cores."""
        cpu = self.device == "cpu"
        workers = self.workers or (min(2, cores) if cpu else 1)
        return workers, self.threads or max(1, cores // workers)

    max_batch_tokens: int = Field(16384, ge=1, description="padded tokens per forward pass")
    max_batch_size: int = Field(64, ge=1, description="sequences per forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill up")
    batch_overhead_tokens: float | None = Field(
        None, ge=0, description="a forward pass's fixed cost in tokens of compute, weighed "
        "against padding when rows of unlike lengths could share a batch; unset: measured at "
        "start-up")
    max_queue_items: int = Field(2048, ge=1, description="items waiting; beyond: 429")
    request_timeout_s: float = Field(30.0, gt=0, description="per request, queue + forward")

    max_items_per_request: int = Field(256, ge=1)
    get_reward_reduction: Reduction = Field(
        "total", description="POST /get_reward: how a response's token rewards become its one "
        "reward (total, mean, min, last); a request's ?reduction= overrides it")
    max_tokens_per_item: int | None = Field(
        None, ge=1, description="prompt + response tokens; unset: the model's maximum")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="HTTP request body limit")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="comma-separated keys; when set, every route but /healthz needs one")

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("grpc_tls_cert and grpc_tls_key go together: give both or neither")
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = tuple(k.strip() for k in value.split(",") if k.strip())
            if value and not keys:  # set, yet no key: serving open would surprise its author
                raise ValueError("set, but holds no key; unset it to serve without keys")
            return keys
        return value


# TOKENRM_* variables the client side reads (tokenrm.integrations.options, `tokenrm score` and
# `tokenrm ppo`): not settings of the server, but not typos either
CLIENT_VARIABLES = frozenset({"TOKENRM_URL", "TOKENRM_API_KEY", "TOKENRM_TIMEOUT_S",
                              "TOKENRM_REDUCTION", "TOKENRM_SEND", "TOKENRM_DENSE"})


def misread_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each TOKENRM_* variable the server will ignore although it was likely meant
    for it: a name close to a setting's, or the clients' TOKENRM_API_KEY with no server keys."""
    known = sorted(name.upper() for name in Settings.model_fields)
    lines = []
    for name in sorted(n for n in environ if n.startswith("TOKENRM_")):
        given = name.removeprefix("TOKENRM_")
        if given in known:
            continue
        if name == "TOKENRM_API_KEY" and not environ.get("TOKENRM_API_KEYS"):
            lines.append("TOKENRM_API_KEY is the clients' key; the server reads its keys from "
                         "TOKENRM_API_KEYS, which is not set: every route is open")
            continue
        if name in CLIENT_VARIABLES:
            continue
        close = [k for k in known if k.startswith(given) or given.startswith(k)]
        close += [k for k in difflib.get_close_matches(given, known, n=2, cutoff=0.6)
                  if k not in close]
        if close:
            lines.append(f"{name} is not a setting and is ignored: did you mean "
                         + " or ".join(f"TOKENRM_{c}" for c in close[:2]) + "?")
    return lines
