#!/usr/bin/env bash
# Create/update the project-local venv for the PyTorch comparison baseline:
# .venv-bench (git-ignored), pinned by scripts/requirements-bench.txt (torch, transformers,
# tokenizers, numpy, gguf). Used by scripts/bench_torch.py (`make bench-torch`).
# Idempotent; no root needed.
#
# The default Linux torch wheel from PyPI pulls the CUDA runtime wheels (nvidia-*), about
# 5 GB installed; only the CPU is used here. (download.pytorch.org's CPU-only index would be
# smaller, but only PyPI is reachable from where this project is built.)
#
# Environment: PYTHON  interpreter the venv is made from (default python3, >= 3.11)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec bash "$ROOT/scripts/make-venv.sh" "$ROOT/.venv-bench" "$ROOT/scripts/requirements-bench.txt" \
    "torch transformers tokenizers numpy gguf"
