"""The model as a TorchScript trace: one C++ call per forward instead of hundreds of Python ones.

The eager forward of a small model spends most of a millisecond in Python per call and takes
the GIL back after every op, so beside a busy event loop its ops queue for the GIL (measured
here: a 64 x 36-token batch on one thread took 18 ms alone and 1.7 s beside a Python thread
that never sleeps; traced, 38 ms). A trace is kept only if, on probe batches of other shapes
than the one it was traced on, it gives the eager model's logits; otherwise the eager model
serves, with a warning. The trace shares the model's weights (no copy).
"""

from __future__ import annotations

import logging
import random
import warnings

import torch
from transformers import PreTrainedModel

from tokenrm.core.scoring import Logits, padded_batch

log = logging.getLogger(__name__)
EXAMPLE = (7, 5)                              # lengths of the batch the trace is recorded on
PROBES = ((1,), (3, 17, 9), (64, 2, 40, 1))   # other shapes it must then reproduce
TOLERANCE = 1e-5


class _LogitsOf(torch.nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def traced_logits(model: PreTrainedModel, pad_id: int, vocab_size: int) -> Logits | None:
    """The traced forward, or None (and a warning) if it cannot be traced or differs."""
    device = next(model.parameters()).device
    rng = random.Random(0)

    def batch(lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]
        ids, mask = padded_batch(rows, pad_id)
        return ids.to(device), mask.to(device)

    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records
            traced = torch.jit.trace(_LogitsOf(model).eval(), batch(EXAMPLE), check_trace=False)
            for lengths in PROBES:
                ids, mask = batch(lengths)
                want = model(input_ids=ids, attention_mask=mask).logits
                got = traced(ids, mask)
                if want.dim() == 3:  # token heads: padding positions may differ, and do not count
                    want, got = want[mask.bool()], got[mask.bool()]
                if got.shape != want.shape or not torch.allclose(got, want, atol=TOLERANCE,
                                                                 rtol=0):
                    log.warning("the traced model differs from the eager one on a batch of "
                                "lengths %s: serving the eager model", lengths)
                    return None
    except Exception as exc:  # any tracer failure means the same: serve eagerly
        log.warning("cannot trace the model (%s: %s): serving the eager model",
                    type(exc).__name__, exc)
        return None
    result: Logits = traced
    return result
