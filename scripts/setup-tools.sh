#!/usr/bin/env bash
# Create/update the project-local Python environment the tests use: .venv (git-ignored),
# with the exact pins of scripts/requirements-test.txt (numpy + gguf for
# scripts/reference_ppl.py; NVRTC wheels later). Idempotent; no root needed.
#
#   scripts/setup-tools.sh                  create/update .venv
#   scripts/setup-tools.sh --print-ld-path  print the lib/ dirs of the nvidia-* wheels in
#                                           .venv, colon-separated (empty if none), for
#                                           LD_LIBRARY_PATH
#   scripts/setup-tools.sh --print-cuda-include  print the CUDA include dir of the
#                                           nvidia-cuda-runtime wheel in .venv (empty if
#                                           none), for FPX_CUDA_INCLUDE (NVRTC include path)
#   scripts/setup-tools.sh --print-build-env  print `export` lines for CMAKE, LIBCLANG_PATH and
#                                           PATH pointing at the cmake and libclang wheels
#                                           (linked as .tools/cmake, .tools/libclang) that
#                                           good_lp's HiGHS build needs; eval them
#
# Environment: PYTHON  interpreter the venv is made from (default python3, >= 3.11)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

case "${1:-}" in
"")
    bash "$ROOT/scripts/make-venv.sh" "$VENV" "$ROOT/scripts/requirements-test.txt" "numpy gguf clang"
    # Stable paths to the cmake and libclang wheels for cargo (.cargo/config.toml [env] and
    # the Makefile point at these; the venv's site-packages path depends on the Python).
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    [[ -x "$site/cmake/data/bin/cmake" && -f "$site/clang/native/libclang.so" ]] \
        || { echo "setup-tools: error: cmake or libclang wheel missing under $site" >&2; exit 1; }
    mkdir -p "$ROOT/.tools"
    ln -sfn "$site/cmake/data" "$ROOT/.tools/cmake"
    ln -sfn "$site/clang/native" "$ROOT/.tools/libclang"
    ;;
--print-ld-path)
    [[ -x "$VENV/bin/python" ]] || exit 0
    exec "$VENV/bin/python" - <<'PY'
import glob, os, sysconfig
site = sysconfig.get_paths()["purelib"]
print(":".join(sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "lib")) if os.path.isdir(d))))
PY
    ;;
--print-build-env)
    [[ -x "$ROOT/.tools/cmake/bin/cmake" && -f "$ROOT/.tools/libclang/libclang.so" ]] \
        || { echo "setup-tools: error: no cmake/libclang links in .tools; run scripts/setup-tools.sh" >&2; exit 1; }
    printf 'export CMAKE=%q\n' "$ROOT/.tools/cmake/bin/cmake"
    printf 'export LIBCLANG_PATH=%q\n' "$ROOT/.tools/libclang"
    printf 'export PATH=%q:"$PATH"\n' "$ROOT/.tools/cmake/bin"
    ;;
--print-cuda-include)
    [[ -x "$VENV/bin/python" ]] || exit 0
    exec "$VENV/bin/python" - <<'PY'
import os, sysconfig
inc = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cuda_runtime", "include")
print(inc if os.path.isfile(os.path.join(inc, "cuda_fp16.h")) else "")
PY
    ;;
*)
    echo "setup-tools: error: unknown argument '$1' (usage: setup-tools.sh [--print-ld-path|--print-cuda-include|--print-build-env])" >&2
    exit 2
    ;;
esac
