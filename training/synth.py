"""A synthetic minimal-edit task with an oracle: questions about a generated world of people.

The prompt lists a person's facts and asks about them. A correct response restates some of the
facts, one sentence each, and may work out their age in some years. A rejected response carries
one or more errors, each fixable by a minimal edit:

- wrong_fact:  a city, job, pet or age that contradicts the prompt;
- wrong_math:  the age in N years, added up wrongly;
- rude:        a rude sentence;
- stutter:     a few words of a sentence said again and again ("is 19 is 19 is 19"), the
               degenerate text a policy farming positive token rewards writes;
- repeated:    a sentence said a second time;
- off_topic:   a true fact about somebody else.

No word list solves it: a wrong fact is a word that is right in another prompt, and an
off-topic or repeated sentence is only wrong in its context. `judge` finds the errors of any
response to a prompt of this task.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from tokenrm.training.data import ErrorSpan, Pair

CITIES = ("Lima", "Oslo", "Cairo", "Quito", "Dakar", "Hanoi", "Porto", "Riga", "Tunis", "Perth",
          "Turin", "Bergen", "Kyoto", "Malaga", "Nantes", "Bremen", "Cusco", "Tallinn", "Lusaka",
          "Denver", "Austin", "Geneva", "Krakow", "Seville", "Toledo", "Bilbao", "Dublin",
          "Zagreb", "Sofia", "Vilnius")
JOBS = ("baker", "nurse", "pilot", "teacher", "farmer", "lawyer", "painter", "plumber", "dentist",
        "chemist", "butcher", "tailor", "writer", "surgeon", "banker", "sailor", "potter", "miner",
        "doctor", "gardener", "carpenter", "jeweler", "mechanic", "librarian", "florist",
        "cashier", "waiter", "tutor", "welder", "drummer")
PETS = ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "lizard", "pony",
        "ferret", "canary", "snake", "tortoise", "gecko", "hedgehog")
AGES = range(18, 80)
YEARS = (2, 5, 10)
RUDE = ("Honestly, that is a silly question.", "You could have looked that up yourself.",
        "Only a fool would ask that.", "Try to keep up.", "What a boring thing to ask.",
        "I should not have to explain this.", "Pay attention this time.")
QUESTIONS = ("What do you know about {}?", "Tell me about {}.", "Who is {}?",
             "Describe {} for me.")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st",
           "tr", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")

# One template per attribute; the prompt's facts and the responses use the same sentences.
TEMPLATES = {
    "age": "{name} is {value} years old.",
    "city": "{name} lives in {value}.",
    "job": "{name} works as a {value}.",
    "pet": "{name} has a {value}.",
}
ATTRIBUTES = tuple(TEMPLATES)
_VALUES = {"age": [str(a) for a in AGES], "city": CITIES, "job": JOBS, "pet": PETS}
_FUTURE = "In {years} years {name} will be {value}."
ERROR_KINDS = ("wrong_fact", "wrong_math", "stutter", "rude", "repeated", "off_topic")
# Each kind is tried this many times per response, each try applied with this probability.
# Dense wrong facts matter: with few of them, a small model never learns to look values up.
ERROR_TRIES = {"wrong_fact": 4, "wrong_math": 1, "stutter": 1, "rude": 1, "repeated": 1,
               "off_topic": 1}
ERROR_RATES = {"wrong_fact": 0.5, "wrong_math": 0.3, "stutter": 0.2, "rude": 0.1,
               "repeated": 0.15, "off_topic": 0.15}
MAX_STUTTER = 6  # extra copies of the stuttered words
FUTURE_RATE = 0.6  # share of responses giving the age in some years, when they give the age


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]  # attribute -> value, as written in sentences


@dataclass
class _Sentence:
    """A response sentence; `value` is the character span of its value inside `text`."""

    text: str
    value: tuple[int, int] | None = None
    error: str | None = None  # the error kind, if this sentence is wrong
    fixed: str | None = None  # the edited text of a wrong sentence; None: the edit deletes it


def _fill(template: str, name: str, value: str, **extra: object) -> _Sentence:
    head = template.split("{value}")[0].format(name=name, **extra)
    text = template.format(name=name, value=value, **extra)
    return _Sentence(text, (len(head), len(head) + len(value)))


def make_world(rng: random.Random, n_people: int) -> list[Person]:
    """People with distinct made-up names and random attributes."""
    names: set[str] = set()
    while len(names) < n_people:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3))]
        names.add("".join(parts).capitalize())
    return [Person(name, {a: rng.choice(_VALUES[a]) for a in ATTRIBUTES})
            for name in sorted(names)]


def make_prompt(rng: random.Random, subject: Person) -> str:
    facts = " ".join(_fill(TEMPLATES[a], subject.name, subject.facts[a]).text for a in ATTRIBUTES)
    return f"Facts: {facts} Question: {rng.choice(QUESTIONS).format(subject.name)}"


def _correct_sentences(rng: random.Random, p: Person) -> list[_Sentence]:
    attrs = rng.sample(ATTRIBUTES, rng.randint(2, 4))
    sentences = [_fill(TEMPLATES[a], p.name, p.facts[a]) for a in attrs]
    if "age" in attrs and rng.random() < FUTURE_RATE:
        years = rng.choice(YEARS)
        future = str(int(p.facts["age"]) + years)
        sentences.insert(attrs.index("age") + 1,
                         _fill(_FUTURE, p.name, future, years=years))
    return sentences


def _corrupt(rng: random.Random, sentences: list[_Sentence], kind: str, subject: Person,
             other: Person) -> bool:
    """Apply one error of `kind` in place; False if this response has no room for it."""
    clean = [s for s in sentences if s.error is None]
    if kind in ("wrong_fact", "wrong_math"):
        is_math = kind == "wrong_math"
        targets = [s for s in clean if s.value and s.text.startswith("In ") == is_math]
        if not targets:
            return False
        s = rng.choice(targets)
        assert s.value is not None
        a, b = s.value
        right = s.text[a:b]
        if is_math:
            wrong = str(int(right) + rng.choice((-10, -2, -1, 1, 2, 10)))
        else:
            attr = next(k for k in ATTRIBUTES if s.text == _fill(
                TEMPLATES[k], subject.name, right).text)
            wrong = rng.choice([v for v in _VALUES[attr] if v != right])
        s.fixed, s.text, s.error = s.text, s.text[:a] + wrong + s.text[b:], kind
        s.value = (a, a + len(wrong))
        return True
    if kind == "stutter":
        return _stutter(rng, [s for s in clean if s.value])
    if kind == "rude":
        new = _Sentence(rng.choice(RUDE), error=kind)
    elif kind == "off_topic":
        attr = rng.choice(ATTRIBUTES)
        new = _Sentence(_fill(TEMPLATES[attr], other.name, other.facts[attr]).text, error=kind)
    else:  # repeated: a copy of an earlier, correct sentence
        i = rng.randrange(len(sentences))
        if sentences[i].error is not None:
            return False
        new = _Sentence(sentences[i].text, error=kind)
        sentences.insert(rng.randint(i + 1, len(sentences)), new)
        return True
    # Never first: the edit then only deletes the sentence and its leading space.
    sentences.insert(rng.randint(1, len(sentences)), new)
    return True


def _stutter(rng: random.Random, targets: list[_Sentence]) -> bool:
    """Say a sentence's value (alone, or with the word before it) again, 1-MAX_STUTTER times."""
    if not targets:
        return False
    s = rng.choice(targets)
    assert s.value is not None
    a, b = s.value
    start = s.text.rindex(" ", 0, a - 1) if rng.random() < 0.7 else a - 1
    extra = s.text[start:b] * rng.randint(1, MAX_STUTTER)
    s.fixed, s.text, s.error = s.text, s.text[:b] + extra + s.text[b:], "stutter"
    s.value = (b, b + len(extra))
    return True


def _join(sentences: list[_Sentence], edited: bool) -> tuple[str, list[ErrorSpan]]:
    text, spans = "", []
    for s in sentences:
        if s.error is None:
            piece = s.text
        elif edited:
            if s.fixed is None:
                continue
            piece = s.fixed
        else:
            piece = s.text
            start = len(text) + (1 if text else 0)
            a, b = s.value if s.fixed is not None and s.value else (0, len(piece))
            spans.append(ErrorSpan(s.error, start + a, start + b))
        text = f"{text} {piece}" if text else piece
    return text, spans


def make_pair(rng: random.Random, world: list[Person], pair_id: str) -> Pair:
    subject, other = rng.sample(world, 2)
    prompt = make_prompt(rng, subject)
    sentences = _correct_sentences(rng, subject)
    # In ERROR_KINDS order: values change before a sentence can be repeated.
    applied = [kind for kind in ERROR_KINDS for _ in range(ERROR_TRIES[kind])
               if rng.random() < ERROR_RATES[kind]
               and _corrupt(rng, sentences, kind, subject, other)]
    if not applied:  # an insertion always finds room
        _corrupt(rng, sentences, rng.choice(("rude", "repeated", "off_topic")), subject, other)
    rejected, spans = _join(sentences, edited=False)
    edited, _ = _join(sentences, edited=True)
    return Pair(prompt, rejected, edited, id=pair_id, errors=tuple(spans))


def generate(seed: int, n: int, n_people: int = 20000) -> Iterator[Pair]:
    """`n` pairs, a deterministic function of `seed`."""
    rng = random.Random(seed)
    world = make_world(rng, n_people)
    for i in range(n):
        yield make_pair(rng, world, f"{seed}-{i}")


# --- the oracle judge -------------------------------------------------------------------

_FACT_RES = {a: re.compile(re.escape(t).replace(r"\{name\}", r"(?P<name>[A-Z][a-z]+)")
                           .replace(r"\{value\}", r"(?P<value>\w+)") + "$")
             for a, t in TEMPLATES.items()}
_FUTURE_RE = re.compile(r"In (?P<years>\d+) years (?P<name>[A-Z][a-z]+) will be (?P<value>\d+)\.$")
_QUESTION_RE = re.compile("|".join(re.escape(q).replace(r"\{\}", f"(?P<s{i}>[A-Z][a-z]+)")
                                   for i, q in enumerate(QUESTIONS)))
_SENTENCE_RE = re.compile(r"[^.!?\s][^.!?]*[.!?]?")
_STUTTER_RE = re.compile(r"((?: \w+)+?)\1+\b")  # words said again right after themselves


def parse_prompt(prompt: str) -> tuple[str, dict[str, dict[str, str]]]:
    """Return (the person asked about, everyone's facts) from a prompt of this task."""
    facts: dict[str, dict[str, str]] = {}
    for m in _SENTENCE_RE.finditer(prompt.removeprefix("Facts: ")):
        for attr, pattern in _FACT_RES.items():
            if fm := pattern.match(m.group()):
                facts.setdefault(fm["name"], {})[attr] = fm["value"]
    q = _QUESTION_RE.search(prompt)
    if q is None:
        raise ValueError("not a prompt of this task: no question found")
    subject = next(v for v in q.groupdict().values() if v)
    return subject, facts


def _check(sentence: str, subject: str, facts: dict[str, dict[str, str]]
           ) -> tuple[str, int, int] | None:
    """The error in one sentence, as (kind, start, end) within it; None if it is right."""
    whole = ("off_topic", 0, len(sentence))
    if m := _FUTURE_RE.match(sentence):
        if m["name"] != subject:
            return whole
        right = str(int(facts[subject]["age"]) + int(m["years"]))
        return None if m["value"] == right else ("wrong_math", *m.span("value"))
    for attr, pattern in _FACT_RES.items():
        if m := pattern.match(sentence):
            if m["name"] != subject:
                return whole
            if facts[subject].get(attr) == m["value"]:
                return None
            return "wrong_fact", *m.span("value")
    return ("rude", 0, len(sentence)) if sentence in RUDE else whole


def judge(prompt: str, response: str) -> list[ErrorSpan]:
    """Every error in `response` (any text) to a prompt of this task, as character spans."""
    subject, facts = parse_prompt(prompt)
    errors, seen = [], set()
    for m in _SENTENCE_RE.finditer(response):
        sentence = m.group().rstrip()
        if sentence in seen:
            errors.append(ErrorSpan("repeated", m.start(), m.start() + len(sentence)))
            continue
        seen.add(sentence)
        if stutter := _STUTTER_RE.search(sentence):
            a = stutter.start() + len(stutter.group(1))
            errors.append(ErrorSpan("stutter", m.start() + a, m.start() + stutter.end()))
            sentence = sentence[:a] + sentence[stutter.end():]
        if found := _check(sentence, subject, facts):
            kind, a, b = found
            errors.append(ErrorSpan(kind, m.start() + a, m.start() + b))
    return errors



def correct_facts(prompt: str, response: str) -> int:
    """How many sentences of `response` state a fact about the person asked about, correctly."""
    subject, facts = parse_prompt(prompt)
    return sum(_check(m.group().rstrip(), subject, facts) is None
               for m in _SENTENCE_RE.finditer(response))
