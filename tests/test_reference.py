"""The reference-log-prob cache on disk: safetensors, never pickle (a crafted pickle in the cache
would create a marker file), exact round trip, a damaged file named with "delete it to recompute",
and no partial file after a failed write."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from preftune import reference as refs
from preftune.errors import PreftuneError
from preftune.train import run_stage
from test_checkpoint import Payload
from test_train import make_cfg

TABLE = {"row-a": {"chosen": -12.25, "rejected": -13.0078125}, "row-b": {"chosen": float(torch.tensor(-1 / 3)),
                                                                          "rejected": -0.5}}


def test_table_round_trips_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    ref = refs.load_or_precompute("k1", lambda: TABLE)
    assert ref.computed and ref.path == tmp_path / "reference" / "k1.safetensors"
    again = refs.load_or_precompute("k1", lambda: pytest.fail("must reuse the cache"))
    assert again.table == TABLE and not again.computed
    out = again.logps({"keys": ["row-b", "row-a"]})
    assert out["chosen"].tolist() == [float(torch.tensor(-1 / 3)), -12.25]


def test_crafted_pickle_in_the_cache_never_runs(tmp_path, tiny_model_dir, monkeypatch):
    """A normal DPO run, then its cache replaced by a pickle whose payload would create a marker (at
    the cache's name and at the old ``.pt`` name): the next run refuses the file, naming it, and the
    marker never appears."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "PWNED"
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.max_steps": 1, "dpo.reference": "precomputed"})
    run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    (cache,) = (tmp_path / "cache" / "reference").iterdir()
    for path in (cache, cache.with_suffix(".pt")):
        torch.save({"evil": Payload(marker)}, path)
    with pytest.raises(PreftuneError, match=f"reference cache {cache} is damaged.*delete it to recompute"):
        run_stage(cfg, "dpo", tmp_path / "second", str(tiny_model_dir))  # the first run's folder is finished
    assert not marker.exists()


def test_truncated_cache_names_its_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    path = refs.load_or_precompute("k2", lambda: TABLE).path
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(PreftuneError, match=f"reference cache {path} is damaged or incomplete.*delete it to recompute"):
        refs.load_or_precompute("k2", lambda: TABLE)
    path.unlink()  # the advice works
    assert refs.load_or_precompute("k2", lambda: TABLE).table == TABLE


def test_stale_temporary_from_a_killed_write_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "reference" / f".k3.safetensors.tmp-{dead.pid}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    refs.load_or_precompute("k3", lambda: TABLE)
    assert sorted(p.name for p in stale.parent.iterdir()) == ["k3.safetensors"]


def test_full_disk_leaves_no_partial_cache_file(tmp_path, monkeypatch):
    """The cache on a 64 KiB tmpfs and a table too large for it: 'no space left on device' naming
    the cache file, and nothing left in the cache folder (when this machine lets the test mount one)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        monkeypatch.setenv("PREFTUNE_CACHE", str(small))
        big = {f"row-{i}": {"chosen": -1.0 * i, "rejected": -2.0 * i} for i in range(20_000)}
        path = small / "reference" / "k4.safetensors"
        with pytest.raises(PreftuneError, match=f"no space left on device while writing {path}"):
            refs.load_or_precompute("k4", lambda: big)
        assert os.listdir(small / "reference") == []
    finally:
        subprocess.run(["umount", str(small)])
