"""The generated part of the embedded preference data: seeded pairs on tasks whose answer a program can
check (arithmetic, counting, sorting, unit conversion, table facts, format instructions), and
``build_embedded`` which adds the hand-written pairs and writes the shipped train/test files
(regenerate them with ``python -m preftune.data.synth``). Checking a response lives in
``preftune.eval.checks``; reading data files lives in ``data/sources.py``."""

from __future__ import annotations

import importlib.resources
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import DataError

EMBEDDED_N = 480
"""Generated pairs in the shipped data (``generate(EMBEDDED_N, EMBEDDED_SEED)``)."""
EMBEDDED_SEED = 0
TEST_FRACTION = 0.2
"""Share of each category that goes to ``prefs_test.jsonl``."""
SPLIT_SEED = 1234
HAND_FILE = "hand_pairs.jsonl"
MAX_DRAWS = 50
"""Redraws of a category's task before a duplicate prompt is accepted as an error."""


@dataclass
class Task:
    """One checkable question: the correct reply, and flawed replies keyed by flaw kind."""

    prompt: str
    chosen: str
    answer: str
    check: str
    flaws: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------- tables written for this project

CAPITALS: dict[str, tuple[str, str]] = {
    # country -> (capital, a plausible wrong answer: usually the largest or best-known other city)
    "Australia": ("Canberra", "Sydney"), "Canada": ("Ottawa", "Toronto"), "Turkey": ("Ankara", "Istanbul"),
    "Brazil": ("Brasilia", "Rio de Janeiro"), "Switzerland": ("Bern", "Zurich"), "India": ("New Delhi", "Mumbai"),
    "Nigeria": ("Abuja", "Lagos"), "Morocco": ("Rabat", "Casablanca"), "New Zealand": ("Wellington", "Auckland"),
    "Vietnam": ("Hanoi", "Saigon"), "Pakistan": ("Islamabad", "Karachi"), "China": ("Beijing", "Shanghai"),
    "Japan": ("Tokyo", "Osaka"), "Germany": ("Berlin", "Munich"), "Italy": ("Rome", "Milan"),
    "Spain": ("Madrid", "Barcelona"), "France": ("Paris", "Lyon"), "Egypt": ("Cairo", "Alexandria"),
    "Russia": ("Moscow", "Saint Petersburg"), "Argentina": ("Buenos Aires", "Cordoba"),
    "Kenya": ("Nairobi", "Mombasa"), "Colombia": ("Bogota", "Medellin"), "Peru": ("Lima", "Cusco"),
    "Poland": ("Warsaw", "Krakow"), "Portugal": ("Lisbon", "Porto"), "Greece": ("Athens", "Thessaloniki"),
    "Norway": ("Oslo", "Bergen"), "Sweden": ("Stockholm", "Gothenburg"), "Ireland": ("Dublin", "Cork"),
    "South Korea": ("Seoul", "Busan"), "Thailand": ("Bangkok", "Phuket"), "Saudi Arabia": ("Riyadh", "Jeddah"),
    "Chile": ("Santiago", "Valparaiso"), "Austria": ("Vienna", "Salzburg"), "Belgium": ("Brussels", "Antwerp"),
    "Denmark": ("Copenhagen", "Aarhus"), "Ghana": ("Accra", "Kumasi"), "Scotland": ("Edinburgh", "Glasgow"),
}
SYMBOLS: dict[str, tuple[str, str]] = {
    # element -> (symbol, a plausible wrong symbol); single letters that are English words are avoided
    "gold": ("Au", "Go"), "silver": ("Ag", "Si"), "iron": ("Fe", "Ir"), "sodium": ("Na", "So"),
    "potassium": ("K", "Po"), "copper": ("Cu", "Co"), "lead": ("Pb", "Le"), "mercury": ("Hg", "Me"),
    "tin": ("Sn", "Ti"), "zinc": ("Zn", "Zi"), "calcium": ("Ca", "Cl"), "magnesium": ("Mg", "Mn"),
    "chlorine": ("Cl", "Ch"), "neon": ("Ne", "Nn"), "nickel": ("Ni", "Nk"), "platinum": ("Pt", "Pl"),
    "silicon": ("Si", "Sc"), "helium": ("He", "Hl"),
}
MONTH_DAYS: dict[str, int] = {
    "January": 31, "February": 28, "March": 31, "April": 30, "May": 31, "June": 30, "July": 31,
    "August": 31, "September": 30, "October": 31, "November": 30, "December": 31,
}
WORDS = [
    "garden", "banana", "strawberry", "elephant", "computer", "mountain", "library", "pencil", "window",
    "rabbit", "orange", "letter", "balloon", "bottle", "coffee", "planet", "river", "summer", "butterfly",
    "chocolate", "keyboard", "umbrella", "giraffe", "tomato", "kitchen", "parrot", "candle", "blanket",
    "pepper", "yellow", "cherry", "hammer", "bubble", "cotton", "puzzle", "success", "teacher", "bicycle",
]
THINGS: dict[str, list[str]] = {
    "fruits": ["apple", "banana", "cherry", "mango", "pear", "plum", "grape", "peach", "kiwi", "lemon"],
    "colours": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"],
    "animals": ["dog", "cat", "horse", "lion", "tiger", "rabbit", "zebra", "monkey", "sheep", "goat"],
    "vegetables": ["carrot", "potato", "onion", "pea", "cabbage", "spinach", "leek", "turnip", "celery", "kale"],
    "sports": ["football", "tennis", "golf", "rugby", "cricket", "hockey", "boxing", "rowing", "skiing", "judo"],
    "instruments": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "banjo", "oboe"],
}
DESCRIBE: dict[str, list[str]] = {
    "the ocean": ["deep", "blue", "vast", "salty", "restless", "cold", "wild"],
    "the sky": ["blue", "wide", "bright", "open", "endless", "clear", "calm"],
    "a forest": ["green", "quiet", "dense", "shady", "ancient", "lush", "wild"],
    "a desert": ["hot", "dry", "sandy", "empty", "silent", "vast", "harsh"],
    "winter": ["cold", "dark", "snowy", "crisp", "quiet", "long", "frosty"],
    "a city": ["busy", "loud", "crowded", "bright", "fast", "tall", "lively"],
    "coffee": ["hot", "bitter", "dark", "strong", "rich", "fragrant", "smooth"],
    "a cat": ["soft", "curious", "playful", "proud", "quiet", "agile", "sleepy"],
}
UNHELPFUL = [
    "I do not really know the answer to that so you should look it up yourself.",
    "That is hard to say and I cannot help with that question right now.",
    "I am not sure about this and you would be better off searching online.",
    "Why do you want to know that? It does not seem very important to me.",
    "You should really figure that out on your own instead of asking me.",
]
RUDE = [
    "Ugh. That is such an easy question that I will not even bother answering it.",
    "Seriously? Anyone could work that out. Stop wasting my time with this.",
    "What a silly thing to ask. Go and do your own homework instead of bothering me.",
    "I have better things to do than answer basic questions like this.",
]
FLAW_WEIGHTS: dict[str, int] = {"wrong": 8, "format": 8, "unhelpful": 2, "rude": 1}
"""Relative odds of each kind of rejected reply; mostly wrong answers (what a small model can learn)."""


def _ls(items: list) -> str:
    return ", ".join(str(x) for x in items)


def _wrongs(answer: int, deltas: tuple[int, ...], *extra: int) -> list[int]:
    """Plausible wrong values (off-by-one, carry errors, ...), never the answer and never negative."""
    out = [answer + d for d in deltas] + list(extra)
    return sorted({w for w in out if w != answer and w >= 0})


def _pick(rng: random.Random, templates: list[str], **kw: Any) -> str:
    return rng.choice(templates).format(**kw)


def _numeric(prompt: str, chosen_tpl: str, answer: int, wrong: list[int], **kw: Any) -> Task:
    """A task with a numeric answer: the rejected reply is the chosen one with a wrong number."""
    return Task(prompt, chosen_tpl.format(ans=answer, **kw), str(answer), "number",
                {"wrong": [chosen_tpl.format(ans=w, **kw) for w in wrong]})


# ---------------------------------------------------------------- arithmetic


def add(rng: random.Random) -> Task:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    prompt = _pick(rng, ["What is {a} + {b}?", "Calculate {a} plus {b}.", "Add {a} and {b}.",
                         "What is the sum of {a} and {b}?", "Compute {a} + {b}."], a=a, b=b)
    tpl = rng.choice(["{a} + {b} = {ans}.", "The sum of {a} and {b} is {ans}.", "{a} plus {b} equals {ans}."])
    return _numeric(prompt, tpl, a + b, _wrongs(a + b, (1, -1, 10, -10)), a=a, b=b)


def subtract(rng: random.Random) -> Task:
    b = rng.randint(2, 60)
    a = b + rng.choice([d for d in range(1, 61) if d != b])  # a - b == b would make the wrong "b from a" read right
    prompt = _pick(rng, ["What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?",
                         "Take {b} away from {a}. What is left?", "Compute {a} - {b}."], a=a, b=b)
    tpl = rng.choice(["{a} - {b} = {ans}.", "{a} minus {b} is {ans}.", "Taking {b} from {a} leaves {ans}."])
    return _numeric(prompt, tpl, a - b, _wrongs(a - b, (1, -1, 10, -10)), a=a, b=b)


def multiply(rng: random.Random) -> Task:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    prompt = _pick(rng, ["What is {a} × {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
                         "What is the product of {a} and {b}?", "Compute {a} * {b}."], a=a, b=b)
    tpl = rng.choice(["{a} × {b} = {ans}.", "{a} times {b} is {ans}.", "The product of {a} and {b} is {ans}."])
    return _numeric(prompt, tpl, a * b, _wrongs(a * b, (1, -1, a, -a, b, -b)), a=a, b=b)


# ---------------------------------------------------------------- counting


def count_letters(rng: random.Random) -> Task:
    w = rng.choice(WORDS)
    prompt = _pick(rng, ["How many letters are in the word '{w}'?", "Count the letters in '{w}'.",
                         "How long is the word '{w}' in letters?"], w=w)
    tpl = rng.choice(["The word '{w}' has {ans} letters.", "'{w}' has {ans} letters."])
    return _numeric(prompt, tpl, len(w), _wrongs(len(w), (1, -1, 2)), w=w)


def count_letter(rng: random.Random) -> Task:
    w = rng.choice(WORDS)
    c = rng.choice(sorted(set(w)))
    n = w.count(c)
    prompt = _pick(rng, ["How many times does the letter '{c}' appear in '{w}'?",
                         "Count the letter '{c}' in the word '{w}'.",
                         "How many '{c}'s are in the word '{w}'?"], c=c, w=w)
    say = "The letter '{c}' appears {k} {unit} in '{w}'.".format
    wrong = [say(c=c, k=k, unit="time" if k == 1 else "times", w=w) for k in _wrongs(n, (1, -1, 2))]
    return Task(prompt, say(c=c, k=n, unit="time" if n == 1 else "times", w=w), str(n), "number", {"wrong": wrong})


def count_items(rng: random.Random) -> Task:
    pool = THINGS[rng.choice(sorted(THINGS))]
    items = rng.sample(pool, rng.randint(3, 7))
    prompt = _pick(rng, ["How many items are in this list: {xs}?", "Count the items: {xs}.",
                         "How many words are in the list {xs}?"], xs=_ls(items))
    tpl = rng.choice(["There are {ans} items in the list.", "The list has {ans} items."])
    return _numeric(prompt, tpl, len(items), _wrongs(len(items), (1, -1, 2)))


# ---------------------------------------------------------------- sorting

SORTS: dict[str, tuple[list[str], str, bool]] = {
    # direction -> (prompt templates, reply prefix, descending?)
    "ascending": (["Sort these numbers from smallest to largest: {xs}.", "Put {xs} in ascending order.",
                   "Arrange the numbers {xs} from lowest to highest.", "Order these from least to greatest: {xs}."],
                  "Smallest to largest: ", False),
    "descending": (["Sort these numbers from largest to smallest: {xs}.", "Put {xs} in descending order.",
                    "Arrange the numbers {xs} from highest to lowest."], "Largest to smallest: ", True),
    "alphabetical": (["Sort these words alphabetically: {xs}.", "Put these words in alphabetical order: {xs}.",
                      "Arrange {xs} in A to Z order."], "Alphabetical order: ", False),
}


def _sort_task(rng: random.Random, direction: str, items: list) -> Task:
    templates, prefix, reverse = SORTS[direction]
    while items == sorted(items, reverse=reverse):
        rng.shuffle(items)
    good = sorted(items, reverse=reverse)
    i = rng.randrange(len(good) - 1)
    swapped = good[:i] + [good[i + 1], good[i]] + good[i + 2:]
    dropped = good[:i] + good[i + 1:]
    wrong = [list(reversed(good)), swapped, dropped, list(items)]
    return Task(_pick(rng, templates, xs=_ls(items)), prefix + _ls(good) + ".", _ls(good), "list_order",
                {"wrong": [prefix + _ls(w) + "." for w in wrong]})


def sort_numbers(rng: random.Random) -> Task:
    direction = rng.choice(["ascending", "descending"])
    return _sort_task(rng, direction, rng.sample(range(1, 100), rng.randint(4, 6)))


def sort_words(rng: random.Random) -> Task:
    pool = sorted({w for ws in THINGS.values() for w in ws})
    return _sort_task(rng, "alphabetical", rng.sample(pool, rng.randint(3, 5)))


# ---------------------------------------------------------------- unit conversion

LINEAR_UNITS: dict[str, tuple[str, str, int, list[str]]] = {
    # name -> (from unit, to unit, factor, prompt templates); the answer is value x factor
    "km_m": ("km", "m", 1000, ["How many meters are in {v} km?", "Convert {v} km to meters."]),
    "kg_g": ("kg", "g", 1000, ["How many grams are in {v} kg?", "Convert {v} kg to grams."]),
    "h_min": ("hours", "minutes", 60, ["How many minutes are in {v} hours?", "Convert {v} hours to minutes."]),
    "min_s": ("minutes", "seconds", 60, ["How many seconds are in {v} minutes?", "Convert {v} minutes to seconds."]),
    "m_km": ("m", "km", 1000, ["How many kilometers is {v} m?", "Convert {v} m to kilometers."]),
    "g_kg": ("g", "kg", 1000, ["How many kilograms is {v} g?", "Convert {v} g to kilograms."]),
}
INVERSE = {"m_km", "g_kg"}
"""Conversions that divide: the prompt's value is answer x factor."""


def convert(rng: random.Random) -> Task:
    name = rng.choice(sorted(LINEAR_UNITS))
    src, dst, factor, templates = LINEAR_UNITS[name]
    k = rng.randint(2, 15)
    value, answer = (k * factor, k) if name in INVERSE else (k, k * factor)
    tpl = rng.choice(["{v} {src} = {ans} {dst}.", "{v} {src} is {ans} {dst}."])
    wrong = _wrongs(answer, (), answer * 10, answer // 10 if answer >= 100 else answer + 1, answer + k)
    return _numeric(_pick(rng, templates, v=value), tpl, answer, wrong, v=value, src=src, dst=dst)


def celsius(rng: random.Random) -> Task:
    c = rng.choice([x for x in range(-20, 105, 5) if x != -40])
    f = c * 9 // 5 + 32
    prompt = _pick(rng, ["What is {c} °C in Fahrenheit?", "Convert {c} degrees Celsius to Fahrenheit.",
                         "How many degrees Fahrenheit is {c} °C?"], c=c)
    tpl = rng.choice(["{c} °C = {ans} °F.", "{c} °C is {ans} °F."])
    wrong = [w for w in _wrongs(f, (), c * 9 // 5, c + 32, f + 10) if w != c]
    return _numeric(prompt, tpl, f, wrong, c=c)


# ---------------------------------------------------------------- facts from the tables


def capital(rng: random.Random) -> Task:
    country = rng.choice(sorted(CAPITALS))
    right, wrong = CAPITALS[country]
    prompt = _pick(rng, ["What is the capital of {c}?", "Which city is the capital of {c}?",
                         "Name the capital city of {c}."], c=country)
    tpl = rng.choice(["The capital of {c} is {x}.", "{x} is the capital of {c}."])
    return Task(prompt, tpl.format(c=country, x=right), right, "contains",
                {"wrong": [tpl.format(c=country, x=wrong)]})


def symbol(rng: random.Random) -> Task:
    element = rng.choice(sorted(SYMBOLS))
    right, wrong = SYMBOLS[element]
    prompt = _pick(rng, ["What is the chemical symbol for {e}?", "Which symbol stands for {e}?",
                         "Give the chemical symbol of {e}."], e=element)
    tpl = "The chemical symbol for {e} is {x}."
    return Task(prompt, tpl.format(e=element, x=right), right, "contains", {"wrong": [tpl.format(e=element, x=wrong)]})


def month_days(rng: random.Random) -> Task:
    month = rng.choice(list(MONTH_DAYS))
    days = MONTH_DAYS[month]
    year = " in a common year" if month == "February" else ""
    prompt = _pick(rng, ["How many days are in {m}{y}?", "How many days does {m} have{y}?"], m=month, y=year)
    wrong = [29, 30] if days == 28 else [61 - days]
    return _numeric(prompt, "{m} has {ans} days{y}.", days, wrong, m=month, y=year)


# ---------------------------------------------------------------- format instructions


def uppercase(rng: random.Random) -> Task:
    if rng.random() < 0.5:
        country = rng.choice(sorted(CAPITALS))
        right, wrong = CAPITALS[country]
        prompt = _pick(rng, ["Answer in uppercase: what is the capital of {c}?",
                             "In capital letters only, name the capital of {c}."], c=country)
    else:
        right, wrong = rng.sample(WORDS, 2)
        prompt = _pick(rng, ["Write the word '{w}' in uppercase.", "Spell '{w}' in capital letters."], w=right)
    up = right.upper()
    return Task(prompt, up + ".", up, "uppercase",
                {"format": [right + ".", right.capitalize() + ".", f"Sure, here it is: {up}."],
                 "wrong": [wrong.upper() + "."]})


def json_answer(rng: random.Random) -> Task:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    prompt = _pick(rng, ['Reply with a JSON object {{"answer": ...}}: what is {a} + {b}?',
                         'What is {a} + {b}? Answer as JSON with the key "answer".',
                         'Give {a} plus {b} as a JSON object with an "answer" field.'], a=a, b=b)
    c = a + b
    return Task(prompt, f'{{"answer": {c}}}', str(c), "json_answer",
                {"format": [f"The answer is {c}.", f"{{answer: {c}}}", f'{{"result": {c}}}', f"answer = {c}"],
                 "wrong": [f'{{"answer": {c + 1}}}', f'{{"answer": {c - 1}}}']})


def word_count(rng: random.Random) -> Task:
    topic = rng.choice(sorted(DESCRIBE))
    n = rng.randint(2, 5)
    words = rng.sample(DESCRIBE[topic], n + 1)
    prompt = _pick(rng, ["Describe {t} in exactly {n} words.", "Use exactly {n} words to describe {t}.",
                         "In exactly {n} words, what is {t} like?"], t=topic, n=n)

    def say(ws: list[str]) -> str:
        return ", ".join(ws).capitalize() + "."

    sentence = f"{topic.capitalize()} is {words[0]} and {words[1]} and really {words[2]}."
    return Task(prompt, say(words[:n]), str(n), "word_count",
                {"format": [say(words), say(words[: n - 1]), sentence]})


def comma_list(rng: random.Random) -> Task:
    kind = rng.choice(sorted(THINGS))
    n = rng.randint(3, 5)
    items = rng.sample(THINGS[kind], n + 1)
    prompt = _pick(rng, ["List {n} {k} as a comma-separated list.", "Name {n} {k}, separated by commas.",
                         "Give me {n} {k} in a comma-separated list."], n=n, k=kind)
    numbered = "\n".join(f"{i}. {x}" for i, x in enumerate(items[:n], 1))
    return Task(prompt, _ls(items[:n]), str(n), "comma_list",
                {"format": [numbered, " and ".join(items[:n]), _ls(items), _ls(items[: n - 1])]})


CATEGORIES: dict[str, list[Callable[[random.Random], Task]]] = {
    "arithmetic": [add, subtract, multiply],
    "counting": [count_letters, count_letter, count_items],
    "sorting": [sort_numbers, sort_numbers, sort_words],
    "conversion": [convert, convert, celsius],
    "facts": [capital, capital, symbol, month_days],
    "format": [uppercase, json_answer, word_count, comma_list],
}
"""Category -> task generators (a generator listed twice is drawn twice as often)."""


# ---------------------------------------------------------------- rows


def _rejected(rng: random.Random, task: Task) -> tuple[str, str]:
    """(flaw kind, rejected text): mostly the task's own wrong or format-breaking replies."""
    pools = {**task.flaws, "unhelpful": UNHELPFUL, "rude": RUDE}
    kinds = [k for k in FLAW_WEIGHTS if pools.get(k)]
    kind = rng.choices(kinds, weights=[FLAW_WEIGHTS[k] for k in kinds])[0]
    return kind, rng.choice(pools[kind])


def _row(category: str, task: Task, flaw: str, rejected: str) -> dict:
    meta = {"category": category, "answer": task.answer, "check": task.check, "source": "synth", "flaw": flaw}
    return {"prompt": task.prompt, "chosen": task.chosen, "rejected": rejected, "meta": meta}


def generate(n: int, seed: int) -> list[dict]:
    """``n`` preference pairs in the ``standard`` format, the categories in turn, all from
    ``random.Random(seed)``; prompts are unique (a repeated prompt is redrawn)."""
    rng = random.Random(seed)
    names = list(CATEGORIES)
    seen: set[str] = set()
    rows = []
    for i in range(n):
        category = names[i % len(names)]
        for _ in range(MAX_DRAWS):
            task = rng.choice(CATEGORIES[category])(rng)
            if task.prompt not in seen:
                break
        else:
            raise DataError(f"could not draw a new {category} prompt after {MAX_DRAWS} tries; ask for fewer pairs "
                            f"(--n {n} is too many for the task tables)")
        seen.add(task.prompt)
        rows.append(_row(category, task, *_rejected(rng, task)))
    return rows


# ---------------------------------------------------------------- hand-written pairs and the shipped files


def resources_dir() -> Path:
    return Path(str(importlib.resources.files("preftune") / "resources"))


def hand_to_standard(rec: dict, file: str = HAND_FILE, row: int | None = None) -> dict:
    """A chat-format hand-written pair -> ``standard`` with the shared messages as the prompt."""
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            raise DataError("must be a message list ending with an assistant turn", file, row, key)
    if chosen[:-1] != rejected[:-1]:
        raise DataError("chosen and rejected must share the messages before the last assistant turn", file, row,
                        "rejected")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"],
            "meta": dict(rec.get("meta") or {})}


def hand_pairs(path: Path | None = None) -> list[dict]:
    """The hand-written helpful/harmless pairs, converted to ``standard``."""
    path = path or resources_dir() / HAND_FILE
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", str(path), i) from None
            rows.append(hand_to_standard(rec, str(path), i))
    return rows


def split(rows: list[dict], test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """(train, test): ``test_fraction`` of each category, drawn with ``seed``; both keep the input order."""
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_category.setdefault(r["meta"]["category"], []).append(i)
    test: set[int] = set()
    for category in sorted(by_category):
        idx = by_category[category]
        test.update(rng.sample(idx, round(len(idx) * test_fraction)))
    return [r for i, r in enumerate(rows) if i not in test], [r for i, r in enumerate(rows) if i in test]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_embedded(out_dir: str | Path, hand_path: Path | None = None) -> tuple[Path, Path]:
    """Write ``prefs_train.jsonl`` and ``prefs_test.jsonl`` into ``out_dir``: ``generate(480, seed=0)``
    plus the hand-written pairs, ~20% of each category held out. Same inputs, same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = split(generate(EMBEDDED_N, EMBEDDED_SEED) + hand_pairs(hand_path))
    paths = out / "prefs_train.jsonl", out / "prefs_test.jsonl"
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], test)
    return paths


if __name__ == "__main__":
    build_embedded(resources_dir())
