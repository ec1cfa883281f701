# fpx — common entry points. Data and tools land in git-ignored, project-local paths:
#   data/         models and text        (scripts/fetch.sh)
#   .venv/        Python tools for tests (scripts/setup-tools.sh, scripts/requirements-test.txt)
#   .venv-bench/  PyTorch baseline       (scripts/setup-bench.sh, scripts/requirements-bench.txt)
#   .venv-ct/     compressed-tensors, transformers, torch for the export checks
#                                        (scripts/setup-ct.sh, scripts/requirements-ct.txt)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := run

CARGO  ?= cargo
MODEL  ?= data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT   ?= data/text/moby-dick.txt

# PyTorch baseline parameters (make bench-torch SEQ_LEN=512 WINDOWS=4 THREADS=2)
SEQ_LEN ?= 512
WINDOWS ?= 4
THREADS ?= 2

.PHONY: help run test fetch tools ct-tools bench bench-tools bench-torch bench-compare bench-linear bench-calib-large gpu-check

help:
	@echo "make run          fetch data + tools, then the main job on the default model (scripts/main-job.sh)"
	@echo "make test         fetch data + test tools, then cargo test --all-targets"
	@echo "make fetch        download model and text into data/ (idempotent)"
	@echo "make tools        create/update .venv (numpy, gguf) for the reference scripts"
	@echo "make ct-tools     create/update .venv-ct (compressed-tensors, transformers, torch) for the export checks"
	@echo "make bench        fpx CPU forward tokens/s (SEQ_LEN=$(SEQ_LEN) WINDOWS=$(WINDOWS) THREADS=$(THREADS))"
	@echo "make bench-tools  create/update .venv-bench (torch, transformers)"
	@echo "make bench-torch  PyTorch CPU fp32 baseline (SEQ_LEN=$(SEQ_LEN) WINDOWS=$(WINDOWS) THREADS=$(THREADS))"
	@echo "make bench-compare  fpx bench and bench-torch alternated in one run (ROUNDS=2), with the ratios"
	@echo "make bench-linear the CPU linear kernel vs matrixmultiply vs torch (MKL) at SmolLM2's shapes"
	@echo "make bench-calib-large  calibrate a synthetic Qwen2.5-1.5B (2k tokens): time and peak RSS (benches/calib_large.rs)"
	@echo "make gpu-check    the prepared GPU check (scripts/gpu-check.sh): tests, kernel benchmarks, profile, plan, decode"

fetch:
	bash scripts/fetch.sh

tools:
	bash scripts/setup-tools.sh

ct-tools:
	bash scripts/setup-ct.sh

bench-tools:
	bash scripts/setup-bench.sh

# good_lp's HiGHS build needs cmake and libclang: from the wheels `make tools` installs
# (the same paths .cargo/config.toml gives plain cargo, so neither triggers a rebuild).
BUILD_ENV = eval "$$(bash scripts/setup-tools.sh --print-build-env)";

# The main job: scripts/main-job.sh (calibrate -> plan -> compare -> eval -> codegen -> run).
# It uses the dev profile, which Cargo.toml optimizes, so `make run` and `make test` share one
# build (a release build would compile HiGHS a second time).
run: fetch tools
	$(BUILD_ENV) $(CUDA_ENV) $(CARGO) build --bin fpx && FPX=target/debug/fpx MODEL=$(MODEL) TEXT=$(TEXT) bash scripts/main-job.sh

# CPU forward throughput (compare with bench-torch at the same SEQ_LEN/WINDOWS/THREADS).
bench: fetch tools
	$(BUILD_ENV) $(CARGO) run --release -- bench --model $(MODEL) --text $(TEXT) \
		--seq-len $(SEQ_LEN) --windows $(WINDOWS) --threads $(THREADS)

# NVRTC for the codegen tests (PyPI wheels installed by `make tools`): the wheels' lib dirs on
# LD_LIBRARY_PATH and the CUDA include dir as FPX_CUDA_INCLUDE, each only when non-empty.
CUDA_ENV = ld="$$(bash scripts/setup-tools.sh --print-ld-path)"; \
	inc="$$(bash scripts/setup-tools.sh --print-cuda-include)"; \
	if [[ -n "$$ld" ]]; then export LD_LIBRARY_PATH="$$ld$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}"; fi; \
	if [[ -n "$$inc" ]]; then export FPX_CUDA_INCLUDE="$$inc"; fi;

test: fetch tools ct-tools
	$(BUILD_ENV) $(CUDA_ENV) FPX_REQUIRE_DATA=1 FPX_PYTHON=$(CURDIR)/.venv/bin/python \
		FPX_CT_PYTHON=$(CURDIR)/.venv-ct/bin/python $(CARGO) test --all-targets

# fpx (the dev build `make run` and the tests use) and both PyTorch baselines, alternated.
bench-compare: fetch tools bench-tools
	$(BUILD_ENV) $(CARGO) build --bin fpx && MODEL=$(MODEL) TEXT=$(TEXT) SEQ_LEN=$(SEQ_LEN) \
		WINDOWS=$(WINDOWS) THREADS=$(THREADS) bash scripts/bench_compare.sh

# Calibration at the scale of a deployed model: a synthetic Qwen2.5-1.5B-shaped BF16 checkpoint
# (written by the benchmark, 3.1 GB under target/bench-data), 4 x 512 tokens, the default KL
# pass; prints time and peak RSS, fails at 4 GB (benches/calib_large.rs).
bench-calib-large: fetch tools
	$(BUILD_ENV) $(CARGO) bench --profile dev --bench calib_large -- --threads $(THREADS)

# The CPU linear-layer product at SmolLM2's prefill shapes: fpx's AVX-512 kernel over packed
# weights and matrixmultiply (benches/cpu_linear.rs), then torch's F.linear (MKL), same threads.
bench-linear: bench-tools
	RAYON_NUM_THREADS=$(THREADS) $(BUILD_ENV) $(CARGO) bench --profile dev --bench cpu_linear
	.venv-bench/bin/python scripts/bench_linear_torch.py $(THREADS)

bench-torch: fetch bench-tools
	.venv-bench/bin/python scripts/bench_torch.py --gguf $(MODEL) --text $(TEXT) \
		--seq-len $(SEQ_LEN) --windows $(WINDOWS) --threads $(THREADS)

# The one prepared GPU check: sets itself up, builds, runs what needs a GPU, writes one results
# folder (gpu-results/<time>); exit 2 when there is no GPU.
gpu-check:
	bash scripts/gpu-check.sh
