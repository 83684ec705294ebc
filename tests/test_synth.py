"""The synthetic minimal-edit task: a deterministic generator and an oracle judge that agree."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tokenrm.training.data import ErrorSpan, Pair
from tokenrm.training.synth import (
    ERROR_KINDS,
    RUDE,
    Person,
    generate,
    judge,
    make_prompt,
    parse_prompt,
)

ANA = Person("Ana", {"age": "30", "city": "Lima", "job": "baker", "pet": "cat"})
BORIS = Person("Boris", {"age": "45", "city": "Oslo", "job": "nurse", "pet": "dog"})


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return list(generate(7, 2000))


@pytest.fixture(scope="module")
def prompt() -> str:
    """A prompt about Ana."""
    return make_prompt(random.Random(0), ANA)


def _span(response: str, part: str, kind: str, occurrence: int = 1) -> ErrorSpan:
    """The ErrorSpan of the `occurrence`-th `part` in `response`."""
    start = -1
    for _ in range(occurrence):
        start = response.index(part, start + 1)
    return ErrorSpan(kind, start, start + len(part))


def test_generate_is_deterministic_in_the_seed() -> None:
    assert list(generate(1, 50)) == list(generate(1, 50))
    assert list(generate(1, 50)) != list(generate(2, 50))


def test_judge_finds_exactly_the_generated_errors(pairs: list[Pair]) -> None:
    for pair in pairs:
        assert judge(pair.prompt, pair.rejected) == list(pair.errors), pair


def test_judge_finds_no_error_in_the_edited_response(pairs: list[Pair]) -> None:
    for pair in pairs:
        assert judge(pair.prompt, pair.edited) == [], pair


def test_every_pair_has_an_edit_and_errors_inside_rejected(pairs: list[Pair]) -> None:
    for pair in pairs:
        assert pair.rejected != pair.edited
        assert pair.errors
        for e in pair.errors:
            assert 0 <= e.start < e.end <= len(pair.rejected), pair


def test_all_error_kinds_occur(pairs: list[Pair]) -> None:
    kinds = Counter(e.kind for pair in pairs for e in pair.errors)
    assert set(kinds) == set(ERROR_KINDS)


def test_prompt_is_parsed_back(prompt: str) -> None:
    assert parse_prompt(prompt) == ("Ana", {"Ana": ANA.facts})


def test_correct_response_has_no_errors(prompt: str) -> None:
    response = ("Ana is 30 years old. In 5 years Ana will be 35. Ana lives in Lima. "
                "Ana works as a baker. Ana has a cat.")
    assert judge(prompt, response) == []


def test_wrong_city_is_a_wrong_fact_on_the_city(prompt: str) -> None:
    response = "Ana works as a baker. Ana lives in Cairo."
    assert judge(prompt, response) == [_span(response, "Cairo", "wrong_fact")]


def test_wrong_future_age_is_wrong_math_on_the_number(prompt: str) -> None:
    response = "Ana is 30 years old. In 5 years Ana will be 36."
    assert judge(prompt, response) == [_span(response, "36", "wrong_math")]


def test_sentence_said_twice_is_repeated_the_second_time(prompt: str) -> None:
    response = "Ana lives in Lima. Ana has a cat. Ana lives in Lima."
    assert judge(prompt, response) == [_span(response, "Ana lives in Lima.", "repeated", 2)]


@pytest.mark.parametrize(("response", "stutter"), [
    ("Ana is 30 is 30 is 30 years old.", " is 30 is 30"),
    ("Ana has a cat cat cat cat.", " cat cat cat"),
    ("Ana lives in Lima in Lima.", " in Lima"),
])
def test_words_said_again_and_again_are_a_stutter(prompt: str, response: str,
                                                  stutter: str) -> None:
    """What a policy farming positive token rewards writes; the rest of the sentence is
    judged as if the repeats were not there."""
    start = response.rindex(stutter)  # the repeats, after the first saying
    assert judge(prompt, response) == [ErrorSpan("stutter", start, start + len(stutter))]
    assert judge(prompt, "Ana is 31 31 years old.") == [
        ErrorSpan("stutter", 9, 12), ErrorSpan("wrong_fact", 7, 9)]


def test_fact_about_somebody_else_is_off_topic(prompt: str) -> None:
    response = "Ana lives in Lima. Boris has a dog."
    assert judge(prompt, response) == [_span(response, "Boris has a dog.", "off_topic")]


def test_rude_sentence_is_rude(prompt: str) -> None:
    response = f"Ana has a cat. {RUDE[0]}"
    assert judge(prompt, response) == [_span(response, RUDE[0], "rude")]


def test_unrelated_sentence_is_off_topic(prompt: str) -> None:
    response = "Ana has a cat. The weather is nice today."
    assert judge(prompt, response) == [_span(response, "The weather is nice today.",
                                             "off_topic")]


def test_same_sentence_is_right_or_wrong_depending_on_the_prompt() -> None:
    """Not a word list: 'Ana lives in Lima.' is judged against the prompt's facts."""
    sentence = "Ana lives in Lima."
    in_lima = make_prompt(random.Random(1), ANA)
    in_oslo = make_prompt(random.Random(1), Person("Ana", {**ANA.facts, "city": "Oslo"}))
    assert judge(in_lima, sentence) == []
    assert judge(in_oslo, sentence) == [_span(sentence, "Lima", "wrong_fact")]


def test_parse_prompt_rejects_a_prompt_of_another_task() -> None:
    with pytest.raises(ValueError):
        parse_prompt("Where does Ana live?")
