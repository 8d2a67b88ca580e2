"""Run-folder checks: --resume refuses a changed lr, seed or dataset (listing each) unless
--allow-changes; key=value overrides may follow --resume; a read-only output_dir stops the run
before any data is read; half a line at the end of metrics.jsonl does not block a resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from preftune import cli
from preftune.config import to_dict
from preftune.errors import PreftuneError
from preftune.resume import check_writable, resume_changes, trim_metrics
from preftune.train import run_stage
from test_train import make_cfg, write_pairs

OVER = {"dpo.max_steps": 4, "dpo.save_every": 2, "dpo.batch_size": 2}


@pytest.fixture
def stopped_run(tmp_path, tiny_model_dir, monkeypatch):
    """A DPO run stopped after its step-2 checkpoint, and its config as a YAML file."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **OVER)
    run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir), stop_at=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return cfg, path


def test_changed_lr_seed_and_data_are_refused_and_listed(stopped_run, tmp_path, capsys):
    cfg, path = stopped_run
    other = write_pairs(tmp_path / "other", n_train=20)
    rc = cli.main(["dpo", str(path), "--resume", "dpo.lr=0.02", "seed=3", f"data.source={other}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--resume would continue the checkpoints in" in err and "(4 change(s))" in err
    for line in ("dpo.lr: 0.01 -> 0.02", "seed: 0 -> 3", f"data.source: '{tmp_path / 'data'}' -> '{other}'",
                 "data: the rows differ (fingerprint"):
        assert line in err
    assert "--resume --allow-changes" in err
    run = Path(cfg.output_dir)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_allow_changes_continues_and_unchanged_resume_needs_nothing(stopped_run, capsys):
    cfg, path = stopped_run
    assert resume_changes(Path(cfg.output_dir), cfg, "dpo", json.loads(
        (Path(cfg.output_dir) / "data.json").read_text())["fingerprint"]) == []
    # a harmless change (how often to log) is not a change of setup
    assert cli.main(["dpo", str(path), "--resume", "dpo.log_every=1", "dpo.lr=0.02", "--allow-changes"]) == 0
    summary = json.loads((Path(cfg.output_dir) / "run.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 4


def test_allow_changes_without_resume_is_an_error(stopped_run, capsys):
    _, path = stopped_run
    assert cli.main(["dpo", str(path), "--allow-changes"]) == 2
    assert "--allow-changes goes with --resume" in capsys.readouterr().err


def read_only_folder(tmp_path: Path) -> Path | None:
    """A folder this process cannot write: chmod for a normal user, a read-only tmpfs for root."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        return None
    return ro


def test_read_only_output_dir_stops_before_the_data_is_read(tmp_path, tiny_model_dir, capsys):
    """The data source does not exist: had the data been read first, that would be the error."""
    ro = read_only_folder(tmp_path)
    if ro is None:
        pytest.skip("no way to make a read-only folder here")
    try:
        cfg = {"model": str(tiny_model_dir), "output_dir": str(ro / "run"), "data": {"source": "/nonexistent.jsonl"}}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert cli.main(["dpo", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"cannot write {ro / 'run'}" in err and "choose another output_dir" in err
        assert "nonexistent" not in err and "Traceback" not in err
        with pytest.raises(PreftuneError, match="cannot write"):
            check_writable(ro)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)])


def test_half_a_line_at_the_end_of_metrics_is_dropped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "loss": 0.5}\n{"step": 4, "lo')
    assert trim_metrics(path, 2) == 2
    assert path.read_text() == '{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n'
    assert "line 4 is not a complete metrics record" in caplog.text


def test_cli_names_a_full_disk_anywhere(tmp_path, capsys):
    """Any write that meets a full disk (here /dev/full behind an output path) is one clear line, not an
    internal error (the run folder's own writes also name the path: test_checkpoint.py)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    os.symlink("/dev/full", tmp_path / "out.jsonl")
    assert cli.main(["data", "synth", "--n", "50", "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "internal" not in err
