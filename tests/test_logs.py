"""preftune's logger: its own handler, other libraries' lines left alone, info on rank 0 only."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging
from preftune.logs import setup_logging
setup_logging()
assert not logging.getLogger().handlers, "the root logger must stay untouched"
logging.getLogger("preftune").info("hello from preftune")
logging.getLogger("preftune").warning("careful")
logging.getLogger("lm_eval").warning("a warning of lm-eval's")
"""


def _stderr(rank: str) -> list[str]:
    env = dict(os.environ, RANK=rank, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stderr.splitlines()


def test_other_libraries_keep_their_own_names():
    lines = _stderr("0")
    assert lines == ["preftune: hello from preftune", "preftune: careful", "a warning of lm-eval's"]


def test_only_rank_zero_logs_info():
    assert _stderr("1") == ["preftune[rank 1]: careful", "a warning of lm-eval's"]
