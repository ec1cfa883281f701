#!/usr/bin/env bash
# The one prepared GPU check (`make gpu-check`). On a Linux machine with one NVIDIA GPU
# (written for Hopper: H100/H200), the driver, Rust, Python and pip, it sets itself up and
# measures what a GPU is needed for, inside the ~9 minutes a lent GPU gives:
#
#   setup        make fetch tools            (data/, .venv with the NVRTC wheels)
#   build        cargo build --all-targets   (all cores)
#   gpu-tests    cargo test --test codegen_gpu --test calib_kernels --test emu_split_attention
#                with FPX_REQUIRE_GPU=1 (every linear kernel vs the cpu backend, FP32 and BF16;
#                whole plans' logits and greedy tokens; both calibration passes on the kernels vs
#                the cpu interpreter; split-KV attention vs the CPU reference)
#   bench        FPX_BENCH_QUICK=1 cargo bench --bench kernels (every GEMV/GEMM on the device,
#                fraction of peak bandwidth / FLOPs; whole-plan decode steps)
#   profile      fpx profile of SmolLM2 (each linear shape x format, rest of the step)
#   compare      fpx profile --compare: measured / modelled per kernel family (compare.json)
#   plan         fpx plan from that profile (greedy, gamma 0.5; and on the p95, plan-p95.json)
#   decode       fpx run of that plan on the cuda backend and on the cpu backend: same tokens
#   calibrate    fpx calibrate of SmolLM2 (4 x 128 tokens, KL on 32) with --backend cuda and
#                --backend cpu: times, and every record's eps / KL within 1e-3 / 2e-2 relative
#                (KL: + 1e-6 absolute)
#
# Every part is timed; a part whose usual time no longer fits the budget is skipped and says
# so. Results go to one folder (default gpu-results/<UTC time>, or $1): results.json (device,
# driver, CUDA, parts with status and seconds), summary.md, and each part's output.
#
# Exit status: 0 every part that ran passed; 1 a part failed; 2 no usable GPU (setup and build
# still run and are timed; the folder says "no GPU").
#
# Environment: FPX_GPU_CHECK_BUDGET_S (default 540), FPX_GPU_CHECK_SKIP_SETUP=1 (data, tools
# and build already in place).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUDGET="${FPX_GPU_CHECK_BUDGET_S:-540}"
RESULTS="${1:-gpu-results/$(date -u +%Y%m%dT%H%M%SZ)}"
MODEL="data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB="docs/smollm2.calib.json"
PROMPT="The sea was calm and the ship sailed on towards the"
TEXT="data/text/moby-dick.txt"
mkdir -p "$RESULTS" || { echo "gpu-check: cannot create $RESULTS" >&2; exit 1; }
PARTS="$RESULTS/parts.tsv"
: >"$PARTS"
START=$(date +%s)
FAILED=0

# part NAME USUAL_SECONDS COMMAND...: runs COMMAND (output in $RESULTS/NAME.log) unless the
# budget left is under USUAL_SECONDS; records status and seconds.
part() {
    local name="$1" usual="$2"
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((left < usual)); then
        printf '%s\tskipped\t0\tneeds about %ss, %ss of the budget left\n' "$name" "$usual" "$left" >>"$PARTS"
        echo "gpu-check: $name skipped (needs about ${usual}s, ${left}s left)"
        return 0
    fi
    echo "gpu-check: $name ..."
    local t0=$(date +%s) status=ok
    "$@" >"$RESULTS/$name.log" 2>&1 || { status=failed; FAILED=1; }
    local dt=$(($(date +%s) - t0))
    printf '%s\t%s\t%s\t\n' "$name" "$status" "$dt" >>"$PARTS"
    echo "gpu-check: $name $status in ${dt}s"
}

skip() {
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$PARTS"
    echo "gpu-check: $1 skipped ($2)"
}

if [[ "${FPX_GPU_CHECK_SKIP_SETUP:-0}" != 1 ]]; then
    part setup 120 make fetch tools
fi
eval "$(bash scripts/setup-tools.sh --print-build-env)"
LD="$(bash scripts/setup-tools.sh --print-ld-path)"
[[ -n "$LD" ]] && export LD_LIBRARY_PATH="$LD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
INC="$(bash scripts/setup-tools.sh --print-cuda-include)"
[[ -n "$INC" ]] && export FPX_CUDA_INCLUDE="$INC"
export FPX_PYTHON="$ROOT/.venv/bin/python"
if [[ "${FPX_GPU_CHECK_SKIP_SETUP:-0}" != 1 ]]; then
    part build 300 cargo build --all-targets -j "$(nproc)"
fi
FPX="$ROOT/target/debug/fpx"

GPU_NAME="" DRIVER="" CUDA=""
if command -v nvidia-smi >/dev/null 2>&1 &&
    GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" &&
    [[ -n "$GPU_NAME" ]]; then
    DRIVER="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
    CUDA="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)"
fi

if [[ -z "$GPU_NAME" ]]; then
    for p in gpu-tests bench profile compare plan decode calibrate; do skip "$p" "no GPU: nvidia-smi finds no device"; done
else
    part gpu-tests 150 env FPX_REQUIRE_GPU=1 FPX_REQUIRE_DATA=1 cargo test --test codegen_gpu --test calib_kernels --test emu_split_attention
    part bench 150 env FPX_BENCH_QUICK=1 cargo bench --profile dev --bench kernels
    part profile 90 "$FPX" profile --model "$MODEL" --device 0 --repeats 20 -o "$RESULTS/profile.json"
    if [[ -f "$RESULTS/profile.json" ]]; then
        compare() {
            "$FPX" profile --compare "$RESULTS/profile.json" &&
                "$FPX" profile --compare "$RESULTS/profile.json" --json >"$RESULTS/compare.json"
        }
        part compare 5 compare
        plans() {
            "$FPX" plan --calib "$CALIB" --device "$RESULTS/profile.json" --solver greedy \
                --gamma 0.5 -o "$RESULTS/plan.json" --json &&
                "$FPX" plan --calib "$CALIB" --device "$RESULTS/profile.json" --solver greedy \
                    --gamma 0.5 --latency-percentile p95 -o "$RESULTS/plan-p95.json"
        }
        part plan 10 plans
    else
        skip compare "no profile"
        skip plan "no profile"
    fi
    if [[ -f "$RESULTS/plan.json" ]]; then
        decode() {
            "$FPX" run --model "$MODEL" --plan "$RESULTS/plan.json" --prompt "$PROMPT" \
                --max-tokens 32 --repeat 3 --backend cuda --json >"$RESULTS/run-cuda.json" &&
                "$FPX" run --model "$MODEL" --plan "$RESULTS/plan.json" --prompt "$PROMPT" \
                    --max-tokens 32 --backend cpu --json >"$RESULTS/run-cpu.json" &&
                python3 - "$RESULTS" <<'PY'
import json, sys
d = sys.argv[1]
cuda, cpu = (json.load(open(f"{d}/run-{b}.json")) for b in ("cuda", "cpu"))
print("cuda tokens:", cuda["tokens"])
print("cpu tokens: ", cpu["tokens"])
print("cuda decode per token (ms):", cuda["decode_ms"])
sys.exit(0 if cuda["tokens"] == cpu["tokens"] else 1)
PY
        }
        part decode 60 decode
    else
        skip decode "no plan"
    fi
    calibrate() {
        for b in cuda cpu; do
            "$FPX" calibrate --model "$MODEL" --text "$TEXT" --seq-len 128 --windows 4 \
                --kl-seq-len 32 --backend "$b" -o "$RESULTS/calib-$b.json" --json \
                >"$RESULTS/calib-$b.summary.json" || return 1
        done
        python3 - "$RESULTS" <<'PY'
import json, sys
d = sys.argv[1]
runs = {b: json.load(open(f"{d}/calib-{b}.json")) for b in ("cuda", "cpu")}
times = {b: json.load(open(f"{d}/calib-{b}.summary.json")) for b in runs}
for b, t in times.items():
    print(f"{b}: eps {t['eps_seconds']:.1f} s, KL {t['kl_seconds']:.1f} s")
# Relative differences; KL with an absolute floor of 1e-6 (nats) for layers that barely move it.
worst, floor = {"eps": 0.0, "kl": 0.0}, {"eps": 1e-12, "kl": 1e-6}
for g, c in zip(runs["cuda"]["layers"], runs["cpu"]["layers"]):
    for f, m in c["metrics"].items():
        n = g["metrics"][f]
        for k in worst:
            worst[k] = max(worst[k], abs(n[k] - m[k]) / (abs(m[k]) + floor[k]))
print("largest relative difference cuda vs cpu:", worst)
sys.exit(0 if worst["eps"] <= 1e-3 and worst["kl"] <= 2e-2 else 1)
PY
    }
    part calibrate 180 calibrate
fi

python3 - "$RESULTS" "$GPU_NAME" "$DRIVER" "$CUDA" "$BUDGET" "$(($(date +%s) - START))" <<'PY'
import json, sys, os
d, gpu, driver, cuda, budget, total = sys.argv[1:]
parts = []
for line in open(f"{d}/parts.tsv"):
    name, status, secs, note = (line.rstrip("\n").split("\t") + [""])[:4]
    parts.append({"part": name, "status": status, "seconds": int(secs), "note": note})
status = "no GPU" if not gpu else ("failed" if any(p["status"] == "failed" for p in parts) else "ok")
res = {"status": status, "device": gpu or None, "driver": driver or None, "cuda": cuda or None,
       "budget_seconds": int(budget), "seconds": int(total), "parts": parts}
with open(f"{d}/results.json", "w") as f:
    json.dump(res, f, indent=2)
lines = [f"# fpx GPU check: {status}", "",
         f"device: {gpu or 'none (nvidia-smi finds no GPU)'}; driver {driver or '-'}; CUDA {cuda or '-'}",
         f"{total} s of a {budget} s budget", "", "| part | status | seconds | note |", "|---|---|---|---|"]
lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['note']} |" for p in parts]
open(f"{d}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "gpu-check: results in $RESULTS"
if [[ -z "$GPU_NAME" ]]; then exit 2; fi
exit "$FAILED"
