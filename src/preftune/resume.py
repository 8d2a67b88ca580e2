"""What a run folder must satisfy before a stage trains into it: no finished run that this one would
replace (unless ``--overwrite`` or ``--resume``), writable (both checked before any data or model is
loaded), and on ``--resume`` the same setup as the run that wrote its checkpoints (config and
data fingerprint), so that one ``metrics.jsonl`` never mixes two runs. Also the tolerant trim of
``metrics.jsonl`` back to the checkpoint's step."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from preftune.checkpoint import step_checkpoints
from preftune.config import to_dict
from preftune.errors import PreftuneError
from preftune.files import disk_errors
from preftune.paths import StageDir

log = logging.getLogger("preftune")

NOT_COMPARED = ("output_dir", "threads", "report_to", "eval", "sweep", "trust_remote_code", "allow_pickle")
"""Top-level keys a resume may change: where and how a run is watched, not what it trains."""
STAGE_NOT_COMPARED = ("enabled", "eval_every", "eval_batch_size", "log_every", "save_every", "save_total_limit",
                      "nan_tolerance", "early_stopping", "early_stopping_metric", "early_stopping_mode", "patience",
                      "min_delta", "gradient_checkpointing", "chunked_logps")
"""Keys of the stage's own section that a resume may change."""


def check_finished(out: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to train into a folder that holds a finished run (``final/`` or ``run.json``), naming it
    and when it finished, unless ``resume`` (it then stays finished) or ``overwrite`` (its final model
    and summary are removed first, so a crash cannot leave the old model beside new records)."""
    folder = StageDir(out)
    done = [p for p in (folder.run, folder.final) if p.exists()]
    if not done or resume:
        return
    if overwrite:
        log.warning("--overwrite: replacing the finished run in %s", folder.root)
        shutil.rmtree(folder.final, ignore_errors=True)
        shutil.rmtree(folder.best, ignore_errors=True)
        folder.run.unlink(missing_ok=True)
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(p.stat().st_mtime for p in done)))
    raise PreftuneError(
        f"{folder.root} holds a run that finished at {when} ({folder.final.name}/ is its model); this run would "
        "replace it. Choose another output_dir (e.g. output_dir=runs/{name}-{time} gives each run its own "
        "folder), pass --overwrite to replace it, or --resume to continue its checkpoints.")


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file in it, so that a read-only or full output folder stops the
    run before any data, model or reference work."""
    out = Path(out)
    probe = out / f".write-probe.tmp-{os.getpid()}"  # a killed run's is removed by clean_stale
    try:
        with disk_errors(out):
            out.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
    except FileExistsError:
        raise PreftuneError(f"output_dir {out} exists and is not a folder; choose another output_dir") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # a read-only file system refuses even this
            pass


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "sweep":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _compared(key: str, stage: str) -> bool:
    head, _, rest = key.partition(".")
    other = "dpo" if stage == "sft" else "sft"
    if head in NOT_COMPARED or head == other:
        return False
    return not (head == stage and rest in STAGE_NOT_COMPARED)


def resume_changes(out: Path, cfg, stage: str, fingerprint: str) -> list[str]:
    """What differs between the run recorded in ``out`` (``config.yaml``, ``data.json``) and this one:
    ``["dpo.lr: 0.01 -> 0.02", "data: fingerprint ab12 -> cd34"]``. Keys the saved config lacks
    (written by an older preftune) are not compared."""
    run = StageDir(out)
    changes = []
    try:
        before = _flat(yaml.safe_load(run.config.read_text()) or {})
    except (OSError, yaml.YAMLError):
        before = {}
    now = _flat(to_dict(cfg))
    for key in sorted(before.keys() & now.keys()):
        if _compared(key, stage) and before[key] != now[key]:
            changes.append(f"{key}: {before[key]!r} -> {now[key]!r}")
    try:
        old_fp = json.loads(run.data.read_text()).get("fingerprint")
    except (OSError, ValueError):
        old_fp = None
    if old_fp is not None and fingerprint is not None and old_fp != fingerprint:
        changes.append(f"data: the rows differ (fingerprint {old_fp} -> {fingerprint})")
    return changes


def finished_alike(out: Path, cfg, stage: str) -> bool:
    """Whether ``out`` holds a finished run of ``stage`` with this config (the pipeline skips it)."""
    return StageDir(out).is_finished() and not resume_changes(out, cfg, stage, None)


def check_resume(out: Path, cfg, stage: str, fingerprint: str, allow_changes: bool = False) -> None:
    """Refuse to resume ``out``'s checkpoints with a changed setup unless ``allow_changes``."""
    if not step_checkpoints(Path(out)):
        return
    changes = resume_changes(out, cfg, stage, fingerprint)
    if not changes:
        return
    listed = "\n".join(f"  - {c}" for c in changes)
    if allow_changes:
        log.warning("resuming %s with %d change(s) (--allow-changes):\n%s", out, len(changes), listed)
        return
    raise PreftuneError(
        f"--resume would continue the checkpoints in {out} with a different setup ({len(changes)} change(s)):\n"
        f"{listed}\nResume with the config the run started with, choose another output_dir for a new run, or "
        "pass --resume --allow-changes to continue anyway (metrics.jsonl then holds both setups)."
    )


def trim_metrics(path: Path, step: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``step``; a half-written line (a kill mid-write) is
    dropped with a warning. Returns the lines kept."""
    keep = []
    lines = Path(path).read_text(errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a complete metrics record (a write cut short?); dropped", path, i)
            continue
        if record_step <= step:
            keep.append(line)
    Path(path).write_text("".join(ln + "\n" for ln in keep))
    return len(keep)
