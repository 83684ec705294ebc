"""tokenrm.core: what training and serving share (encoding, the reward rule, logits to rewards,
the tokenizer fingerprint, span alignment). Imports nothing else of tokenrm.

torch-free modules (the light client may import them): segments, spans, tokenizer.
"""
