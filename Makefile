# make demo: set up (if needed), run the main job on the embedded default, print a table, draw a plot.
# make test: set up (if needed), run the test suite.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= results/demo
# The shipped reference model (harness/reference/checkpoint); DEMO_MODEL=tiny-random for the random toy.
DEMO_MODEL ?= reference
# lkv loads the learned parameters made for the reference model (drop it for another model)
DEMO_METHODS ?= full,snapkv,streaming_llm,random,lkv

.PHONY: setup demo test report bench

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(VENV)/.installed

demo: setup
	$(BIN)/kvbench -m model=$(DEMO_MODEL) task=ruler/niah_single_1,ruler/niah_multikey_1,ruler/vt \
	  method=$(DEMO_METHODS) 'keep_ratio=[0.1,0.25,0.5]' \
	  context_length=4096 n_samples=10 progress=false hydra.sweep.dir=$(DEMO_DIR)
	$(BIN)/kvbench-report $(DEMO_DIR)

# One pytest-xdist worker per core (TEST_WORKERS=0: one process); worksteal: an idle worker takes queued tests
# from a busy one, so a long test near the end does not leave a core idle. -x stops at the first failure.
TEST_WORKERS ?= auto
test: setup
	$(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist worksteal tests

bench: setup
	$(BIN)/python benchmarks/refresh_readme.py
