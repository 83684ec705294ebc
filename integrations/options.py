"""Where the server is and how to use it: one set of options for every integration, from
arguments or TOKENRM_* environment variables (set them in the trainer's environment, e.g. Ray's
runtime_env, when the trainer builds the integration itself)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tokenrm.client.alignment import Send
from tokenrm.client.async_client import checked_url
from tokenrm.core.reductions import REDUCTIONS

DEFAULT_URL = "grpc://127.0.0.1:50051"


@dataclass(frozen=True)
class Options:
    urls: Sequence[str] = (DEFAULT_URL,)  # TOKENRM_URL, comma-separated: several servers
    api_key: str | None = None            # TOKENRM_API_KEY
    timeout_s: float = 600.0              # TOKENRM_TIMEOUT_S: per scoring call, retries included
    reduction: str = "total"              # TOKENRM_REDUCTION: total, mean, min or last
    send: Send = "auto"                   # TOKENRM_SEND: auto, ids or text (see client.alignment)
    dense: bool = True                    # TOKENRM_DENSE: verl, a reward per token (else the
                                          # total on the last token, for an A/B against dense)

    def __post_init__(self) -> None:
        object.__setattr__(self, "urls", tuple(self.urls))  # hashable: a key for shared clients
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction {self.reduction!r}: choose one of "
                             f"{', '.join(REDUCTIONS)}")
        if self.send not in ("auto", "ids", "text"):
            raise ValueError(f"send {self.send!r}: choose auto, ids or text")
        if not self.urls:
            raise ValueError("urls: give at least one tokenrm server URL")
        for url in self.urls:  # now, not at the trainer's first reward call
            checked_url(url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **given: Any) -> Options:
        """Arguments given (not None) win over TOKENRM_* variables, which win over defaults."""
        env = os.environ if env is None else env
        found: dict[str, Any] = {}
        if env.get("TOKENRM_URL"):
            found["urls"] = [u.strip() for u in env["TOKENRM_URL"].split(",") if u.strip()]
        for name, convert in (("api_key", str), ("timeout_s", float), ("reduction", str),
                              ("send", str), ("dense", _flag)):
            value = env.get(f"TOKENRM_{name.upper()}")
            if value:
                found[name] = convert(value)
        urls = given.pop("urls", None)
        if isinstance(urls, str):
            urls = [urls]
        found |= {k: v for k, v in {**given, "urls": urls}.items() if v is not None}
        return replace(cls(), **found)


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"TOKENRM_DENSE={value!r}: use 1 or 0")
