"""``preftune export RUN --out DIR``: a run's model as a folder that loads on any machine with plain
``AutoPeftModelForCausalLM`` (or ``AutoModelForCausalLM``), without the run folder or preftune's
cache. An adapter whose base is a local folder (the pipeline's merged SFT model, the converted
embedded model) travels with that base in ``DIR/base``; the adapter names it by its absolute path
there, or by a Hub id (``--base-repo``) where the base is pushed. ``push`` uploads the same layout."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from preftune.card import card_for_stage, run_eval
from preftune.env import offline
from preftune.errors import PreftuneError
from preftune.model import resolve_model, resolve_run
from preftune.paths import StageDir

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
    named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    p = Path(named).expanduser()
    if p.exists() or named.startswith(("embedded:", "tiny")):
        return named, Path(resolve_model(named))
    return named, None


def _base_card(base: Path, out: Path) -> None:
    """The card of the exported base: its own run card (a merged SFT model), else the one it has."""
    if StageDir(base.parent).is_finished():
        (out / "README.md").write_text(card_for_stage(base.parent, run_eval(base.parent), merged=base.name == "merged"),
                                       encoding="utf-8")


def export(run: str | Path, out: str | Path, base_repo: str | None = None) -> Path:
    """Write ``run``'s model (a pipeline's last stage, a stage's ``best/`` or ``final/``, or a model
    folder) into ``out`` with its card; an adapter's local base goes to ``out/base``. Returns ``out``."""
    folder = upload_folder_of(Path(run))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PreftuneError(f"export: {out} exists and is not empty; choose a new folder")
    _copy_model(folder, out)
    stage = folder.parent
    card = card_for_stage(stage, run_eval(stage), base_repo=base_repo) if StageDir(stage).is_finished() else None
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


# ---------------------------------------------------------------- push


def upload_folder_of(run: Path) -> Path:
    """What ``push`` uploads: a pipeline run's last stage, a stage run's ``best/`` (else ``final/``),
    or a model folder as is."""
    if not run.exists():
        raise PreftuneError(f"push: run folder not found: {run}")
    folder = resolve_run(run)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise PreftuneError(f"push: {folder} holds no model (no config.json or adapter_config.json); "
                            "pass a finished run folder or a saved model folder")
    return folder


def push_model(run: Path, repo: str, base_repo: str | None = None) -> tuple[Path, str, str | None]:
    """Upload the model of ``run`` with its card to the Hub repo ``repo``; return (folder, url, the
    base's repo or None). An adapter whose base is a local folder (the pipeline's merged SFT model) is
    uploaded with that base: the base goes to ``base_repo`` (default ``REPO-base``) and the adapter's
    config and card name it there, so ``AutoPeftModelForCausalLM.from_pretrained(REPO)`` works anywhere."""
    folder = upload_folder_of(Path(run))
    if offline():
        raise PreftuneError(f"push: HF_HUB_OFFLINE=1 is set, so {folder} cannot be uploaded to {repo!r}; "
                            "unset HF_HUB_OFFLINE, log in (`hf auth login`), and run `preftune push` again")
    api = HfApi()
    base_repo = base_repo or f"{repo}-base"
    pushed_base = None
    with tempfile.TemporaryDirectory(prefix="preftune-push-") as tmp:
        staged = export(folder, Path(tmp) / "model", base_repo=base_repo)
        if (staged / BASE).is_dir():
            api.create_repo(base_repo, exist_ok=True)
            api.upload_folder(folder_path=str(staged / BASE), repo_id=base_repo,
                              commit_message=f"preftune push: the base of {folder}")
            pushed_base = base_repo
        url = api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(staged), repo_id=repo, ignore_patterns=[f"{BASE}/*"],
                          commit_message=f"preftune push of {folder}")
    return folder, str(url), pushed_base
