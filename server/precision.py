"""The dtype a model serves in: "auto" takes bf16 where the hardware runs it natively, and any
lower precision is kept only if it gives float32's rewards on probe batches.

On a CPU with avx512_bf16 or AMX, or a CUDA GPU with bf16, a bf16 forward runs faster than
float32 (measured 1.46x on a 25M-parameter model on 2 cores with avx512_bf16). int8 (dynamic
quantization of the Linear layers, CPU only) is opt-in. A candidate is compared with the
float32 model on probe batches of random token ids; past TOLERANCE the server keeps float32
and says so in one log line.
"""

from __future__ import annotations

import copy
import logging
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from tokenrm.core.scoring import padded_batch, row_rewards

log = logging.getLogger(__name__)
TOLERANCE = 0.02                                      # max |reward - float32's|
PROBES = ((48, 5, 130, 17), (256, 9), (1, 64, 31))    # lengths of the probe batches' rows
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES, "int8")


@dataclass(frozen=True)
class Precision:
    dtype: str                   # what serves: float32, bfloat16, float16 or int8
    delta: float | None          # max |reward - float32's| on the probes; None: not checked


def native_bf16(device: str) -> bool:
    """Does the device run bf16 matmuls natively (not by converting to float32)?"""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def convert(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """A copy of the float32 `model` in `dtype` (int8: its Linear layers quantized)."""
    if dtype == "int8":
        with warnings.catch_warnings():  # torch.ao's note that torchao will replace it
            warnings.filterwarnings("ignore", ".*quantized tensor creation functions",
                                    UserWarning)
            return torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    return copy.deepcopy(model).to(DTYPES[dtype])


def max_delta(reference: PreTrainedModel, candidate: PreTrainedModel, pad_id: int,
              vocab_size: int) -> float:
    """Max |reward difference| of two models over the real tokens of the probe batches."""
    rng = random.Random(0)
    worst = 0.0
    for lengths in PROBES:
        rows = [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]
        _, mask = padded_batch(rows, pad_id)
        want = row_rewards(reference, rows, pad_id)
        got = row_rewards(candidate, rows, pad_id)
        if want.ndim == 2:  # token rewards: the padding columns do not count
            want, got = want[mask.bool().numpy()], got[mask.bool().numpy()]
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def choose(model: PreTrainedModel, requested: str, device: str, pad_id: int,
           vocab_size: int) -> tuple[PreTrainedModel, Precision]:
    """The model to serve and its precision. `model` is float32 on `device`; a forced bf16 or
    fp16 is converted unchecked; "auto" and "int8" are checked against it."""
    if requested == "float32" or (requested == "auto" and not native_bf16(device)):
        if requested == "auto":
            log.info("dtype auto: float32 (no native bf16 on %s)", device)
        return model, Precision("float32", None)
    if requested in ("bfloat16", "float16"):
        return model.to(DTYPES[requested]), Precision(requested, None)
    candidate_dtype = "bfloat16" if requested == "auto" else requested
    candidate = convert(model, candidate_dtype)
    delta = max_delta(model, candidate, pad_id, vocab_size)
    if delta > TOLERANCE:
        # auto falling back is what it is for (info); an int8 that was asked for is refused
        log.log(logging.INFO if requested == "auto" else logging.WARNING,
                "dtype %s: %s gives rewards up to %.4f from float32's on probe batches "
                "(limit %g): serving float32", requested, candidate_dtype, delta, TOLERANCE)
        return model, Precision("float32", None)
    log.info("dtype %s: %s, rewards within %.4f of float32's on probe batches", requested,
             candidate_dtype, delta)
    return candidate, Precision(candidate_dtype, delta)
