"""``data.columns`` and ``data.roles``: rename a dataset's columns and conversation keys/roles to the
canonical names the format adapters read, before detection and adaptation. No format logic here."""

from __future__ import annotations

import difflib
from typing import Any

from preftune.data.formats import FIELDS
from preftune.errors import DataError

ROLE_KEYS = ("role_key", "content_key")
ROLE_NAMES = ("system", "user", "assistant", "tool")


def _close(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), sorted(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def mapping_problems(columns: dict, roles: dict, prefix: str = "data") -> list[str]:
    """Config problems of a mapping: unknown field or role names (with did-you-mean), non-strings,
    and two fields mapped to one column."""
    p = []
    for name, table, known in (("columns", columns, FIELDS), ("roles", roles, ROLE_KEYS + ROLE_NAMES)):
        for k, v in table.items():
            if k not in known:
                p.append(f"{prefix}.{name}: unknown {'field' if name == 'columns' else 'key'} '{k}'{_close(k, known)}; "
                         f"known: {', '.join(sorted(known))}")
            if not isinstance(v, str) or not v:
                p.append(f"{prefix}.{name}.{k}: expected a column or key name (a string), got {v!r}")
    seen: dict[str, str] = {}
    for k, v in columns.items():
        if isinstance(v, str) and v in seen:
            p.append(f"{prefix}.columns: '{seen[v]}' and '{k}' both map to column '{v}'")
        seen.setdefault(v, k)
    return p


def check_columns(rec: dict, columns: dict[str, str], where: str) -> None:
    """A mapping that names a column the data lacks is an error listing the columns it has."""
    missing = {k: v for k, v in columns.items() if v not in rec}
    if missing:
        names = ", ".join(f"{k}: {v}" for k, v in missing.items())
        raise DataError(f"data.columns names column(s) the data does not have ({names}); its columns are "
                        f"{sorted(rec)}. Fix data.columns{_close(next(iter(missing.values())), rec)}",
                        where, field="data.columns")


def apply_columns(rec: dict, columns: dict[str, str]) -> dict:
    """``rec`` with each mapped column renamed to its field (a column already named like a mapped
    field is replaced by the mapped one)."""
    if not columns:
        return rec
    mapped = {col: fld for fld, col in columns.items()}
    out = {k: v for k, v in rec.items() if k not in mapped and k not in columns}
    for col, fld in mapped.items():
        if col in rec:
            out[fld] = rec[col]
    return out


def _turn(m: Any, role_key: str, content_key: str, names: dict[str, str]) -> Any:
    if not isinstance(m, dict) or role_key not in m:
        return m
    out = {k: v for k, v in m.items() if k not in (role_key, content_key)}
    role = m[role_key]
    out["role"] = names.get(role, role) if isinstance(role, str) else role
    if content_key in m:
        out["content"] = m[content_key]
    return out


def _turns(value: Any, role_key: str, content_key: str, names: dict[str, str]) -> Any:
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return [_turn(m, role_key, content_key, names) for m in value]
    if isinstance(value, dict) and role_key in value:
        return _turn(value, role_key, content_key, names)
    if isinstance(value, dict) and "messages" in value:  # openai's input.messages
        return {**value, "messages": _turns(value["messages"], role_key, content_key, names)}
    return value


def apply_roles(rec: dict, roles: dict[str, str]) -> dict:
    """Every conversation in ``rec`` (lists of turns, a single turn, ``input.messages``) with its
    ``roles.role_key``/``roles.content_key`` renamed to ``role``/``content`` and its role names
    (``roles.user`` etc., the dataset's names) turned into preftune's."""
    if not roles:
        return rec
    role_key, content_key = roles.get("role_key", "role"), roles.get("content_key", "content")
    names = {v: k for k, v in roles.items() if k in ROLE_NAMES}
    return {k: _turns(v, role_key, content_key, names) for k, v in rec.items()}


def mapper(data) -> Any:
    """``rec -> canonical rec`` for a DataConfig (identity without a mapping)."""
    columns, roles = dict(data.columns or {}), dict(data.roles or {})
    if not columns and not roles:
        return None
    return lambda rec: apply_roles(apply_columns(rec, columns), roles)
