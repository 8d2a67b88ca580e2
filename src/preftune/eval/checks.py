"""The rule judge's answer checks: a table from a row's ``meta["check"]`` kind to a function that says
whether a free-form response gets ``meta["answer"]`` right. No models and no judging of pairs here
(the ``rule`` judge in judges.py turns two checks into a verdict)."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable

NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
"""A number as written in a reply: ``19``, ``-4``, ``5,000``, ``2.5``; not the ``7`` in ``x7``."""
CUE = re.compile(r"(?:=|\bequals?\b|\bis\b|\bare\b|\banswer:?)\s*(?:about\s+)?", re.IGNORECASE)
"""Words after which a reply states its answer (``= 19``, ``is 19``, ``answer: 19``)."""
TOKEN = re.compile(r"-?\d+(?:\.\d+)?|[^\W\d_]+")
WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"once": 1, "twice": 2}
"""Spelled-out small numbers, read only from a reply that has no digits."""
MAX_LIST_ITEM_WORDS = 3


def _fold(text: str) -> str:
    """Case- and accent-insensitive form: ``Bogotá`` -> ``bogota``."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _same(answer: str, value: object) -> bool:
    """``value`` states ``answer``: numerically equal for numbers, else equal ignoring case and accents."""
    a, v = _to_float(answer), _to_float(str(value)) if not isinstance(value, bool) else None
    if a is not None and v is not None:
        return a == v
    return _fold(str(value)).strip(" .") == _fold(answer).strip(" .")


def numbers(response: str) -> list[float]:
    """The numbers in a reply, in order (spelled-out 0-20 when it has no digits)."""
    found = [float(m.group().replace(",", "")) for m in NUMBER.finditer(response)]
    if found:
        return found
    return [float(NUMBER_WORDS[w]) for w in re.findall(r"[a-z]+", response.lower()) if w in NUMBER_WORDS]


def stated_numbers(response: str) -> set[float]:
    """Where a reply states its answer: its first and last number, and every number right after a cue
    (``=``, ``is``, ``equals``, ``answer:``)."""
    found = numbers(response)
    stated = {found[0], found[-1]} if found else set()
    for m in CUE.finditer(response):
        after = NUMBER.match(response, m.end())
        if after:
            stated.add(float(after.group().replace(",", "")))
    return stated


def check_number(answer: str, response: str) -> bool:
    """The expected number is the reply's first or last number, or follows ``=``/``is``/``answer:``."""
    expected = _to_float(answer)
    return expected is not None and expected in stated_numbers(response)


def check_list_order(answer: str, response: str) -> bool:
    """Every item of ``answer`` (comma-separated) appears in the reply, in exactly that order and
    with no other item of the list in between (case-insensitive; other words are ignored)."""
    items = [_fold(x.strip()) for x in answer.split(",") if x.strip()]
    wanted = set(items)
    seen = [t for t in (_fold(t) for t in TOKEN.findall(response)) if t in wanted]
    numeric = all(_to_float(x) is not None for x in items)
    if numeric:
        items = [str(float(x)) for x in items]
        seen = [str(float(t)) for t in seen]
    return any(seen[i:i + len(items)] == items for i in range(len(seen) - len(items) + 1))


def check_contains(answer: str, response: str) -> bool:
    """The answer appears as whole words, ignoring case and accents (``Canberra`` in "It is canberra.")."""
    return re.search(rf"(?<!\w){re.escape(_fold(answer))}(?!\w)", _fold(response)) is not None


def check_uppercase(answer: str, response: str) -> bool:
    """Every letter of the reply is uppercase and the reply contains the answer."""
    letters = [c for c in response if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters) and check_contains(answer, response)


def _json_object(response: str) -> dict | None:
    """The JSON object in a reply (code fences and text around it allowed), or None."""
    start, end = response.find("{"), response.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(response[start:end + 1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def check_json_answer(answer: str, response: str) -> bool:
    """The reply holds a valid JSON object whose ``"answer"`` is the expected answer."""
    obj = _json_object(response)
    return obj is not None and "answer" in obj and _same(answer, obj["answer"])


def check_word_count(answer: str, response: str) -> bool:
    """The reply has exactly ``answer`` words (punctuation ignored; "don't" is one word)."""
    return len(WORD.findall(response)) == int(answer)


def check_comma_list(answer: str, response: str) -> bool:
    """The reply is one line of exactly ``answer`` comma-separated items, each a short phrase."""
    text = response.strip().rstrip(".")
    if not text or "\n" in text:
        return False
    items = [x.strip() for x in text.split(",")]
    return len(items) == int(answer) and all(0 < len(WORD.findall(x)) <= MAX_LIST_ITEM_WORDS for x in items)


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "number": check_number,
    "list_order": check_list_order,
    "contains": check_contains,
    "uppercase": check_uppercase,
    "json_answer": check_json_answer,
    "word_count": check_word_count,
    "comma_list": check_comma_list,
}
"""Check kind (``meta["check"]``) -> ``fn(answer, response) -> bool``."""


def checkable(meta: dict | None) -> bool:
    """The row names a known check kind and carries an expected answer."""
    return bool(meta) and meta.get("check") in CHECKS and isinstance(meta.get("answer"), str)


def check(meta: dict | None, response: str) -> bool | None:
    """Whether ``response`` gets the row's answer right; None when the row has nothing to check."""
    if not checkable(meta):
        return None
    return CHECKS[meta["check"]](meta["answer"], response)
