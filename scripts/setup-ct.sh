#!/usr/bin/env bash
# Create/update .venv-ct (git-ignored): compressed-tensors, transformers and a CPU-usable
# torch, pinned by scripts/requirements-ct.txt, for the export checks (scripts/ct_check.py,
# run by tests/export_ct.rs through FPX_CT_PYTHON). Idempotent (scripts/make-venv.sh: a
# stamp of the requirements' hash; nothing is done when it matches and the modules import);
# no root needed. Installs with --no-deps: the file lists every package, and leaves out
# the CUDA wheels torch declares but the CPU never loads (see the file's header).
#
# Environment: PYTHON  interpreter the venv is made from (default python3, >= 3.11)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP_NO_DEPS=1 exec bash "$ROOT/scripts/make-venv.sh" "$ROOT/.venv-ct" \
    "$ROOT/scripts/requirements-ct.txt" "torch compressed_tensors transformers safetensors"
