"""Reading local files and folders, splits, stop/skip error handling with counted drops, and the
offline Hub error."""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path

import pytest

from preftune.config import DataConfig
from preftune.data.formats import RowError
from preftune.data.rows import PreferenceRow, SFTRow
from preftune.data.sources import DataReport, has_split, load_rows, read_records
from preftune.errors import DataError, PreftuneError


def pair(i: int, **extra) -> dict:
    return {"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1), **extra}


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    """One JSON object per line; ``raw_lines`` puts raw text at given 1-based line numbers."""
    lines = [json.dumps(r) for r in records]
    for line_no, text in sorted((raw_lines or {}).items()):
        lines.insert(line_no - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def data_cfg(source: Path | str, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


# ---------------------------------------------------------------- reading


def test_jsonl_rows_are_line_numbers(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [pair(1), pair(2)], raw_lines={2: ""})  # blank line 2 is skipped
    assert [(r["prompt"], row) for r, _, row in read_records(str(f), "train")] == [("What is 1+1?", 1),
                                                                                   ("What is 2+2?", 3)]


def test_bad_json_line_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [pair(1), pair(2), pair(3)], raw_lines={3: '{"prompt": "oops",'})
    with pytest.raises(DataError) as e:
        load_rows(data_cfg(f), "preference", seed=0)
    assert e.value.file == str(f) and e.value.row == 3
    assert f"{f}, row 3" in str(e.value) and "not valid JSON" in str(e.value)


def test_json_csv_parquet_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [pair(i, category="math") for i in range(1, 5)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    for ext in ("json", "csv", "parquet"):
        got = [(r, row) for r, _, row in read_records(str(tmp_path / f"d.{ext}"), "train")]
        assert got == [(r, i) for i, r in enumerate(records, 1)], ext
        train, held, rep = load_rows(data_cfg(tmp_path / f"d.{ext}", test_size=0.25), "preference", seed=0)
        assert rep.format == "standard" and len(train) == 3 and len(held) == 1
        assert all(r.meta == {"category": "math"} for r in train + held)


def test_csv_decodes_json_message_cells(tmp_path):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(conv)])
    train, _, rep = load_rows(data_cfg(tmp_path / "c.csv", test_size=0.0), "sft", seed=0)
    assert rep.format == "messages" and train == [SFTRow(conv[:1], "Hello", {})]


def test_folder_splits_by_file_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [pair(i) for i in range(5)])
    write_jsonl(tmp_path / "test.jsonl", [pair(i) for i in range(100, 103)])
    assert has_split(str(tmp_path), "train") and has_split(str(tmp_path), "test")
    assert not has_split(str(tmp_path), "validation")
    train, held, rep = load_rows(data_cfg(tmp_path), "preference", seed=0)
    assert len(train) == 5 and len(held) == 3
    assert all(r.prompt.startswith("What is 10") for r in held)
    assert rep.rows_read == 8 and rep.rows_kept == 8 and rep.dropped == {}


def test_folder_without_split_names_is_all_train(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "a.jsonl", [pair(1)])
    write_jsonl(tmp_path / "sub" / "b.jsonl", [pair(2)])
    assert [r["prompt"] for r, _, _ in read_records(str(tmp_path), "train")] == ["What is 1+1?", "What is 2+2?"]
    assert not has_split(str(tmp_path), "test")
    with pytest.raises(DataError, match="no data files for split 'test'"):
        list(read_records(str(tmp_path), "test"))


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(read_records(str(tmp_path / "nope.jsonl"), "train"))


def test_offline_hub_name_says_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PreftuneError) as e:
        load_rows(DataConfig(source="preftune-test/no-such-dataset"), "preference", seed=0)
    assert "not local" in str(e.value) and "local path" in str(e.value)


# ---------------------------------------------------------------- held-out and caps


def test_carve_off_is_reproducible_and_disjoint(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(20)])
    cfg = data_cfg(f, test_size=0.2)
    train, held, _ = load_rows(cfg, "preference", seed=3)
    again, held_again, _ = load_rows(cfg, "preference", seed=3)
    assert (train, held) == (again, held_again)
    assert len(held) == 4 and len(train) == 16
    assert not {r.key for r in train} & {r.key for r in held}
    _, other_held, _ = load_rows(cfg, "preference", seed=4)
    assert {r.key for r in other_held} != {r.key for r in held}


def test_max_rows_is_a_seeded_subset_and_counted(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(20)])
    cfg = data_cfg(f, test_size=0.5, max_rows=4, max_eval_rows=3)
    train, held, rep = load_rows(cfg, "preference", seed=0)
    assert len(train) == 4 and len(held) == 3
    assert rep.dropped == {"max_rows": 6, "max_eval_rows": 7}
    assert rep.rows_read == 20 == rep.rows_kept + sum(rep.dropped.values())
    assert load_rows(cfg, "preference", seed=0)[0] == train


# ---------------------------------------------------------------- malformed rows: stop and skip


MALFORMED = {
    "missing": ({"prompt": "p", "rejected": "r"}, "chosen", "missing_field"),
    "wrong_type": ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen", "wrong_type"),
}
EMPTY = {"prompt": "p", "chosen": "ok", "rejected": "   "}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_row_stops_with_file_row_field(tmp_path, case):
    bad, field, reason = MALFORMED[case]
    f = write_jsonl(tmp_path / "d.jsonl", [pair(1), pair(2), bad, pair(3)])
    with pytest.raises(RowError) as e:
        load_rows(data_cfg(f), "preference", seed=0)
    assert (e.value.file, e.value.row, e.value.field, e.value.reason) == (str(f), 3, field, reason)
    assert f"{f}, row 3, field '{field}'" in str(e.value)


def test_quality_drops_are_counted_under_the_default_stop(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [pair(1), EMPTY, pair(2)])
    train, _, rep = load_rows(data_cfg(f, test_size=0.0), "preference", seed=0)
    assert [r.chosen for r in train] == ["2", "4"] and rep.dropped == {"empty_completion": 1}
    assert rep.rows_read == 3 == rep.rows_kept + sum(rep.dropped.values())


def test_skip_mode_counts_every_malformed_row(tmp_path):
    records = [pair(1), pair(2)] + [bad for bad, _, _ in MALFORMED.values()] + [EMPTY, pair(3), [1, 2]]
    f = write_jsonl(tmp_path / "d.jsonl", records, raw_lines={4: "{not json"})
    train, held, rep = load_rows(data_cfg(f, on_error="skip", test_size=0.0), "preference", seed=0)
    assert [r.chosen for r in train] == ["2", "4", "6"] and held == []
    assert rep.dropped == {"missing_field": 1, "wrong_type": 2, "empty_completion": 1, "bad_json": 1}
    assert rep.rows_read == 8 and rep.rows_kept == 3


def test_shp_ratio_drops_are_counted_not_errors(tmp_path):
    base = {"history": "Q", "human_ref_A": "good", "human_ref_B": "bad", "labels": 1}
    f = write_jsonl(tmp_path / "shp.jsonl", [{**base, "score_A": 10, "score_B": 2}, {**base, "score_A": 3, "score_B": 2}])
    train, _, rep = load_rows(data_cfg(f, test_size=0.0), "preference", seed=0)
    assert rep.format == "shp" and len(train) == 1 and rep.dropped == {"score_ratio": 1}
    train, _, rep = load_rows(data_cfg(f, test_size=0.0, min_score_ratio=1.5), "preference", seed=0)
    assert len(train) == 2 and rep.dropped == {}


def test_sft_kind_reads_preference_data_as_chosen(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [pair(1, category="math")])
    train, _, rep = load_rows(data_cfg(f, test_size=0.0), "sft", seed=0)
    assert rep.format == "standard" and train == [SFTRow("What is 1+1?", "2", {"category": "math"})]


def test_explicit_format_and_kind_mismatch(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                           "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}])
    train, _, rep = load_rows(data_cfg(f, format="implicit", test_size=0.0), "preference", seed=0)
    assert rep.format == "implicit" and isinstance(train[0], PreferenceRow)
    with pytest.raises(DataError, match="format .alpaca. does not give preference rows"):
        load_rows(data_cfg(f, format="alpaca"), "preference", seed=0)


def test_undetectable_columns_raise(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"columns \['answer', 'question'\]"):
        load_rows(data_cfg(f), "preference", seed=0)


def test_embedded_source_reads_package_resources(monkeypatch, tmp_path):
    from preftune.data import sources

    assert sources.resources_dir().name == "resources" and (sources.resources_dir().parent / "cli.py").is_file()
    write_jsonl(tmp_path / "mini_train.jsonl", [pair(i) for i in range(3)])
    write_jsonl(tmp_path / "mini_test.jsonl", [pair(9)])
    monkeypatch.setattr(sources, "resources_dir", lambda: tmp_path)
    train, held, _ = load_rows(DataConfig(source="embedded:mini"), "preference", seed=0)
    assert len(train) == 3 and [r.chosen for r in held] == ["18"]
    with pytest.raises(PreftuneError, match="unknown embedded dataset 'embedded:nope'.*embedded:mini"):
        load_rows(DataConfig(source="embedded:nope"), "preference", seed=0)


def test_report_merge_and_dict():
    a = DataReport(3, 2, {"bad_json": 1}, "hh")
    b = DataReport(4, 3, {"bad_json": 1, "score_ratio": 0})
    m = a.merge(b)
    assert m.to_dict() == {"rows_read": 7, "rows_kept": 5, "dropped": {"bad_json": 2}, "format": "hh", "notes": []}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf16_and_utf32_files_are_read_as_what_they_are(tmp_path, encoding, suffix):
    """What some Windows editors save: with a byte-order mark (utf-16, utf-32) or without one (-le, -be).
    Read before as 7 rows of bad JSON; now the same rows as the file's UTF-8 twin, non-ASCII text included."""
    rows = [{"prompt": f"Combien font {i}+{i} ? é ü 漢", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
            for i in range(1, 4)]
    utf8 = tmp_path / f"utf8{suffix}"
    if suffix == ".jsonl":
        utf8.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        utf8.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        with open(utf8, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    wide = tmp_path / f"wide{suffix}"
    wide.write_bytes(utf8.read_text(encoding="utf-8").encode(encoding))
    assert [r for r, _, _ in read_records(str(wide), "train")] == [r for r, _, _ in read_records(str(utf8), "train")]
    assert [r for r, _, _ in read_records(str(wide), "train")][0]["prompt"] == rows[0]["prompt"]


def test_a_file_that_starts_as_utf16_but_is_not_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(codecs.BOM_UTF16_LE + b"{\x00\xd8")  # a lone high surrogate, then the file ends
    with pytest.raises(DataError) as e:
        list(read_records(str(f), "train"))
    assert e.value.file == str(f) and "UTF-16" in str(e.value) and "save it as UTF-8" in str(e.value)
