"""The tokenizer fingerprint: whether two models' token ids mean the same tokens (torch-free)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens' ids: equal fingerprints
    mean that token ids mean the same tokens, so two models can exchange ids. `tokenizer`: a
    Hugging Face tokenizer (anything with get_vocab() and the *_token_id attributes)."""
    specials = {name: getattr(tokenizer, f"{name}_token_id", None)
                for name in ("bos", "eos", "pad", "unk")}
    text = json.dumps([sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), specials])
    return hashlib.sha256(text.encode()).hexdigest()
