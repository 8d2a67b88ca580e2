"""What the process environment says, read in one place: the user cache root (``PREFTUNE_CACHE``) and
whether the Hugging Face Hub may be reached (``HF_HUB_OFFLINE`` and its aliases)."""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """True when any of ``OFFLINE_VARIABLES`` is set to 1/true/yes/on: nothing is fetched from the Hub."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def cache_root() -> Path:
    """``$PREFTUNE_CACHE``, else ``$XDG_CACHE_HOME/preftune``, else ``~/.cache/preftune``: the root of
    every preftune cache (converted models, reference log-probs, evaluation results)."""
    if os.environ.get("PREFTUNE_CACHE"):
        return Path(os.environ["PREFTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "preftune"
