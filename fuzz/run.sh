#!/usr/bin/env bash
# Fuzz one parser: fuzz/run.sh TARGET SECONDS (TARGET: a name from fpx::parsers::TARGETS).
# One fuzzing thread; an input taking over 2 s is a hang and over 2 GiB of memory an
# out-of-memory, both findings like a crash; the run stops at the first finding. New
# coverage goes to hfuzz_workspace/TARGET/corpus (git-ignored), findings to
# hfuzz_workspace/TARGET; the committed seeds in corpus/TARGET are only read.
set -euo pipefail
cd "$(dirname "$0")"
target=$1
seconds=$2
mkdir -p "hfuzz_workspace/$target/corpus"
export FPX_FUZZ_TARGET=$target
export HFUZZ_RUN_ARGS="--threads 1 --run_time $seconds --timeout 2 --rlimit_rss 2048 \
  --exit_upon_crash --env FPX_FUZZ_TARGET=$target --input corpus/$target \
  --output hfuzz_workspace/$target/corpus --workspace hfuzz_workspace/$target"
exec cargo hfuzz run parse
