#!/usr/bin/env bash
# Create/update the project-local Python environment the tests use: .venv (git-ignored),
# with the exact pins of scripts/requirements-test.txt (numpy + gguf for
# scripts/reference_ppl.py; NVRTC wheels later). Idempotent; no root needed.
#
#   scripts/setup-tools.sh                  create/update .venv
#   scripts/setup-tools.sh --print-ld-path  print the lib/ dirs of the nvidia-* wheels in
#                                           .venv, colon-separated (empty if none), for
#                                           LD_LIBRARY_PATH
#
# Environment: PYTHON  interpreter the venv is made from (default python3, >= 3.11)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

case "${1:-}" in
"")
    exec bash "$ROOT/scripts/make-venv.sh" "$VENV" "$ROOT/scripts/requirements-test.txt" "numpy gguf"
    ;;
--print-ld-path)
    [[ -x "$VENV/bin/python" ]] || exit 0
    exec "$VENV/bin/python" - <<'PY'
import glob, os, sysconfig
site = sysconfig.get_paths()["purelib"]
print(":".join(sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "lib")) if os.path.isdir(d))))
PY
    ;;
*)
    echo "setup-tools: error: unknown argument '$1' (usage: setup-tools.sh [--print-ld-path])" >&2
    exit 2
    ;;
esac
