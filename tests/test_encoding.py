"""Encoding (prompt, response) like the server, and fitting it into the model's length."""

from tokenrm.core.encoding import encode, fit


def test_prompt_gets_bos_and_response_gets_nothing(tokenizer) -> None:
    enc = encode(tokenizer, "Who is Ana?", "Ana lives in Lima.")
    assert enc.prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in enc.response_ids
    assert enc.input_ids == enc.prompt_ids + enc.response_ids
    assert tokenizer.decode(enc.response_ids) == "Ana lives in Lima."


def test_offsets_point_into_the_response(tokenizer) -> None:
    response = "Ana lives in Lima."
    enc = encode(tokenizer, "Who is Ana?", response)
    assert len(enc.offsets) == len(enc.response_ids)
    pieces = [response[a:b] for a, b in enc.offsets]
    assert "".join(pieces).replace(" ", "") == response.replace(" ", "")


def test_fit_leaves_short_input_alone() -> None:
    assert fit([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5], False)


def test_fit_drops_prompt_tokens_from_the_left() -> None:
    assert fit([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6], False)


def test_fit_cuts_a_response_that_alone_is_too_long() -> None:
    assert fit([1, 2], [3, 4, 5, 6], 3) == ([], [3, 4, 5], True)
    assert fit([1, 2], [3, 4, 5], 3) == ([], [3, 4, 5], False)
