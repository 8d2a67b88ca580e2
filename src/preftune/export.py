"""``preftune export RUN --out DIR``: a run's model as a folder that loads on any machine with plain
``AutoPeftModelForCausalLM`` (or ``AutoModelForCausalLM``), without the run folder or preftune's
cache. An adapter whose base is a local folder (the pipeline's merged SFT model, the converted
embedded model) travels with that base in ``DIR/base``; the adapter names it by its absolute path
there, or by a Hub id (``--base-repo``) where the base is pushed. ``push`` uploads the same layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from preftune.errors import PreftuneError

RUN_FILES = frozenset({"best.json", "snapshot.json"})
"""Run bookkeeping that a model folder carries in the run but not outside it."""
BASE = "base"


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in RUN_FILES and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)


def local_base(adapter: Path) -> tuple[str, Path | None]:
    """(the base the adapter's config names, its local folder when it is one, else None for a Hub id)."""
    from preftune.model import resolve_model

    named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    p = Path(named).expanduser()
    if p.exists() or named.startswith(("embedded:", "tiny")):
        return named, Path(resolve_model(named))
    return named, None


def _base_card(base: Path, out: Path) -> None:
    """The card of the exported base: its own run card (a merged SFT model), else the one it has."""
    from preftune.card import card_for_stage, run_eval

    if (base.parent / "run.json").is_file():
        (out / "README.md").write_text(card_for_stage(base.parent, run_eval(base.parent), merged=base.name == "merged"),
                                       encoding="utf-8")


def export(run: str | Path, out: str | Path, base_repo: str | None = None) -> Path:
    """Write ``run``'s model (a pipeline's last stage, a stage's ``best/`` or ``final/``, or a model
    folder) into ``out`` with its card; an adapter's local base goes to ``out/base``. Returns ``out``."""
    from preftune.card import card_for_stage, run_eval, upload_folder_of

    folder = upload_folder_of(Path(run))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PreftuneError(f"export: {out} exists and is not empty; choose a new folder")
    _copy_model(folder, out)
    stage = folder.parent
    card = card_for_stage(stage, run_eval(stage), base_repo=base_repo) if (stage / "run.json").is_file() else None
    if (folder / "adapter_config.json").is_file():
        named, base = local_base(folder)
        if base is not None:
            _copy_model(base, out / BASE)
            _base_card(base, out / BASE)
            config = json.loads((out / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = base_repo or str((out / BASE).resolve())
            (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
            if card is not None and not base_repo:
                card += (f"\nThe base model this adapter needs is in `{BASE}/` beside it; `adapter_config.json` "
                         f"names that folder by its absolute path as exported (export again after moving it, "
                         f"or push the base and export with `--base-repo`).\n")
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    return out
