"""Range rules of config fields: ``setting(default, rule)`` keeps a number's rule in its field's metadata,
beside the field and its docstring; validate.py walks them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import field
from typing import Any

Rule = Callable[[float], "str | None"]  # a number -> None when allowed, else what is wrong


def rule(test: Callable[[float], bool], text: str) -> Rule:
    return lambda v: None if test(v) else text


AT_LEAST_1 = rule(lambda v: v >= 1, "must be at least 1")
AT_LEAST_0 = rule(lambda v: v >= 0, "must be 0 or more")
POSITIVE = rule(lambda v: v > 0, "must be positive")
FRACTION = rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
UNIT_INTERVAL = rule(lambda v: 0 < v <= 1, "must be in (0, 1]")


def setting(default: Any = dataclasses.MISSING, rule: Rule | None = None, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field whose number must pass ``rule`` (null, ``auto`` and non-numbers are not range-checked)."""
    return field(default=default, default_factory=factory, metadata={"range": rule})


def range_rule(f: dataclasses.Field) -> Rule | None:
    """The range rule of a config field, if it has one."""
    return f.metadata.get("range")
