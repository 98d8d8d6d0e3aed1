# lightning-ar: `make install` creates .venv; `make demo` trains + evaluates on the embedded digits; `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo lint clean bench bench-compare bench-reference

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Two workers, one thread each (two processes of two threads each thrash on 2 cores; tests are mostly small tensors
# and subprocesses); a test module stays on one worker (its module fixtures are built once).
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadscope

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

demo: install
	$(BIN)/python -m lightning_ar.demo

# Speed figures of this machine as one JSON document (outputs/bench/bench-<time>.json and latest.json); a trained
# digits checkpoint (from `make demo`) is used for the refinement shares and the sampler-quality comparison when
# present (without it: refinement on a random generator, no sampler quality).
DIGITS_CKPT ?= outputs/demo/fit/checkpoints/last.ckpt
bench: install
	$(BIN)/python benchmarks/bench.py $(if $(wildcard $(DIGITS_CKPT)),--digits-ckpt $(DIGITS_CKPT))

# Ratios new/old of two bench results: `make bench-compare` (two latest) or OLD=... NEW=...
bench-compare: install
	$(BIN)/python benchmarks/compare.py $(OLD) $(NEW)

# Side by side with a checkout of LTH14/mar at identical settings (never in CI): `make bench-reference REF=../mar`
bench-reference: install
	$(BIN)/python benchmarks/compare_reference.py $(REF) --out outputs/bench/compare-reference.json

lint: install
	$(BIN)/ruff check lightning_ar tests

clean:
	rm -rf outputs .pytest_cache
