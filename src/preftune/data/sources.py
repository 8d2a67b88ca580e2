"""Where records come from and how they become rows: local .jsonl/.json/.parquet/.csv files or
folders, the embedded data (``embedded:NAME``), or a Hub dataset; the train/held-out split; and the
DataReport that counts every record read, kept and dropped (by reason). Tokens live in tokenize.py.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import importlib.resources
import io
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from preftune.data import drops
from preftune.data.formats import (
    KIND_FORMATS,
    ROW_TYPES,
    RowError,
    RowFiltered,
    adapter,
    columns_for,
    detect_format,
    has_shp_scores,
    sft_rows_from_pairs,
    with_system,
)
from preftune.data.mapping import check_columns, mapper
from preftune.data.rows import PreferenceRow
from preftune.env import offline
from preftune.errors import DataError, PreftuneError

log = logging.getLogger(__name__)

Record = tuple[dict, str, int]
"""(record, file or source name, 1-based row / line)."""
OnBad = Callable[[RowError], None] | None

log = logging.getLogger("preftune")

KNOWN_SPLITS = frozenset({"train", "test", "validation", "valid", "val", "dev", "eval"})
EMBEDDED_PREFIX = "embedded:"


# ---------------------------------------------------------------- file readers


def _bad(err: RowError, on_bad: OnBad) -> None:
    if on_bad is None:
        raise err
    on_bad(err)


def _object(value: Any, file: str, row: int, on_bad: OnBad) -> dict | None:
    if isinstance(value, dict):
        return value
    _bad(RowError(f"a record must be an object (mapping), got {type(value).__name__}", None, "wrong_type", file, row),
         on_bad)
    return None


MAX_DEPTH = 100
"""Records nested deeper than this (lists and objects inside each other) are malformed."""
BOM = codecs.BOM_UTF8


def check_values(rec: dict) -> None:
    """Raise RowError naming the field when a record holds text that is not UTF-8 (an undecodable
    byte, read as a lone surrogate, or a ``\\ud800`` escape) or is nested deeper than MAX_DEPTH."""
    stack = [(k, v, 1) for k, v in rec.items()] + [(k, k, 1) for k in rec]
    while stack:
        top, value, depth = stack.pop()
        top = str(top).encode("utf-8", "backslashreplace").decode("utf-8")
        if depth > MAX_DEPTH:
            raise RowError(f"'{top}' is nested more than {MAX_DEPTH} levels deep", str(top), "too_deep")
        if isinstance(value, dict):
            stack += [(top, k, depth + 1) for k in value] + [(top, v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(top, v, depth + 1) for v in value]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                what = f"byte 0x{ord(value[e.start]) - 0xDC00:02x}" if 0xDC80 <= ord(value[e.start]) <= 0xDCFF \
                    else f"lone surrogate \\u{ord(value[e.start]):04x}"
                raise RowError(f"'{top}' is not valid UTF-8 text ({what} at character {e.start}); fix the "
                               "file's encoding", str(top), "bad_encoding") from None


WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
             (codecs.BOM_UTF16_BE, "utf-16"))
"""UTF-32 before UTF-16: the UTF-32-LE mark starts with the UTF-16-LE one."""


def wide_encoding(head: bytes) -> str | None:
    """``utf-16``/``utf-32`` (the codec reads the byte order from the mark), ``utf-16-le``/``-be`` for
    text without a mark whose ASCII characters alternate with zero bytes, or None (UTF-8 or other)."""
    for bom, name in WIDE_BOMS:
        if head.startswith(bom):
            return name
    if len(head) >= 4 and head[1] == head[3] == 0 and head[0] and head[2]:
        return "utf-16-le"
    if len(head) >= 4 and head[0] == head[2] == 0 and head[1] and head[3]:
        return "utf-16-be"
    return None


def _utf8_bytes(path: Path) -> bytes | None:
    """A UTF-16 or UTF-32 text file (what some Windows editors save) as UTF-8 bytes; None for others."""
    with open(path, "rb") as f:
        encoding = wide_encoding(f.read(4))
    if encoding is None:
        return None
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"starts as {encoding.upper()} text but is not valid {encoding.upper()} at byte {e.start}; "
                        "save it as UTF-8", str(path)) from None
    log.info("%s is %s text: read as such", path, encoding.upper())
    return text.encode("utf-8", "surrogateescape")


def _open_utf8(path: Path):
    wide = _utf8_bytes(path)
    return open(path, "rb") if wide is None else io.BytesIO(wide)


def _read_jsonl(path: Path, on_bad: OnBad) -> Iterator[tuple[dict, int]]:
    """One JSON object per line; bytes that are not UTF-8 are kept as lone surrogates for
    :func:`check_values` to name (a JSON error only when they fall outside a string). UTF-16 and
    UTF-32 files are read as what they are."""
    with _open_utf8(path) as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.removeprefix(BOM if line_no == 1 else b"").decode("utf-8", "surrogateescape")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(RowError(f"not valid JSON ({e.msg} at column {e.colno})", None, "bad_json", str(path), line_no),
                     on_bad)
                continue
            except RecursionError:
                _bad(RowError("nested too deeply to read", None, "too_deep", str(path), line_no), on_bad)
                continue
            if (rec := _object(value, str(path), line_no, on_bad)) is not None:
                yield rec, line_no


def _read_json(path: Path, on_bad: OnBad) -> Iterator[tuple[dict, int]]:
    try:
        with _open_utf8(path) as f:
            value = json.loads(f.read().removeprefix(BOM).decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at line {e.lineno}); for one object per line name the file .jsonl",
                        str(path)) from None
    except RecursionError:
        raise DataError("not readable: JSON nested too deeply", str(path)) from None
    if not isinstance(value, list):
        raise DataError(f"a .json data file must hold a list of objects, got {type(value).__name__}", str(path))
    for i, item in enumerate(value, 1):
        if (rec := _object(item, str(path), i, on_bad)) is not None:
            yield rec, i


def _read_parquet(path: Path, on_bad: OnBad) -> Iterator[tuple[dict, int]]:
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield rec, row
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"not a readable Parquet file after row {row} ({type(e).__name__}: {e}); re-export it "
                        "or remove it from data.source", str(path)) from None


def _csv_cell(value: str) -> Any:
    """Cells holding JSON message lists or objects are decoded; everything else stays a string."""
    if value.startswith(("[", "{")):
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
        if isinstance(decoded, dict) or (isinstance(decoded, list) and all(isinstance(x, dict) for x in decoded)):
            return decoded
    return value


CSV_FIELD_LIMIT = 1 << 30
"""Largest CSV cell read (the csv module's own default is 128 KiB)."""


def _read_csv(path: Path, on_bad: OnBad) -> Iterator[tuple[dict, int]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with io.TextIOWrapper(_open_utf8(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            if twice := sorted({c for c in header if header.count(c) > 1}):
                raise DataError(f"the header names column(s) {twice} twice; rename one", str(path), 0)
            for row, rec in enumerate(reader, 1):  # row 1 = first line after the header
                if None in rec:
                    _bad(RowError(f"the row has {len(rec[None])} more cell(s) than the header's {len(header)} "
                                  "columns (an unquoted comma?)", None, "extra_cells", str(path), row), on_bad)
                    continue
                yield {k: _csv_cell(v) if isinstance(v, str) else v for k, v in rec.items()}, row
        except csv.Error as e:
            raise DataError(f"not valid CSV at line {reader.line_num} ({e})", str(path)) from None


READERS: dict[str, Callable[[Path, OnBad], Iterator[tuple[dict, int]]]] = {
    ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv,
}


# ---------------------------------------------------------------- resolving a source


def _words(path: Path, root: Path) -> set[str]:
    rel = path.relative_to(root).with_suffix("")
    return set(re.split(r"[^a-z0-9]+", str(rel).lower()))


def _data_files(folder: Path) -> list[Path]:
    """Data files of every READERS type (any case: ``.JSONL`` too); other files are named in a warning."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    ignored = [str(p.relative_to(folder)) for p in files if p.suffix.lower() not in READERS]
    if ignored:
        log.warning("%s: ignored %d file(s) that are not %s: %s", folder, len(ignored), "/".join(READERS),
                    ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    return [p for p in files if p.suffix.lower() in READERS]


def _split_files(folder: Path, split: str) -> list[Path]:
    """Files whose name contains the split (``train.jsonl``, ``data/test-0000.parquet``); with no
    split names at all, every file is ``train``."""
    files = _data_files(folder)
    named = [f for f in files if split.lower() in _words(f, folder)]
    if named:
        return named
    if split == "train" and not any(_words(f, folder) & KNOWN_SPLITS for f in files):
        return files
    return []


def resources_dir() -> Path:
    """The package's data folder: ``embedded:NAME`` is ``NAME_<split>.jsonl`` there."""
    return Path(str(importlib.resources.files("preftune") / "resources"))


def _embedded_files(source: str, split: str) -> list[Path]:
    name = source[len(EMBEDDED_PREFIX):]
    root = resources_dir()
    path = root / f"{name}_{split}.jsonl"
    if path.is_file():
        return [path]
    if not any(root.glob(f"{name}_*.jsonl")):
        known = sorted(p.name[: -len("_train.jsonl")] for p in root.glob("*_train.jsonl"))
        raise PreftuneError(f"unknown embedded dataset {source!r}; available: "
                            f"{', '.join(EMBEDDED_PREFIX + k for k in known) or 'none (the install lacks its data)'}")
    return []


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in READERS or os.sep + os.sep in source


def _local_files(source: str, split: str) -> list[Path] | None:
    """The files of ``split``, or None when the source is not local (a Hub name)."""
    if source.startswith(EMBEDDED_PREFIX):
        return _embedded_files(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _split_files(path, split)
    if path.is_file():
        if path.suffix.lower() not in READERS:
            raise DataError(f"unsupported data file type {path.suffix!r}; use one of {', '.join(READERS)}", str(path))
        return [path] if split == "train" else []
    if _looks_local(source):
        raise DataError("data file or folder not found; check data.source", source)
    return None


def _hub_error(name: str, e: Exception) -> PreftuneError:
    why = "the Hub cannot be reached (HF_HUB_OFFLINE=1)" if offline() else f"{type(e).__name__}: {e}"
    return PreftuneError(f"dataset {name!r} is not local and could not be loaded from the Hugging Face Hub ({why}). "
                         "Pass a local path instead: data.source=PATH (.jsonl/.json/.parquet/.csv file or folder)")


def _hub_records(name: str, split: str, subset: str | None) -> Iterator[Record]:
    try:
        ds = datasets.load_dataset(name, subset, split=split, trust_remote_code=False)
    except Exception as e:  # offline, not found, network: all become one actionable message
        raise _hub_error(name, e) from None
    for i, rec in enumerate(ds, 1):
        yield dict(rec), f"hub:{name}[{split}]", i


def read_records(source: str, split: str = "train", subset: str | None = None, on_bad: OnBad = None) -> Iterator[Record]:
    """Yield ``(record, file, row)`` for one split of a source (row: 1-based line for JSONL, else
    1-based record index). A malformed record (bad JSON line, not an object) raises a DataError
    naming file and line, or is passed to ``on_bad`` and skipped when given."""
    files = _local_files(source, split)
    if files is None:
        yield from _hub_records(source, split, subset)
        return
    if not files:
        raise DataError(f"no data files for split {split!r} (a folder's files are chosen by a name containing the "
                        "split, e.g. train.jsonl / test.jsonl)", source, field="data.split")
    for path in files:
        for rec, row in READERS[path.suffix.lower()](path, on_bad):
            yield rec, str(path), row


def has_split(source: str, split: str, subset: str | None = None) -> bool:
    """Whether the source holds ``split`` (a single local file holds only ``train``)."""
    files = _local_files(source, split)
    if files is not None:
        return bool(files)
    try:
        return split in datasets.get_dataset_split_names(source, subset)
    except Exception as e:
        raise _hub_error(source, e) from None


# ---------------------------------------------------------------- records -> rows, counted


@dataclass
class DataReport:
    """Records read, rows kept, and every drop by reason: ``rows_read == rows_kept + sum(dropped)``;
    ``notes`` are things said once about the whole source (SHP without scores)."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    format: str | None = None
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            log.warning("%s", text)

    def merge(self, other: DataReport) -> DataReport:
        out = DataReport(self.rows_read + other.rows_read, self.rows_kept + other.rows_kept, dict(self.dropped),
                         self.format or other.format, list(self.notes))
        for reason, n in other.dropped.items():
            out.drop(reason, n)
        out.notes += [n for n in other.notes if n not in out.notes]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"rows_read": self.rows_read, "rows_kept": self.rows_kept, "dropped": dict(self.dropped),
                "format": self.format, "notes": list(self.notes)}


FALLBACK_KIND = {"sft": "preference"}
"""SFT data may also be preference data (SFT on each pair's chosen)."""


def _detect(rec: dict, kind: str) -> str:
    """Detect the format of ``kind``, else of its fallback kind when no format of ``kind`` fits."""
    try:
        return detect_format(rec.keys(), kind, rec)
    except DataError:
        if kind not in FALLBACK_KIND or any(columns_for(f, kind) <= set(rec) for f in KIND_FORMATS[kind]):
            raise
        try:
            return detect_format(rec.keys(), FALLBACK_KIND[kind], rec)
        except DataError:
            pass
        raise


def _check_format(fmt: str, kind: str) -> None:
    if kind not in KIND_FORMATS:
        raise PreftuneError(f"unknown data kind {kind!r}; expected one of {', '.join(KIND_FORMATS)}")
    allowed = KIND_FORMATS[kind] + KIND_FORMATS.get(FALLBACK_KIND.get(kind, ""), ())
    if fmt != "auto" and fmt not in allowed:
        raise DataError(f"format {fmt!r} does not give {kind} rows; {kind} data needs one of "
                        f"{', '.join(dict.fromkeys(allowed))}", field="data.format")


def _shp_note(rec: dict, data) -> str | None:
    if data.min_score_ratio <= 1:
        return f"SHP: data.min_score_ratio={data.min_score_ratio} is at most 1, so every pair is kept"
    if not has_shp_scores(rec):
        return "SHP: the data has no score columns (score_A/score_B or score_ratio), so every pair is kept"
    return None


def _adapt(fn, rec: dict, kind: str):
    """One record -> a row of ``kind`` (a pair where SFT rows may come from pairs)."""
    row = with_system(fn(rec), rec)
    if not isinstance(row, (ROW_TYPES[kind], PreferenceRow) if kind in FALLBACK_KIND else ROW_TYPES[kind]):
        field_name = "chosen" if kind == "preference" else "label"
        raise RowError(f"the record gives no {kind} row (it lacks '{field_name}')", field_name, "missing_field")
    return row


def _convert(data, split: str, kind: str, fmt: str) -> tuple[list, DataReport]:
    """Read one split, map its columns and roles, and adapt every record. Data-quality problems are
    counted drops; malformed records stop or are counted per ``data.on_error``."""
    report = DataReport(format=None if fmt == "auto" else fmt)
    rows: list = []

    def skip(err: RowError) -> None:
        report.rows_read += 1
        report.drop(err.reason)

    fn = None if fmt == "auto" else adapter(fmt, data)
    to_canonical, first = mapper(data), True
    on_bad = skip if data.on_error == "skip" else None
    for rec, file, row in read_records(data.source, split, data.subset, on_bad):
        report.rows_read += 1
        try:
            check_values(rec)
            if to_canonical is not None:
                if first:
                    check_columns(rec, data.columns, file)
                rec = to_canonical(rec)
            if fn is None:
                try:
                    report.format = _detect(rec, kind)
                except DataError as e:  # the layout of the whole file, named at its first record
                    raise DataError(e.message, file, row, e.field) from None
                fn = adapter(report.format, data)
            if first and report.format == "shp" and (note := _shp_note(rec, data)):
                report.note(note)
            first = False
            rows.append(_adapt(fn, rec, kind))
        except RowFiltered as f:
            report.drop(f.reason)
        except RowError as e:
            if data.on_error != "skip" and not drops.is_quality(e.reason):
                raise e.at(file, row) from None
            report.drop(e.reason)
    if kind == "sft":
        rows = [sft_rows_from_pairs([r])[0] if isinstance(r, PreferenceRow) else r for r in rows]
    report.rows_kept = len(rows)
    return rows, report


def detect_kind(data, kind: str) -> str:
    """``kind``, or ``"unpaired"`` when the data is KTO rows (``data.format: kto``, or an undetectable
    ``kind`` whose first record fits ``kto``), so that inspecting a KTO file needs no flag."""
    if data.mixture:  # the first source stands for the mixture
        data = mixture_source(data, data.mixture[0])
    if data.format in KIND_FORMATS["unpaired"]:
        return "unpaired"
    if data.format != "auto" or kind == "unpaired":
        return kind
    for rec, file, _ in read_records(data.source, data.split, data.subset, on_bad=lambda err: None):
        if (to_canonical := mapper(data)) is not None:
            check_columns(rec, data.columns, file)
            rec = to_canonical(rec)
        try:
            _detect(rec, kind)
            return kind
        except DataError:
            try:
                detect_format(rec.keys(), "unpaired", rec)
            except DataError:
                return kind
            return "unpaired"
    return kind


def _carve(rows: list, test_size: float, seed: int) -> tuple[list, list]:
    """Split off ``round(test_size * n)`` rows (at least 1, leaving at least 1) chosen by a seeded
    shuffle; both parts keep the source order."""
    n = len(rows)
    n_test = min(max(1, round(test_size * n)), n - 1) if test_size > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = set(order[:n_test])
    return [r for i, r in enumerate(rows) if i not in test], [r for i, r in enumerate(rows) if i in test]


def _cap(rows: list, cap: int | None, seed: int, report: DataReport, reason: str) -> list:
    """At most ``cap`` rows, chosen by a seeded shuffle (kept in source order); the rest counted."""
    if cap is None or len(rows) <= cap:
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    keep = set(order[:cap])
    report.drop(reason, len(rows) - cap)
    return [r for i, r in enumerate(rows) if i in keep]


def mixture_source(data, m):
    """One ``data.mixture`` entry as a DataConfig: ``data`` with the entry's source, subset, split,
    format, columns and roles where it sets them."""
    return dataclasses.replace(data, source=m.source, subset=m.subset, split=m.split or data.split, mixture=[],
                               format=m.format or data.format, columns=m.columns or data.columns,
                               roles=m.roles or data.roles)


def _mixture_rows(data, kind: str) -> tuple[list, list, DataReport]:
    """``data.mixture``: each source's training split (its own, else ``data.split``) read with its own
    format and mapping (else ``data``'s), of which the first ``fraction`` of the rows is kept (the
    alignment-handbook's ``dataset_mixer``); each source's ``data.test_split``, when it has one, joins
    the held-out rows whole. Returns (train rows, held-out rows, their report)."""
    train: list = []
    heldout: list = []
    report = None
    for i, m in enumerate(data.mixture):
        d = mixture_source(data, m)
        _check_format(d.format, kind)
        rows, part = _convert(d, d.split, kind, d.format)
        if part.rows_read == 0:
            raise DataError(f"no records in split {d.split!r}", d.source, field=f"data.mixture[{i}].source")
        keep = int(m.fraction * len(rows))
        part.drop("mixture_fraction", len(rows) - keep)
        train += rows[:keep]
        if d.test_split and d.test_split != d.split and has_split(d.source, d.test_split, d.subset):
            held, held_report = _convert(d, d.test_split, kind, part.format or d.format)
            heldout += held
            part = part.merge(held_report)
        report = part if report is None else report.merge(part)
    return train, heldout, report


def load_rows(data, kind: str, seed: int) -> tuple[list, list, DataReport]:
    """Rows of ``data`` (a DataConfig) as ``(train rows, held-out rows, DataReport)``.

    Held-out rows are the source's ``data.test_split`` when it has one, else ``data.test_size`` of
    the training rows carved off with ``seed``. ``max_rows`` / ``max_eval_rows`` then keep a seeded
    random subset (the rest is counted as dropped under those names). ``kind="sft"`` also accepts
    preference data (each pair's prompt and chosen); ``kind="unpaired"`` reads KTO rows."""
    fmt = data.format
    if data.mixture:
        train, heldout, report = _mixture_rows(data, kind)
        if not heldout:
            train, heldout = _carve(train, data.test_size, seed)
        return _capped(data, train, heldout, report, seed)
    _check_format(fmt, kind)
    train, report = _convert(data, data.split, kind, fmt)
    if report.rows_read == 0:
        raise DataError(f"no records in split {data.split!r}", data.source, field="data.source")
    test_split = data.test_split
    if data.test_source:
        heldout, test_report = _convert(dataclasses.replace(data, source=data.test_source, subset=None), "train",
                                        kind, fmt)
        report = report.merge(test_report)
    elif test_split and test_split != data.split and has_split(data.source, test_split, data.subset):
        heldout, test_report = _convert(data, test_split, kind, report.format or fmt)
        report = report.merge(test_report)
    else:
        train, heldout = _carve(train, data.test_size, seed)
    return _capped(data, train, heldout, report, seed)


def _capped(data, train: list, heldout: list, report: DataReport, seed: int) -> tuple[list, list, DataReport]:
    """``max_rows`` / ``max_eval_rows`` applied (a seeded subset, the rest counted)."""
    train = _cap(train, data.max_rows, seed, report, "max_rows")
    heldout = _cap(heldout, data.max_eval_rows, seed + 1, report, "max_eval_rows")
    report.rows_kept = len(train) + len(heldout)
    return train, heldout, report

