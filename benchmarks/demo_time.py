"""Time `make demo` from a fresh clone, set-up included (venv, installs, the one-time GGUF conversion),
as a new user would run it. A benchmark script, not a test.

    python benchmarks/demo_time.py [--keep]

It clones this repository's HEAD into a temporary folder, points PREFTUNE_CACHE at an empty folder
(so the model conversion is paid), runs `make demo`, and prints the wall time of the whole command
and of each pipeline stage (from the run's timings.json), with CPU-seconds / wall-seconds for the
whole run (about 1.95 on an undisturbed 2-core machine; below ~1.6 the figure is not trustworthy)."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone and its run folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="preftune-demo-"))
    clone = work / "preftune"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "PREFTUNE_CACHE": str(work / "cache"),
           "HF_HOME": str(work / "hf"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    t0 = time.time()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    tail = proc.stdout.strip().splitlines()[-14:]
    print("\n".join(tail))
    timings_file = clone / "runs" / "quickstart" / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    setup = wall - sum(timings.values())
    print(f"\nmake demo from a fresh clone: {wall / 60:.1f} min wall (exit {proc.returncode}); "
          f"set-up + conversion + loading ≈ {setup / 60:.1f} min; stages (s): {timings}; "
          f"cpu/wall = {cpu / wall:.2f}")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept: {clone}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
