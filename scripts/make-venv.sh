#!/usr/bin/env bash
# Shared by setup-tools.sh and setup-bench.sh: create or update a project-local venv from
# an exactly pinned requirements file. No root needed.
#
#   scripts/make-venv.sh VENV_DIR REQUIREMENTS_FILE "module module ..."
#
# Idempotent: a stamp inside the venv records the sha256 of the requirements file and the
# interpreter version; when both match and the listed modules import, nothing is done.
# Editing the requirements file (or changing PYTHON) makes the next run reinstall; a venv
# made by a different interpreter is rebuilt from scratch.
#
# Environment:
#   PYTHON   interpreter the venv is made from (default: python3; needs >= 3.11)
set -euo pipefail

[[ $# -eq 3 ]] || { echo "usage: make-venv.sh VENV_DIR REQUIREMENTS_FILE \"modules to import\"" >&2; exit 2; }
VENV="$1"
REQ="$2"
MODULES="$3"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.fpx-setup-stamp"
NAME="$(basename "$VENV")"

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$NAME" "$*" >&2; exit 1; }

[[ -f "$REQ" ]] || die "requirements file $REQ not found"
command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python >= 3.11 or set PYTHON"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); the pinned packages need Python >= 3.11 (set PYTHON)"

pyver="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
want="$(sha256sum "$REQ" | cut -d' ' -f1) $pyver"
import_check="import ${MODULES// /, }"

# Serialize concurrent runs on the same venv (make -j); locks live in .tools/ (git-ignored).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$ROOT/.tools"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT/.tools/${NAME#.}.lock"
    flock 9
fi

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
    && "$VENV/bin/python" -c "$import_check" >/dev/null 2>&1; then
    log "ok   (up to date with $(basename "$REQ"))"
    exit 0
fi

if [[ -e "$VENV" ]]; then
    have="$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || true)"
    if [[ "$have" != "$pyver" ]]; then
        log "removing stale venv (python '${have:-none}', want $pyver)"
        rm -rf "$VENV"
    fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV" \
        || die "'$PYTHON -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
fi

rm -f "$STAMP"
log "installing $(basename "$REQ")"
start=$SECONDS
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet -r "$REQ"; then
    die "pip install -r $REQ failed (is PyPI reachable? see the pip output above)"
fi
"$VENV/bin/python" -c "$import_check" || die "'$import_check' fails after the install"
printf '%s\n' "$want" >"$STAMP"
log "done in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
