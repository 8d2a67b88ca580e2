"""Checkpoints on disk: no pickle is ever loaded (a crafted one would create a marker file), the
manifest catches a truncated checkpoint and resume falls back to the previous complete one, a kill -9
during a checkpoint write leaves a temporary folder that the resume removes before continuing the
same trajectory, and a full disk is named as such."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune import checkpoint as ckpt
from preftune.errors import PreftuneError
from preftune.train import run_stage
from test_train import make_cfg, metrics

SRC = Path(__file__).resolve().parents[1] / "src"


class Payload:
    """Unpickling this creates ``marker``: the file must never appear."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_pickle(path: Path, marker: Path) -> Path:
    torch.save({"state": {}, "param_groups": [], "evil": Payload(marker)}, path)
    return path


def test_optimizer_and_rng_round_trip_without_pickle(tmp_path):
    """AdamW state (tensors and the 0-dim step) and every RNG survive save/load exactly; the folder
    holds only safetensors and JSON, with a manifest covering every other file."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    folder = ckpt.save_checkpoint(tmp_path / "step-1", model, opt, {"step": 1})
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]
    assert set(json.loads((folder / "manifest.json").read_text())["files"]) == {
        "optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"}
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    assert ckpt.load_checkpoint(folder, model2, opt2) == {"step": 1}
    a, b = opt.state_dict(), opt2.state_dict()
    assert b["param_groups"][0]["betas"] == (0.8, 0.9) and b["param_groups"][0]["lr"] == 0.1
    for pid in a["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a["state"][pid][name], b["state"][pid][name], rtol=0, atol=0)
    torch.testing.assert_close(model.weight, model2.weight, rtol=0, atol=0)


def test_rng_state_is_restored_exactly(tmp_path):
    import random

    import numpy as np

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    folder = ckpt.save_checkpoint(tmp_path / "step-1", model, opt, {})
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ckpt.load_checkpoint(folder, model, opt)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def test_crafted_pickle_in_an_old_checkpoint_never_runs(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """A checkpoint in the old layout (optimizer.pt / rng.pt pickles) whose pickles would create a
    marker: --resume passes over it (no manifest) and starts afresh, and the marker never appears."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "PWNED"
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.max_steps": 2})
    out = Path(cfg.output_dir)
    old = out / "checkpoints" / "step-1"
    old.mkdir(parents=True)
    crafted_pickle(old / "optimizer.pt", marker)
    crafted_pickle(old / "rng.pt", marker)
    (old / "state.json").write_text(json.dumps({"step": 1}))
    with caplog.at_level(logging.WARNING, logger="preftune"):
        summary = run_stage(cfg, "dpo", out, str(tiny_model_dir), resume=True)
    assert not marker.exists()
    assert summary["resumed_from"] is None and summary["steps"] == 2
    assert "step-1 is incomplete (no manifest.json" in caplog.text
    with pytest.raises(PreftuneError, match="incomplete"):
        ckpt.load_checkpoint(old, torch.nn.Linear(1, 1), torch.optim.AdamW(torch.nn.Linear(1, 1).parameters()))
    assert not marker.exists()


def test_pickle_renamed_to_safetensors_is_refused_not_run(tmp_path):
    """A pickle put in place of rng.safetensors, manifest and all, fails to parse; it never runs."""
    marker = tmp_path / "PWNED"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    folder = ckpt.save_checkpoint(tmp_path / "step-1", model, opt, {})
    (folder / "rng.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    ckpt.write_manifest(folder)
    with pytest.raises(PreftuneError, match="rng.safetensors is unreadable.*delete the checkpoint"):
        ckpt.load_checkpoint(folder, model, opt)
    assert not marker.exists()


OVER = {"dpo.max_steps": 6, "dpo.save_every": 2, "dpo.save_total_limit": 3, "dpo.batch_size": 2,
        "dpo.warmup_ratio": 0.2, "lora.dropout": 0.1}


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """step-4's weights cut in half: --resume says so, resumes from step-2, and the losses still match
    the uninterrupted run exactly."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    straight = make_cfg(tmp_path / "a", str(tiny_model_dir), **OVER)
    run_stage(straight, "dpo", Path(straight.output_dir), str(tiny_model_dir))
    cfg = make_cfg(tmp_path / "b", str(tiny_model_dir), **OVER)
    out = Path(cfg.output_dir)
    run_stage(cfg, "dpo", out, str(tiny_model_dir), stop_at=4)
    weights = out / "checkpoints" / "step-4" / "trainable.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "truncated" in ckpt.verify_checkpoint(weights.parent)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        summary = run_stage(cfg, "dpo", out, str(tiny_model_dir), resume=True)
    assert "step-4 is incomplete (trainable.safetensors has" in caplog.text
    assert "falling back to the previous one" in caplog.text
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    a = [m["loss"] for m in metrics(Path(straight.output_dir))]
    b = [m["loss"] for m in metrics(out)]
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6


KILLER = """
import json, os, signal, sys
from preftune import checkpoint
from preftune.config.validate import config_from_dict
from preftune.train import run_stage

real = checkpoint.save_file

def dying(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    if ".step-4.tmp-" in str(path) and str(path).endswith("optimizer.safetensors"):
        with open(path, "r+b") as f:  # half of the file on disk, then kill -9 mid-checkpoint
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_file = dying  # where checkpoints write it
cfg = config_from_dict(json.loads(sys.argv[1]))
run_stage(cfg, "dpo", cfg.output_dir, sys.argv[2])
"""


def test_kill_during_a_checkpoint_write_then_resume(tmp_path, tiny_model_dir, monkeypatch):
    """kill -9 in the middle of writing step-4: the folder never appears (only its temporary
    folder), metrics.jsonl ends in half a line, the resume removes the temporary folder, resumes from
    step-2 and ends on the uninterrupted trajectory."""
    from preftune.config import to_dict

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    straight = make_cfg(tmp_path / "a", str(tiny_model_dir), **OVER)
    run_stage(straight, "dpo", Path(straight.output_dir), str(tiny_model_dir))
    cfg = make_cfg(tmp_path / "b", str(tiny_model_dir), **OVER)
    out = Path(cfg.output_dir)
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(to_dict(cfg)), str(tiny_model_dir)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[1] == "step-2" and names[0].startswith(".step-4.tmp-") and len(names) == 2
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')  # and a line cut short by the kill
    summary = run_stage(cfg, "dpo", out, str(tiny_model_dir), resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    a = [m["loss"] for m in metrics(Path(straight.output_dir))]
    b = [m["loss"] for m in metrics(out)]
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "run"
    stale = [root / f".final.tmp-{dead.pid}", root / "checkpoints" / f".step-3.tmp-{dead.pid}",
             root / "checkpoints" / f".step-1.old-{dead.pid}", root / "snapshots" / f".step-2.tmp-{dead.pid}"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "w.bin").write_bytes(b"x" * 100)
    (root / f".run.json.tmp-{dead.pid}").write_text("{")
    live = root / f".best.tmp-{os.getppid()}"  # a live process's save in progress
    live.mkdir()
    kept = [root / "checkpoints" / "step-2", root / "final"]
    for k in kept:
        k.mkdir(parents=True)
    removed = ckpt.clean_stale(root)
    assert sorted(removed) == sorted(stale + [root / f".run.json.tmp-{dead.pid}"])
    assert all(not p.exists() for p in removed) and live.is_dir() and all(k.is_dir() for k in kept)


def test_full_disk_names_the_path_and_leaves_no_folder(tmp_path):
    """A real ENOSPC (writes into /dev/full) during a save: 'no space left on device' and the folder
    it was writing, with neither the folder nor its temporary left behind."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")

    def build(tmp: Path):
        os.symlink("/dev/full", tmp / "weights.bin")
        with open(tmp / "weights.bin", "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()

    target = tmp_path / "checkpoints" / "step-1"
    with pytest.raises(PreftuneError, match=f"no space left on device while writing {target}"):
        ckpt.atomic_dir(target, build)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_full_disk_through_safetensors(tmp_path):
    """The same through safetensors on a 64 KiB tmpfs (when this machine lets the test mount one)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        model = torch.nn.Linear(256, 256)
        with pytest.raises(PreftuneError, match=f"no space left on device while writing {small / 'step-1'}"):
            ckpt.save_checkpoint(small / "step-1", model, torch.optim.AdamW(model.parameters()), {})
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)])
