"""Checkpoints: written atomically (temporary folder, then rename), holding what an exact resume needs
(trainable weights, optimizer, RNG states, loop state), pruned to ``save_total_limit``; and the
Hugging Face folders (``best/``, ``final/``) that users load."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch


def atomic_dir(final: Path, build, replace: bool = False) -> Path:
    """Build a folder through ``build(tmp)`` beside ``final`` and rename it into place.

    A crash leaves either the old folder or the new one, never half of one."""
    final = Path(final)
    if final.is_dir() and not replace:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _plain(o):
    return float(o) if hasattr(o, "__float__") else str(o)


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON through a temporary file and a rename (numpy scalars become floats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=_plain))
    tmp.replace(path)


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


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(folder: Path, model, optimizer, state: dict) -> Path:
    """Trainable weights + optimizer + RNG + loop state (``state`` is JSON)."""
    from safetensors.torch import save_file

    def write(tmp: Path):
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    return atomic_dir(folder, write, replace=True)


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state."""
    from safetensors.torch import load_file

    weights = load_file(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint {folder} lacks trainable weights {missing[:3]}: was it from another model?")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    return json.loads((folder / "state.json").read_text())


def step_checkpoints(root: Path) -> list[Path]:
    """``root/checkpoints/step-N`` folders, oldest first."""
    d = root / "checkpoints"
    found = [(int(m.group(1)), p) for p in d.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def snapshots(root: Path) -> list[Path]:
    """``root/snapshots/step-N`` model folders (``eval.curve_every``), in step order."""
    d = root / "snapshots"
    found = [(int(m.group(1)), p) for p in d.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def prune(root: Path, keep: int) -> None:
    for old in step_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
