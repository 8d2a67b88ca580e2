"""Loading a config: YAML (UTF-8, no duplicate keys), dotted ``key=value`` overrides and THE deep
merge, and the type checker that builds the dataclasses of schema.py, listing every problem with
a did-you-mean. Range and cross-field rules live in validate.py."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from preftune import trl_names
from preftune.config.schema import Config, ConfigError


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


YAML11_EXPONENT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent form without a dot (``1e-4``): YAML 1.1 (PyYAML) reads it as a string."""


def check_type(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Return ``value`` converted to ``tp`` or append a problem naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return tp()
        return _build(tp, value, key + ".", problems)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        sub: list[str] = []
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = check_type(value, a, key, trial)
            if not trial:
                return out
            sub.extend(trial)
        problems.append(sub[0] if len(sub) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{key}: {value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return []
        return [check_type(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                problems.append(f"{key}: must be a finite number, got {value!r}")
            return float(value)
        problems.append(f"{key}: expected a number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            foreign = trl_names.hint(str(k), prefix)  # a TRL or axolotl name: say which key it is here
            hint = f" ({foreign})" if foreign else f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"unknown key '{prefix}{k}'{hint}")
            continue
        before = len(problems)
        value = check_type(v, hints[k], prefix + k, problems)
        # a mistyped value is reported and its field keeps its default, so that the checks after this one
        # never meet it (beta > 0 on a str); a section or list whose parts were reported keeps the rest
        if not any(m.startswith(f"{prefix}{k}: ") for m in problems[before:]):
            kwargs[k] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        problems.append(f"{prefix or 'config'}: {e}")
        return cls()


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["dpo.beta=0.3", "lora.enabled=false"]`` -> ``[("dpo.beta", 0.3), ...]`` (values parsed as YAML)."""
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError([f"override {o!r} is not of the form key=value"], "command line")
        k, v = o.split("=", 1)
        try:
            value = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError([f"{k.strip()}: the value {v!r} is not valid YAML ({problem}); quote it to pass it "
                               "as text, e.g. key='value'"], "command line") from None
        out.append((k.strip(), value))
    return out


def apply_shorthands(raw: dict) -> dict:
    """Scalar shorthands: ``lora: false`` -> ``lora.enabled``, ``data: FILE`` -> ``data.source``."""
    if isinstance(raw.get("lora"), bool):
        raw["lora"] = {"enabled": raw["lora"]}
    if isinstance(raw.get("data"), str):
        raw["data"] = {"source": raw["data"]}
    return raw


def build(raw: dict) -> tuple[Config, list[str]]:
    """A raw mapping -> ``(Config, type problems)``: unknown keys (with did-you-mean or the TRL name) and
    wrong types, every one listed. Ranges and cross-field rules are validate.py's."""
    problems: list[str] = []
    return _build(Config, apply_shorthands(dict(raw)), "", problems), problems


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that records every key given twice in one mapping (plain YAML keeps the last)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                line = key_node.start_mark.line + 1
                self.duplicates.append((line, f"duplicate key '{key}' at line {line} (first at line {first}); keep one"))
        return super().construct_mapping(node, deep)



def load_raw(path: str | Path | None) -> dict:
    """The YAML mapping in ``path``: UTF-8, valid YAML, no key given twice (every duplicate listed)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"], str(p))
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError([f"not valid UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); save the file "
                           "as UTF-8"], str(p)) from None
    loader = _StrictLoader(text)
    try:
        raw = loader.get_single_data() or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(p)) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([text for _, text in sorted(loader.duplicates)], str(p))
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of keys"], str(p))
    return raw


def nest(key: str, value: Any) -> dict:
    """``("dpo.beta", 0.1)`` -> ``{"dpo": {"beta": 0.1}}``, with config shorthands applied
    (``lora: false`` -> ``lora.enabled``; ``data: FILE`` -> ``data.source``)."""
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return apply_shorthands(node)


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge ``extra`` into ``base`` in place: mappings merge key by key, anything else replaces.
    THE merge of the CLI's overrides and of a sweep's runs: ``lora={r: 8}`` over
    ``lora: {enabled: false, r: 4}`` changes the rank and keeps LoRA off."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of the raw config with dotted ``key=value`` overrides deep-merged in order."""
    raw = apply_shorthands(copy.deepcopy(raw))
    for k, v in parse_overrides(list(overrides)):
        merge(raw, nest(k, v))
    return raw


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
