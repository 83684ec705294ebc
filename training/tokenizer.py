"""A byte-level BPE tokenizer trained on the task's own corpus, saved with the checkpoint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train BPE on `texts`; encoding with special tokens prepends BOS, as Llama's does."""
    tok = Tokenizer(models.BPE())
    # Byte level: every string encodes (no unknown token) and offsets map back to characters.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens' ids: equal fingerprints
    mean that token ids mean the same tokens, so two models can exchange ids."""
    specials = {name: getattr(tokenizer, f"{name}_token_id", None)
                for name in ("bos", "eos", "pad", "unk")}
    text = json.dumps([sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), specials])
    return hashlib.sha256(text.encode()).hexdigest()
