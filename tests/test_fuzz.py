"""Fuzzing the data readers: about 300 malformed files across every file type (JSONL, JSON, CSV,
Parquet, folders) and every row format, each read with ``on_error=stop`` and ``on_error=skip``.

For each file: no internal error (only PreftuneError escapes), the error names the file (and the row
and field where they apply: the malformed record is always row 3 and its field is known), under skip
``rows_read == rows_kept + dropped`` with exactly the malformed records dropped, and every kept row
goes through the real tokenizer."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from preftune.config import DataConfig
from preftune.data.sources import load_rows
from preftune.data.tokenize import RowKind, tokenize
from preftune.errors import DataError, PreftuneError

BAD_AT = 3  # the malformed record's row (1-based) in every record-level case
N = 5  # records per file


def _msgs(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


BASE: dict[str, Callable[[int], dict]] = {
    "standard": lambda i: {"prompt": f"What is {i} plus 2?", "chosen": f"{i + 2}.", "rejected": f"{i + 3}."},
    "hh": lambda i: {"chosen": f"\n\nHuman: hi {i}\n\nAssistant: hello", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: no"},
    "shp": lambda i: {"history": f"q {i}", "human_ref_A": "good", "human_ref_B": "bad", "labels": 1,
                      "score_A": 10, "score_B": 2},
    "chat": lambda i: {"chosen": _msgs(f"hi {i}", "hello"), "rejected": _msgs(f"hi {i}", "no")},
    "implicit": lambda i: {"chosen": f"User: hi {i}\n\nAssistant: hello", "rejected": f"User: hi {i}\n\nAssistant: no"},
    "alpaca": lambda i: {"instruction": f"Add {i} and 2", "input": "", "output": f"{i + 2}"},
    "messages": lambda i: {"messages": _msgs(f"hi {i}", "hello")},
    "completion": lambda i: {"prompt": f"{i}+2=", "completion": f"{i + 2}"},
}
KIND = {f: "sft" if f in ("alpaca", "messages", "completion") else "preference" for f in BASE}
REQUIRED = {"standard": ["prompt", "chosen", "rejected"], "hh": ["chosen", "rejected"],
            "shp": ["history", "human_ref_A", "human_ref_B", "labels"], "chat": ["chosen", "rejected"],
            "implicit": ["chosen", "rejected"], "alpaca": ["instruction", "output"], "messages": ["messages"],
            "completion": ["prompt", "completion"]}
REPLY = {"standard": "chosen", "hh": "chosen", "shp": "human_ref_A", "chat": "chosen", "implicit": "chosen",
         "alpaca": "output", "messages": "messages", "completion": "completion"}
"""The field that holds the reply (or the whole transcript) of each format."""
EMPTY_IS_A_DROP = {"standard", "shp", "alpaca", "completion"}
"""Formats whose REPLY field is the reply alone: an empty one is an empty completion, a counted drop in
both modes (real data has them); elsewhere an empty REPLY breaks the record's structure."""
TEXT = {"standard": "prompt", "hh": "chosen", "shp": "history", "chat": "chosen", "implicit": "chosen",
        "alpaca": "instruction", "messages": "messages", "completion": "prompt"}
"""A field holding text (directly or in message contents) to corrupt."""
MARK = "@@BAD@@"
ANY = "*"  # a field is named, whichever


def _corrupt(value: Any, text: str) -> Any:
    """``value`` with ``text`` inside its string (its last message's, for a message list)."""
    if isinstance(value, list):
        return value[:-1] + [dict(value[-1], content=value[-1]["content"] + text)]
    return value + text


def _nested(depth: int) -> Any:
    v: Any = "x"
    for _ in range(depth):
        v = [v]
    return v


@dataclass
class Case:
    name: str
    write: Callable[[Path], Path]  # folder -> the data source written in it
    kind: str = "preference"
    records: int | None = None  # records read (None: the file stops both modes)
    bad: dict[int, str | None] = field(default_factory=dict)  # row -> field (None: no field applies)
    file_error: str | None = None  # both modes stop with a DataError naming the file and this text
    drop: bool = False  # the bad rows are data-quality drops: counted in both modes, never an error


# ---------------------------------------------------------------- writers


def jsonl(recs: list, name: str = "data.jsonl", raw_lines: dict[int, bytes] | None = None) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        lines = [json.dumps(r).encode() for r in recs]
        for i, b in (raw_lines or {}).items():
            lines[i - 1] = b
        (d / name).write_bytes(b"\n".join(x.replace(MARK.encode(), b"\xff\xfe") for x in lines) + b"\n")
        return d / name
    return write


def json_list(recs: list, name: str = "data.json") -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        (d / name).write_bytes(json.dumps(recs, indent=1).encode().replace(MARK.encode(), b"\xc3\x28"))
        return d / name
    return write


def csv_file(recs: list[dict], name: str = "data.csv", extra: dict[int, list] | None = None,
             prefix: bytes = b"") -> Callable[[Path], Path]:
    import csv
    import io

    def write(d: Path) -> Path:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(list(recs[0]))
        for i, r in enumerate(recs, 1):
            cells = [json.dumps(v) if isinstance(v, (list, dict)) else v for v in r.values()]
            w.writerow(cells + (extra or {}).get(i, []))
        (d / name).write_bytes(prefix + buf.getvalue().encode().replace(MARK.encode(), b"\xed\xa0\x80"))
        return d / name
    return write


def parquet(recs: list[dict], name: str = "data.parquet", damage: Callable[[bytes], bytes] | None = None):
    def write(d: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), d / name)
        if damage:
            (d / name).write_bytes(damage((d / name).read_bytes()))
        return d / name
    return write


def raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return write


# ---------------------------------------------------------------- cases


def with_bad(fmt: str, bad: Any) -> list:
    recs: list = [BASE[fmt](i) for i in range(1, N + 1)]
    recs[BAD_AT - 1] = bad
    return recs


def mutations(fmt: str) -> list[tuple[str, Any, str | None]]:
    """(name, malformed record, field named) for JSON-like containers."""
    rec = BASE[fmt](BAD_AT)
    out = []
    for f in REQUIRED[fmt]:
        out.append((f"missing-{f}", {k: v for k, v in rec.items() if k != f}, f))
        out.append((f"null-{f}", rec | {f: None}, f))
        wrong = ("one", {"x": 1}, False) if f == "labels" else (0, {"x": 1}, False)
        out += [(f"type-{type(v).__name__}-{f}", rec | {f: v}, f) for v in wrong]
    t, r = TEXT[fmt], REPLY[fmt]
    out.append(("surrogate", rec | {t: _corrupt(rec[t], "\ud800")}, t))
    out.append(("nested-150", rec | {t: _nested(150)}, t))
    out.append(("empty-reply", rec | {r: "" if isinstance(rec[r], str) else []}, r))
    out += [(f"not-an-object-{i}", v, None) for i, v in enumerate(([1, 2], 7, "text", None))]
    if fmt == "shp":
        out += [("nan-score", rec | {"score_A": float("nan")}, "score_A"),
                ("inf-label", rec | {"labels": float("inf")}, "labels")]
    if fmt == "alpaca":
        out += [(f"input-{v!r}", rec | {"input": v}, "input") for v in (0, False, [])]
    return out


def cases() -> list[Case]:
    out: list[Case] = []
    for fmt in BASE:
        kind = KIND[fmt]
        bad1 = {BAD_AT: None}
        for name, rec, fld in mutations(fmt):
            drop = name == "empty-reply" and fmt in EMPTY_IS_A_DROP
            out.append(Case(f"jsonl-{fmt}-{name}", jsonl(with_bad(fmt, rec)), kind, N, {BAD_AT: fld}, drop=drop))
            out.append(Case(f"json-{fmt}-{name}", json_list(with_bad(fmt, rec)), kind, N, {BAD_AT: fld}, drop=drop))
        t = TEXT[fmt]
        byte_rec = BASE[fmt](BAD_AT) | {t: _corrupt(BASE[fmt](BAD_AT)[t], MARK)}
        out.append(Case(f"jsonl-{fmt}-bad-byte", jsonl(with_bad(fmt, byte_rec)), kind, N, {BAD_AT: t}))
        out.append(Case(f"json-{fmt}-bad-byte", json_list(with_bad(fmt, byte_rec)), kind, N, {BAD_AT: t}))
        recs = [BASE[fmt](i) for i in range(1, N + 1)]
        out.append(Case(f"jsonl-{fmt}-cut-line", jsonl(recs, raw_lines={BAD_AT: b'{"prompt": "x", "cho'}),
                        kind, N, bad1))
        out.append(Case(f"jsonl-{fmt}-5000-deep", jsonl(recs, raw_lines={BAD_AT: b"[" * 5000 + b"]" * 5000}),
                        kind, N, bad1))
        out.append(Case(f"jsonl-{fmt}-bom-upper", jsonl(recs, "DATA.JSONL", {1: b"\xef\xbb\xbf" + json.dumps(
            recs[0]).encode()}), kind, N))
        out.append(Case(f"json-{fmt}-bom", lambda d, r=recs: raw("d.json", b"\xef\xbb\xbf" + json.dumps(r).encode())(d),
                        kind, N))
        huge = BASE[fmt](BAD_AT) | {t: _corrupt(BASE[fmt](BAD_AT)[t], "y" * 200_000)}
        out.append(Case(f"jsonl-{fmt}-huge-text", jsonl(with_bad(fmt, huge)), kind, N))
        out.append(Case(f"json-{fmt}-5000-deep", raw("d.json", b"[" * 5000 + b"]" * 5000), kind,
                        file_error="nested too deeply"))
        # CSV: cells are text (message lists as JSON)
        out.append(Case(f"csv-{fmt}-valid-bom", csv_file(recs, prefix=b"\xef\xbb\xbf"), kind, N))
        out.append(Case(f"csv-{fmt}-huge-cell", csv_file(with_bad(fmt, huge)), kind, N))
        out.append(Case(f"csv-{fmt}-extra-cells", csv_file(recs, extra={BAD_AT: ["x", "y"]}), kind, N, bad1))
        out.append(Case(f"csv-{fmt}-bad-byte", csv_file(with_bad(fmt, byte_rec)), kind, N, {BAD_AT: t}))
        r = REPLY[fmt]
        empty = BASE[fmt](BAD_AT) | {r: ""}
        out.append(Case(f"csv-{fmt}-empty-cell", csv_file(with_bad(fmt, empty)), kind, N, {BAD_AT: r},
                        drop=fmt in EMPTY_IS_A_DROP))
        out.append(Case(f"csv-{fmt}-upper", csv_file(recs, "DATA.CSV"), kind, N))
        # Parquet
        out.append(Case(f"parquet-{fmt}-valid-upper", parquet(recs, "D.PARQUET"), kind, N))
        out.append(Case(f"parquet-{fmt}-null", parquet(with_bad(fmt, BASE[fmt](BAD_AT) | {r: None})), kind, N,
                        {BAD_AT: r}))
        out.append(Case(f"parquet-{fmt}-truncated", parquet(recs, damage=lambda b: b[: len(b) // 2]), kind,
                        file_error="not a readable Parquet file"))
    out += file_level_cases()
    return out


def file_level_cases() -> list[Case]:
    rng = random.Random(0)
    std = [BASE["standard"](i) for i in range(1, N + 1)]
    noise = bytes(rng.randrange(256) for _ in range(300))
    c = [
        Case("jsonl-empty", raw("d.jsonl", b""), file_error="no records"),
        Case("jsonl-blank", raw("d.jsonl", b"\n \n\t\n"), file_error="no records"),
        Case("jsonl-binary", raw("d.jsonl", b"\x00\x01\x02\xff\n\xfe\xfd\n"), records=2,
             bad={1: None, 2: None}),
        Case("jsonl-no-format-fits", jsonl([{"question": "q", "answer": "a"}] * 3), file_error="cannot detect"),
        Case("json-empty", raw("d.json", b""), file_error="not valid JSON"),
        Case("json-object", raw("d.json", b'{"prompt": "x"}'), file_error="must hold a list"),
        Case("json-cut", raw("d.json", b'[{"prompt": "x", "chosen"'), file_error="not valid JSON"),
        Case("json-binary", raw("d.json", noise), file_error="not valid JSON"),
        Case("csv-empty", raw("d.csv", b""), file_error="no records"),
        Case("csv-header-only", raw("d.csv", b"prompt,chosen,rejected\n"), file_error="no records"),
        Case("csv-duplicate-header", raw("d.csv", b"prompt,chosen,chosen\na,b,c\n"), file_error="twice"),
        Case("csv-nul-byte", raw("d.csv", b"prompt,chosen,rejected\na,b\x00,c\n"), records=1),
        Case("csv-binary", raw("d.csv", b"\xfe\x00junk,\x80\n\x81,\x82\n"), records=1, bad={1: ANY}),
        # a UTF-16 byte-order mark makes it UTF-16 text (data/sources.py): this one decodes to a header alone
        Case("csv-utf16-mark-then-binary", raw("d.csv", b"\xff\xfe\x00junk,\x80\n\x81,\x82\n"),
             file_error="no records"),
        Case("parquet-empty", raw("d.parquet", b""), file_error="not a readable Parquet file"),
        Case("parquet-noise", raw("d.parquet", noise), file_error="not a readable Parquet file"),
        Case("parquet-magic-only", raw("d.parquet", b"PAR1" + noise + b"PAR1"), file_error="not a readable Parquet"),
        Case("parquet-no-format-fits", parquet([{"q": "a"}] * 3), file_error="cannot detect"),
        Case("txt-file", raw("d.txt", b"hello"), file_error="unsupported data file type"),
    ]

    def folder_mixed(d: Path) -> Path:
        (d / "src").mkdir()
        jsonl(std[:2], "A.JSONL")(d / "src")
        json_list(std[2:4], "b.Json")(d / "src")
        csv_file(std[4:], "c.csv")(d / "src")
        (d / "src" / "notes.txt").write_text("ignored, with a warning")
        return d / "src"

    def folder_corrupt(d: Path) -> Path:
        (d / "src").mkdir()
        jsonl(std, "a.jsonl")(d / "src")
        raw("broken.parquet", noise)(d / "src")
        return d / "src"

    c.append(Case("folder-upper-case-mixed", folder_mixed, records=N))
    c.append(Case("folder-corrupt-parquet", folder_corrupt, file_error="not a readable Parquet file"))
    return c


CASES = cases()


def test_enough_cases():
    assert len(CASES) >= 200 and len({c.name for c in CASES}) == len(CASES)
    assert {c.name.split("-")[0] for c in CASES} >= {"jsonl", "json", "csv", "parquet", "folder"}


def _load(source: Path, case: Case, on_error: str):
    data = DataConfig(source=str(source), on_error=on_error, test_split=None, test_size=0.0, max_length=64,
                      max_prompt_length=32)
    return data, load_rows(data, case.kind, seed=0)


def _named(err: DataError, path: Path) -> bool:
    """The error names the file it is about (a folder source names the broken file inside it)."""
    return err.file is not None and (Path(err.file) == path or Path(err.file).parent == path) and str(path) in str(err)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_malformed_file(case: Case, tmp_path, tokenizer):
    path = case.write(tmp_path)
    for on_error in ("stop", "skip"):
        try:
            data, (train, heldout, report) = _load(path, case, on_error)
        except DataError as e:  # anything else (an internal error) fails the test with its traceback
            str(e).encode("utf-8")  # printable
            assert _named(e, path), f"{on_error}: error does not name {path}: {e}"
            if case.file_error is not None:
                assert case.file_error in str(e), str(e)
                continue
            assert on_error == "stop" and case.bad and not case.drop, f"{on_error}: unexpected error {e}"
            row = min(case.bad)
            want = case.bad[row]
            assert e.row == row and (e.field == want or want == ANY and e.field), f"want row {row} field {want!r}: {e}"
            assert f"row {row}" in str(e) and (want is None or f"field '{e.field}'" in str(e))
            continue
        except PreftuneError as e:
            pytest.fail(f"{on_error}: a PreftuneError that is not a DataError: {e}")
        assert case.file_error is None, f"{on_error}: read without the expected error {case.file_error!r}"
        assert on_error == "skip" or not case.bad or case.drop, "stop mode read a malformed record without an error"
        dropped = sum(report.dropped.values())
        if case.drop:
            assert report.dropped == {"empty_completion": len(case.bad)}, report.dropped
        assert report.rows_read == report.rows_kept + dropped == case.records
        assert dropped == len(case.bad) and report.rows_kept == len(train) + len(heldout) == case.records - dropped
        tokenize(train, tokenizer, data, RowKind(case.kind))


@pytest.mark.parametrize("case", CASES[::15], ids=lambda c: c.name)
def test_malformed_file_through_the_cli(case: Case, tmp_path, capsys):
    """A sample of the cases through ``preftune data inspect``: exit 0, or 2 with one line naming the
    file; never a traceback or an internal error."""
    from preftune import cli

    path = case.write(tmp_path)
    for extra in ([], ["data.on_error=skip"]):
        rc = cli.main(["data", "inspect", str(path), "data.test_split=null", *extra]
                      + (["--sft"] if case.kind == "sft" else []))
        err = capsys.readouterr().err
        assert "Traceback" not in err and "internal error" not in err, err
        assert rc == 0 or (rc == 2 and str(path) in err), (rc, err)
