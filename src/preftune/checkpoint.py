"""Checkpoints: written atomically (temporary folder, then rename), holding what an exact resume needs
(trainable weights, optimizer, RNG states, loop state) as safetensors and JSON (nothing is ever
unpickled), with a manifest of sizes and hashes written last and verified on load; pruned to
``save_total_limit``; the Hugging Face folders (``best/``, ``final/``) that users load; and the
clean-up of temporary folders left by killed saves."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from preftune.errors import PreftuneError
from preftune.files import atomic_dir, json_default, remove_stale
from preftune.paths import StageDir

log = logging.getLogger("preftune")


def clean_stale(root: Path) -> list[Path]:
    """Remove what killed saves left in a run folder (``.step-N.tmp-PID``, ``.final.tmp-PID`` ...);
    they can be as large as a model each. Returns the removed paths."""
    stage = StageDir(root)
    removed = [p for d in (stage.root, stage.checkpoints_dir, stage.snapshots_dir) if d.is_dir()
               for p in sorted(d.iterdir()) if remove_stale(p)]
    for p in removed:
        log.info("removed %s, left by an interrupted save", p)
    return removed


def save_hf(model, tokenizer, folder: Path, extra: dict[str, dict] | None = None,
            state_dict: dict | None = None) -> Path:
    """``save_pretrained`` the model (adapter only, for peft) and tokenizer, atomically, with
    ``extra`` JSON files (name -> content) such as ``best.json`` in the same folder. ``state_dict``:
    the model's full weights when its own parameters are shards (gathered by distributed.py)."""

    def write(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1))

    return atomic_dir(folder, write, replace=True)


def rng_state() -> tuple[dict, dict]:
    """(tensors, JSON) of the Python, NumPy, torch and CUDA random states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    plain = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_rng(path: Path) -> None:
    """The random states as safetensors + JSON (a sharded checkpoint's ``rng.safetensors``)."""
    _save_with_json(path, *rng_state())


def load_rng(path: Path) -> None:
    set_rng_state(*_load_with_json(path))


def optimizer_tensors(state_dict: dict) -> tuple[dict, dict]:
    """An optimizer ``state_dict`` as (tensors, JSON): each state tensor under ``state.P.NAME``,
    everything else (steps as numbers, param groups) in the JSON."""
    tensors, state = {}, {}
    for pid, entry in state_dict["state"].items():
        state[str(pid)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
                state[str(pid)][name] = {"tensor": f"state.{pid}.{name}"}
            else:
                state[str(pid)][name] = {"value": value}
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def optimizer_state_dict(tensors: dict, plain: dict, optimizer) -> dict:
    """The inverse of :func:`optimizer_tensors`; JSON lists go back to tuples where ``optimizer`` has tuples."""
    state = {int(pid): {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entry.items()}
             for pid, entry in plain["state"].items()}
    groups = []
    for saved, current in zip(plain["param_groups"], optimizer.param_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def _save_with_json(path: Path, tensors: dict, plain: dict) -> None:
    save_file(tensors, path, metadata={"json": json.dumps(plain, default=json_default)})


def _load_with_json(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["json"])


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Sizes and sha256 of every file in ``folder``, written last: a checkpoint without one is incomplete."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file of ``folder``'s manifest is there with its size and hash, else what is wrong."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the write did not finish, or an older preftune wrote it)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def save_checkpoint(folder: Path, model, optimizer, state: dict) -> Path:
    """Trainable weights, optimizer and RNG states (safetensors; no pickle anywhere), the loop state
    (``state.json``) and, last, the manifest; the folder appears only once it is complete."""
    def write(tmp: Path):
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, tmp / "trainable.safetensors")
        _save_with_json(tmp / "optimizer.safetensors", *optimizer_tensors(optimizer.state_dict()))
        _save_with_json(tmp / "rng.safetensors", *rng_state())
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)

    return atomic_dir(folder, write, replace=True)


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore what :func:`save_checkpoint` wrote (after verifying its manifest); returns the loop state."""
    if problem := verify_checkpoint(folder):
        raise PreftuneError(f"checkpoint {folder} is incomplete: {problem}; delete it to resume from an earlier one")
    name = "trainable.safetensors"
    try:
        weights = load_file(folder / name)
        name = "optimizer.safetensors"
        optim = optimizer_state_dict(*_load_with_json(folder / name), optimizer)
        name = "rng.safetensors"
        rng = _load_with_json(folder / name)
    except Exception as e:  # not safetensors, or not the layout save_checkpoint writes
        raise PreftuneError(f"checkpoint {folder}: {name} is unreadable ({type(e).__name__}: {e}); delete the "
                            "checkpoint to resume from an earlier one") from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise PreftuneError(f"checkpoint {folder} lacks trainable weights {missing[:3]}: was it from another model?")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    optimizer.load_state_dict(optim)
    set_rng_state(*rng)
    return json.loads((folder / "state.json").read_text())


def latest_complete(root: Path) -> Path | None:
    """The newest step checkpoint that verifies, saying which newer ones were passed over and why."""
    for folder in reversed(step_checkpoints(root)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        log.warning("checkpoint %s is incomplete (%s); falling back to the previous one", folder, problem)
    return None


def step_checkpoints(root: Path) -> list[Path]:
    """``root/checkpoints/step-N`` folders, oldest first."""
    return StageDir(root).checkpoints()


def snapshots(root: Path) -> list[Path]:
    """``root/snapshots/step-N`` model folders (``eval.curve_every``), in step order."""
    return StageDir(root).snapshots()


def prune(root: Path, keep: int) -> None:
    for old in step_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
