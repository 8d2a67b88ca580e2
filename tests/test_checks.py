"""The rule judge's answer checks, on free-form replies a model might write."""

from __future__ import annotations

import pytest

from preftune.eval.checks import CHECKS, check, checkable, numbers, stated_numbers


def meta(kind: str, answer: str) -> dict:
    return {"category": "t", "answer": answer, "check": kind, "source": "synth"}


@pytest.mark.parametrize("kind,answer,response,expected", [
    # number: first or last number, or the number after =/is/equals/answer:
    ("number", "19", "19", True),
    ("number", "19", "12 + 7 = 19.", True),
    ("number", "19", "The answer is 19. Let me know if you need anything else with these 2 numbers!", True),
    ("number", "19", "Sure! 12 plus 7 equals 19, because 2 + 7 = 9 and 10 + 0 = 10.", True),
    ("number", "5000", "5 km is 5,000 meters.", True),
    ("number", "-4", "-20 °C = -4 °F.", True),
    ("number", "3", "There are three r's in strawberry.", True),
    ("number", "1", "The letter 'a' appears once in 'parrot'.", True),
    ("number", "19", "12 + 7 = 18.", False),
    ("number", "19", "12 + 7 = 20, not 19.5.", False),
    ("number", "19", "I don't know, look it up.", False),
    ("number", "4", "12-7=5", False),
    ("number", "5", "12-7=5", True),
    # list order: the items in exactly that order, other words ignored
    ("list_order", "3, 8, 12, 20", "Sorted: 3, 8, 12, 20.", True),
    ("list_order", "3, 8, 12, 20", "[3, 8, 12, 20]", True),
    ("list_order", "3, 8, 12, 20", "Your list 12, 3, 20, 8 in ascending order is 3, 8, 12, 20.", True),
    ("list_order", "3, 8, 12, 20", "20, 12, 8, 3", False),
    ("list_order", "3, 8, 12, 20", "3, 12, 8, 20", False),
    ("list_order", "3, 8, 12, 20", "3, 8, 20", False),
    ("list_order", "apple, mango, pear", "Apple, Mango, Pear", True),
    ("list_order", "apple, mango, pear", "1. apple\n2. pear\n3. mango", False),
    # contains: whole words, any case, accents folded
    ("contains", "Canberra", "The capital of Australia is canberra.", True),
    ("contains", "Bogota", "Bogotá is the capital of Colombia.", True),
    ("contains", "New Delhi", "It's New Delhi.", True),
    ("contains", "Canberra", "The capital of Australia is Sydney.", False),
    ("contains", "Ne", "The symbol for neon is Nn.", False),
    ("contains", "Ne", "Neon's symbol is Ne.", True),
    # uppercase: all letters uppercase and the answer present
    ("uppercase", "PARIS", "PARIS", True),
    ("uppercase", "PARIS", "THE CAPITAL OF FRANCE IS PARIS!", True),
    ("uppercase", "PARIS", "The capital is PARIS.", False),
    ("uppercase", "PARIS", "LYON.", False),
    ("uppercase", "PARIS", "123", False),
    # json: a valid object whose "answer" is the answer
    ("json_answer", "42", '{"answer": 42}', True),
    ("json_answer", "42", 'Here you go:\n```json\n{"answer": "42"}\n```', True),
    ("json_answer", "Paris", '{"answer": "paris"}', True),
    ("json_answer", "42", '{"answer": 41}', False),
    ("json_answer", "42", "{answer: 42}", False),
    ("json_answer", "42", '{"result": 42}', False),
    ("json_answer", "42", "The answer is 42.", False),
    ("json_answer", "1", '{"answer": true}', False),
    # word count: exactly N words
    ("word_count", "3", "Deep, blue, vast.", True),
    ("word_count", "3", "Don't stop now", True),
    ("word_count", "3", "Deep, blue, vast, salty.", False),
    ("word_count", "3", "The ocean is deep.", False),
    # comma list: one line, exactly N short items
    ("comma_list", "3", "apple, banana, cherry", True),
    ("comma_list", "3", "Red, dark blue, green.", True),
    ("comma_list", "3", "apple and banana and cherry", False),
    ("comma_list", "3", "1. apple\n2. banana\n3. cherry", False),
    ("comma_list", "3", "apple, banana, cherry, plum", False),
    ("comma_list", "3", "apple, , cherry", False),
    ("comma_list", "3", "Sure, here are three fruits that I really like a lot: apple, banana", False),
])
def test_check_kinds(kind, answer, response, expected):
    assert check(meta(kind, answer), response) is expected


def test_every_kind_in_the_table_is_exercised():
    assert set(CHECKS) == {"number", "list_order", "contains", "uppercase", "json_answer", "word_count",
                           "comma_list"}


def test_rows_without_a_checkable_answer_give_none():
    hand = {"category": "helpful", "source": "hand"}
    assert check(hand, "anything") is None and not checkable(hand)
    assert check(None, "x") is None and check({}, "x") is None
    assert check({"check": "telepathy", "answer": "1"}, "1") is None
    assert check({"check": "number", "answer": 19}, "19") is None  # answers are strings
    assert checkable(meta("number", "19"))


def test_number_reading():
    assert numbers("a 1,234 b -5 c 2.5 x7 12-7") == [1234.0, -5.0, 2.5, 12.0, 7.0]
    assert numbers("no digits but four and two") == [4.0, 2.0]
    assert numbers("4 and two") == [4.0]  # words only when there are no digits
    assert stated_numbers("From 3 and 9 the answer: 12 (see 4)") == {3.0, 12.0, 4.0}
