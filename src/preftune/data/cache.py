"""The on-disk cache of tokenized rows: a second run, or a sweep member, on the same rows with the
same tokenizer, template, limits and mapping loads its token ids instead of tokenizing again. One
``.npz`` file per key under ``<cache root>/tokenized``; the row -> ids function is tokenize.py's."""

from __future__ import annotations

import array
import contextlib
import gc
import hashlib
import json
import logging
import os
import pickle
import weakref
from pathlib import Path

import numpy as np

from preftune import embedded
from preftune.data.rows import TokenizedPair, TokenizedSFT
from preftune.data.tokenize import RowKind, TokenizeReport, template_digest, tokenize

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped whenever tokenize.py's output for the same inputs changes, so old entries miss."""


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's content: for a fast tokenizer its whole serialized pipeline (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens), plus the special tokens and whether BOS is
    added; never the folder it was loaded from. Remembered per tokenizer object while its size
    and special tokens stay the same."""
    state = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "add_bos_token", None))
    known = _DIGESTS.get(tokenizer)
    if known is not None and known[0] == state:
        return known[1]
    digest = _digest(tokenizer)
    _DIGESTS[tokenizer] = (state, digest)
    return digest


def _digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                        getattr(tokenizer, "add_bos_token", None), sorted(tokenizer.special_tokens_map.items())],
                       default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()[:24]


def rows_digest(rows: list, kind: RowKind) -> str:
    """The rows' content that token ids depend on (prompt and completions, in order), hashed in one
    pass: a faithful serialization, so different rows never share a digest (equal rows held as
    shared objects may only cause a miss)."""
    parts = [(r.prompt, r.chosen, r.rejected) for r in rows] if kind is RowKind.PREFERENCE else \
        [(r.prompt, r.completion) for r in rows]
    return hashlib.sha256(pickle.dumps(parts, protocol=4)).hexdigest()[:24]


def cache_key(row_fingerprint: str, tokenizer, data, kind: RowKind) -> str:
    """Everything the tokenized rows depend on."""
    blob = {
        "version": VERSION, "kind": kind, "rows": row_fingerprint, "tokenizer": tokenizer_digest(tokenizer),
        "template": template_digest(tokenizer),
        "truncation": [data.max_length, data.max_prompt_length],
        "mapping": [dict(data.columns or {}), dict(data.roles or {})],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    return embedded.cache_root() / "tokenized" / f"{key}.npz"


PARTS = {RowKind.PREFERENCE: ("prompt", "chosen", "rejected"), RowKind.SFT: ("prompt", "completion")}


def _save(path: Path, items: list, index: list[int], report: TokenizeReport, kind: RowKind) -> None:
    parts = [[getattr(t, f"{name}_ids") for name in PARTS[kind]] for t in items]
    lens = np.array([[len(p) for p in row] for row in parts], dtype=np.int64).reshape(len(items), len(PARTS[kind]))
    buf = array.array("i")
    for row in parts:
        for p in row:
            buf.extend(p)
    flat = np.frombuffer(buf, dtype=np.int32) if len(buf) else np.zeros(0, np.int32)
    meta = json.dumps({"report": report.to_dict(), "raw_lengths": report.raw_lengths})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, ids=flat, lens=lens, index=np.array(index, dtype=np.int64),
             keys=np.array([t.key for t in items], dtype="S"), truncated=np.array([t.truncated for t in items], dtype=bool),
             meta=np.frombuffer(meta.encode(), np.uint8))
    tmp.replace(path)


@contextlib.contextmanager
def _no_gc():
    """Building many small lists triggers the cyclic collector over and over; none of them cycle."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _load(path: Path, rows: list, kind: RowKind) -> tuple[list, TokenizeReport]:
    with _no_gc():
        return _read(path, rows, kind)


def _read(path: Path, rows: list, kind: RowKind) -> tuple[list, TokenizeReport]:
    with np.load(path, allow_pickle=False) as z:
        ids, lens, index = z["ids"].tolist(), z["lens"], z["index"].tolist()
        keys, truncated = [k.decode() for k in z["keys"].tolist()], z["truncated"].tolist()
        meta = json.loads(z["meta"].tobytes().decode())
    ends = np.cumsum(lens.ravel()).tolist()
    pieces = [ids[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    width = len(PARTS[kind])
    cls = TokenizedPair if kind is RowKind.PREFERENCE else TokenizedSFT
    items = [cls(*pieces[n * width : (n + 1) * width], key=key, meta=rows[i].meta, truncated=cut)
             for n, (i, key, cut) in enumerate(zip(index, keys, truncated))]
    report = TokenizeReport.from_dict(meta["report"])
    report.raw_lengths = meta["raw_lengths"]
    for col, part in enumerate(PARTS[kind]):
        report.lengths[part] = lens[:, col].tolist()
    return items, report


def tokenize_rows_cached(rows, tokenizer, data, kind: RowKind = RowKind.PREFERENCE, progress: bool | None = None):
    """:func:`~preftune.data.tokenize.tokenize`'s items and report for these rows, from the cache when
    an entry exists, else computed and stored. An entry that cannot be read is recomputed."""
    rows, kind = list(rows), RowKind.check(kind)
    path = cache_path(cache_key(rows_digest(rows, kind), tokenizer, data, kind))
    if path.is_file():
        try:
            items, report = _load(path, rows, kind)
            log.info("tokenized %d rows reused from %s", report.rows_in, path)
            return items, report
        except (OSError, ValueError, KeyError, IndexError) as e:
            log.warning("tokenization cache entry %s is unreadable (%s); tokenizing again", path, e)
    done = tokenize(rows, tokenizer, data, kind, progress=progress)
    _save(path, done.items, done.positions, done.report, kind)
    return done.items, done.report
