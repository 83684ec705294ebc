"""Token labels from a minimal edit, on hand-written token sequences."""

from tokenrm.training.labels import NEGATIVE as N
from tokenrm.training.labels import NEUTRAL as O
from tokenrm.training.labels import POSITIVE as P
from tokenrm.training.labels import edit_labels


def test_substitution_marks_both_sides() -> None:
    assert edit_labels([1, 2, 3, 4], [1, 2, 9, 4]) == ([O, O, N, O], [O, O, P, O])


def test_insertion_marks_only_the_edited_side() -> None:
    assert edit_labels([1, 2, 3], [1, 2, 7, 8, 3]) == ([O, O, O], [O, O, P, P, O])


def test_deletion_marks_only_the_rejected_side() -> None:
    assert edit_labels([1, 2, 7, 8, 3], [1, 2, 3]) == ([O, O, N, N, O], [O, O, O])


def test_several_edits() -> None:
    rejected = [1, 5, 2, 3, 6, 6, 4, 9]
    edited = [1, 2, 3, 7, 4]
    assert edit_labels(rejected, edited) == ([O, N, O, O, N, N, O, N], [O, O, O, P, O])


def test_identical_responses_are_all_neutral() -> None:
    assert edit_labels([4, 5, 6], [4, 5, 6]) == ([O, O, O], [O, O, O])


def test_edits_at_start_and_end() -> None:
    assert edit_labels([9, 1, 2, 3], [1, 2, 3, 8]) == ([N, O, O, O], [O, O, O, P])
    assert edit_labels([9, 2, 8], [7, 2, 6]) == ([N, O, N], [P, O, P])


def test_empty_sides() -> None:
    assert edit_labels([], [1, 2]) == ([], [P, P])
    assert edit_labels([1, 2], []) == ([N, N], [])
    assert edit_labels([], []) == ([], [])


def test_frequent_tokens_are_not_junked() -> None:
    # difflib's autojunk would ignore a token that fills >1% of a long sequence.
    rejected = [0, 5] * 150
    edited = [0, 5] * 75 + [0, 6] + [0, 5] * 74
    rej, edi = edit_labels(rejected, edited)
    assert rej.count(N) == 1 and rej[151] == N
    assert edi.count(P) == 1 and edi[151] == P


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_whitespace_only_edit() -> None:
    rej, edi = edit_labels(_bytes("Ana  lives"), _bytes("Ana lives"))
    assert rej.count(N) == 1 and N in rej[3:5]  # one of the two spaces
    assert edi == [O] * len("Ana lives")


def test_non_ascii_text() -> None:
    rejected, edited = _bytes("Zoë lives in Köln."), _bytes("Zoë lives in Łódź.")
    rej, edi = edit_labels(rejected, edited)
    changed_rej = bytes(t for t, lab in zip(rejected, rej, strict=True) if lab == N)
    changed_edi = bytes(t for t, lab in zip(edited, edi, strict=True) if lab == P)
    assert rej[: len(_bytes("Zoë lives in "))] == [O] * len(_bytes("Zoë lives in "))
    assert changed_rej and changed_edi
    # Every changed byte belongs to the city names, never to the shared text.
    assert set(changed_rej) <= set("Köln".encode()) and set(changed_edi) <= set("Łódź".encode())


def test_with_a_trained_tokenizer(tokenizer) -> None:
    rejected = tokenizer("Ana lives in Lima.", add_special_tokens=False)["input_ids"]
    edited = tokenizer("Ana lives in Oslo.", add_special_tokens=False)["input_ids"]
    rej, edi = edit_labels(rejected, edited)
    assert rej[-1] == O and edi[-1] == O  # the full stop is shared
    assert N in rej and P in edi
