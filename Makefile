# The README's two commands: `make run` (the main job) and `make test` (the suite). Both set up first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
STAMP  := $(VENV)/.rlora-setup

.PHONY: setup run test test-fast bench mutate clean

setup: $(STAMP)

# torch first (the pinned CPU wheel here, the CUDA build of the same version on a GPU box), then the
# project with a constraints file so that nothing replaces that torch, then the embedded model cache (one
# line of ours instead of transformers' progress bars).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	TQDM_DISABLE=1 $(VENV)/bin/rlora prepare-model
	touch $(STAMP)

run: setup
	$(VENV)/bin/rlora train examples/configs/cpu_demo.yaml $(ARGS)

# the multi-process tests first, in a fresh pytest process (forking Ray from a process that already ran
# many in-process DeepSpeed engines can fail for memory), then the rest; "no test selected" is fine. Both
# record into one trace folder; the last test of the second checks that every config field and CLI flag was
# set, read and asserted on by some test (tests/coverage_trace.py; skipped when ARGS selects a subset)
test: setup
	rm -rf .pytest_cache/rlora-trace
	RLORA_TRACE_DIR=.pytest_cache/rlora-trace $(VENV)/bin/pytest -q -m slow $(ARGS) || [ $$? -eq 5 ]
	RLORA_TRACE_DIR=.pytest_cache/rlora-trace $(VENV)/bin/pytest -q -m "not slow" $(ARGS) || [ $$? -eq 5 ]

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow" $(ARGS)

bench: setup
	for b in layer_overhead mixed_batch sampler train_throughput merged_inference; do \
	  test -f benchmarks/$$b.py && $(PY) benchmarks/$$b.py --quick || exit 1; done

# Mutation testing of the modules with correctness claims; not part of `make test` or CI (tens of minutes).
# mutmut, not cosmic-ray or pytest-gremlins: it mutates a copy of the tree (build/mutation/, never the
# checkout), forks each mutant from a process that has already imported torch, and runs only the tests that
# reach the mutated function. GROUPS="layers batches" runs some groups (tests/mutations/mutate.py --list).
mutate: setup
	$(PY) -m pip install -q -c constraints.txt mutmut==3.8.1
	$(PY) tests/mutations/mutate.py $(GROUPS)

clean:
	rm -rf $(VENV) outputs mlruns mlflow.db
