"""A reward checkpoint in memory: loads any supported head and scores padded batches."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from tokenrm.core.encoding import Encoded, encode, fit
from tokenrm.core.reward_rule import POS_MINUS_NEG
from tokenrm.core.scoring import Logits, Scored, on_last_token, row_rewards
from tokenrm.core.tokenizer import fingerprint
from tokenrm.server.batching import ReusePlan
from tokenrm.server.precision import TOLERANCE, choose
from tokenrm.server.prefix import TOLERANCE as PREFIX_TOLERANCE
from tokenrm.server.prefix import prefix_rewards
from tokenrm.server.prefix import verify as verify_prefix
from tokenrm.server.torchscript import traced_logits

log = logging.getLogger(__name__)
RULES = {1: "logit", 2: "p_positive", 3: POS_MINUS_NEG}


class ModelLoadError(RuntimeError):
    """The checkpoint is missing, incomplete or not a reward model this server can serve."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str                 # "token": a reward per token; "sequence": one, on the last token
    labels: tuple[str, ...]
    reward_rule: str
    max_len: int              # prompt + response tokens
    vocab_size: int
    tokenizer: str
    tokenizer_sha256: str     # see training.tokenizer.fingerprint
    dtype: str                # what serves: float32, bfloat16, float16 or int8
    dtype_delta: float | None  # max |reward - float32's| on probe batches when verified
    device: str
    traced: bool              # the forward runs as a verified TorchScript trace
    prefix_reuse: bool        # rows that share a prompt may compute it once (verified)
    version: str              # given, or checkpoint_version(path)


def checkpoint_version(path: Path) -> str:
    """The first 12 hex digits of the sha256 of the checkpoint's config.json and weight files
    (*.safetensors, *.bin), in name order: another training run or edit, another version."""
    digest = hashlib.sha256()
    files = [path / "config.json", *sorted(p for pattern in ("*.safetensors", "*.bin")
                                           for p in path.glob(pattern))]
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:12]


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loading chatter (a progress bar per load, notes on config fields a reward
    model does not use) means nothing to someone running a reward server: errors only."""
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _read_checkpoint(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, bool]:
    """The float32 model, its tokenizer, and whether its head is a sequence head."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read config.json: {exc}") from exc
    if config.num_labels not in RULES:
        raise ModelLoadError(f"{path}: a reward head has 1, 2 or 3 labels, not "
                             f"{config.num_labels}")
    sequence = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    auto = AutoModelForSequenceClassification if sequence else AutoModelForTokenClassification
    try:
        with _quiet_transformers():
            model, loading = auto.from_pretrained(path, dtype=torch.float32,
                                                  output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # any failure here (safetensors, config, tokenizer) means the same
        raise ModelLoadError(f"{path}: cannot load the checkpoint: {exc}") from exc
    untrained = sorted({str(k if isinstance(k, str) else k[0])
                        for k in [*loading["missing_keys"], *loading["mismatched_keys"]]})
    if untrained:  # transformers would fill them with random values: garbage rewards
        raise ModelLoadError(
            f"{path}: the checkpoint has no trained weights for {', '.join(untrained[:4])}"
            f"{' ...' if len(untrained) > 4 else ''}; a base or policy model is not a reward "
            "model (it needs its trained token- or sequence-classification head)")
    return model, tokenizer, sequence


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _max_len(config: object, tokenizer: PreTrainedTokenizerBase) -> int:
    ours = getattr(config, "tokenrm", None) or {}
    for value in (ours.get("max_len"), getattr(config, "max_position_embeddings", None),
                  getattr(config, "n_positions", None), tokenizer.model_max_length):
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return 512


class RewardModel:
    """The model, its tokenizer and what clients need to know about them."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 info: ModelInfo, logits: Logits | None = None) -> None:
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self._logits = logits     # None: the eager forward
        self._pad_id = pad_id(tokenizer)

    @classmethod
    def load(cls, path: Path, name: str | None = None, device: str = "cpu",
             dtype: str = "float32", trace: bool = True, version: str | None = None,
             prefix_reuse: bool = True) -> RewardModel:
        """Load a token- or sequence-classification checkpoint directory; fail loudly. `dtype`:
        see server/precision.py ("auto": bf16 where native and verified). With `trace`, the
        forward runs as a TorchScript trace if it reproduces the eager model; with
        `prefix_reuse`, rows that share a prompt may compute it once if that reproduces the
        full forward (server/prefix.py)."""
        if dtype == "int8" and device != "cpu":
            raise ModelLoadError(f"dtype int8 (dynamic quantization) runs on the CPU, not {device}")
        model, tokenizer, sequence = _read_checkpoint(path)
        model = model.to(device).eval()
        if sequence:  # HF pools a sequence head at the last token that is not the pad id
            model.config.pad_token_id = pad_id(tokenizer)
        vocab_size = model.get_input_embeddings().num_embeddings
        model, precision = choose(model, dtype, device, pad_id(tokenizer), vocab_size)
        reuse = prefix_reuse and verify_prefix(
            model, pad_id(tokenizer), vocab_size,
            PREFIX_TOLERANCE if precision.dtype == "float32" else TOLERANCE)
        with _quiet_transformers():  # tracing reads every attribute, loss_function's too
            logits = traced_logits(model, pad_id(tokenizer), vocab_size) if trace else None
        num_labels = model.config.num_labels
        info = ModelInfo(
            name=name or path.name, kind="sequence" if sequence else "token",
            labels=tuple(str(model.config.id2label[i]) for i in range(num_labels)),
            reward_rule=RULES[num_labels], max_len=_max_len(model.config, tokenizer),
            vocab_size=vocab_size, tokenizer=type(tokenizer).__name__,
            tokenizer_sha256=fingerprint(tokenizer), dtype=precision.dtype,
            dtype_delta=precision.delta, device=device, traced=logits is not None,
            prefix_reuse=reuse, version=version or checkpoint_version(path))
        return cls(model, tokenizer, info, logits)

    def encode(self, prompt: str, response: str) -> Encoded:
        return encode(self.tokenizer, prompt, response)

    def score(self, rows: Sequence[tuple[Sequence[int], int]], reuse: ReusePlan | None = None
              ) -> list[np.ndarray]:
        """Rewards of the last `n` tokens of each row (input_ids, n): in one forward pass, or
        with `reuse` (and the model verified for it) each distinct prompt computed once, as
        the plan says (batching.plan_reuse)."""
        if reuse is not None and self.info.prefix_reuse:
            return prefix_rewards(self.model, rows, self._pad_id, reuse)
        rewards = row_rewards(self.model, [ids for ids, _ in rows], self._pad_id, self._logits)
        if self.info.kind == "sequence":
            return [on_last_token(float(r), n) for r, (_, n) in zip(rewards, rows,
                                                                    strict=True)]
        return [rewards[i, len(row) - n:len(row)].copy() for i, (row, n) in enumerate(rows)]

    def score_texts(self, items: Sequence[tuple[str, str]], batch_size: int = 64
                    ) -> list[Scored]:
        """Rewards of (prompt, response) items, encoded and fitted as the server does."""
        out: list[Scored] = []
        for start in range(0, len(items), batch_size):
            chunk = [self.encode(p, r) for p, r in items[start:start + batch_size]]
            fitted = [fit(e.prompt_ids, e.response_ids, self.info.max_len) for e in chunk]
            rewards = self.score([(p + r, len(r)) for p, r, _ in fitted])
            out += [Scored(rw, e.offsets[:len(r)], r)
                    for e, (_, r, _), rw in zip(chunk, fitted, rewards, strict=True)]
        return out
