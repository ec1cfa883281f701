#!/usr/bin/env bash
# fpx's CPU forward and the PyTorch baselines side by side in one run (`make bench-compare`):
# `fpx bench` and scripts/bench_torch.py (plain torch ops with SDPA, and transformers'
# LlamaForCausalLM) on the same GGUF weights, windows and threads, alternated ROUNDS times
# (fpx, torch, fpx, torch, ...) so both see the same machine load. Prints every measurement
# as a JSON line, then a summary line with the medians and fpx's ratio to each baseline.
#
# Environment: FPX (default target/debug/fpx), MODEL, TEXT, SEQ_LEN (512), WINDOWS (4),
# THREADS (2), ROUNDS (2), PYTHON (default .venv-bench/bin/python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FPX="${FPX:-$ROOT/target/debug/fpx}"
MODEL="${MODEL:-$ROOT/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
TEXT="${TEXT:-$ROOT/data/text/moby-dick.txt}"
SEQ_LEN="${SEQ_LEN:-512}" WINDOWS="${WINDOWS:-4}" THREADS="${THREADS:-2}" ROUNDS="${ROUNDS:-2}"
PYTHON="${PYTHON:-$ROOT/.venv-bench/bin/python}"
for f in "$FPX" "$PYTHON"; do
    [[ -x "$f" ]] || { echo "bench_compare.sh: $f is missing (make bench-tools; cargo build --bin fpx)" >&2; exit 2; }
done
common=(--seq-len "$SEQ_LEN" --windows "$WINDOWS" --threads "$THREADS")
lines=()
for round in $(seq 1 "$ROUNDS"); do
    fpx=$("$FPX" bench --model "$MODEL" --text "$TEXT" "${common[@]}" --decode-tokens 0 --json | "$PYTHON" -c "import json, sys; print(json.dumps(json.load(sys.stdin)))")
    echo "{\"round\": $round, \"fpx\": $fpx}"
    lines+=("$fpx")
    torch=$("$PYTHON" "$ROOT/scripts/bench_torch.py" --gguf "$MODEL" --text "$TEXT" "${common[@]}")
    echo "{\"round\": $round, \"torch\": $torch}"
    lines+=("$torch")
done
printf '%s\n' "${lines[@]}" | "$PYTHON" -c '
import json, statistics, sys
runs = [json.loads(l) for l in sys.stdin]
fpx = [r["tokens_per_s"] for r in runs if "impls" not in r]
plain = [r["impls"]["plain"]["tokens_per_s"] for r in runs if "impls" in r]
hf = [r["impls"]["transformers"]["tokens_per_s"] for r in runs if "impls" in r]
m = statistics.median
print(json.dumps({"summary": {
    "fpx_tokens_per_s": m(fpx), "plain_torch_tokens_per_s": m(plain),
    "transformers_tokens_per_s": m(hf), "fpx_over_plain_torch": m(fpx) / m(plain),
    "fpx_over_transformers": m(fpx) / m(hf), "rounds": len(fpx)}}))
'
