# tlbench — the README's commands. `make demo` sets up .venv and runs the default experiment;
# `make test` runs the whole test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test smoke bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "tlbench needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[weights,sweep,test]"
	touch $@

demo: venv
	$(VENV)/bin/tlbench

# pytest exits 5 when it collected no test: that must fail, never pass as success
test: venv
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# every experiment preset trained shrunk (trainer=smoke, 1 epoch, 32 px, random init, CPU) on
# ../shared/data (or $$TLBENCH_SHARED_DATA; tiny generated data where absent); stops at the first
# failure. Options: make smoke SMOKE_ARGS="--fixtures" or SMOKE_ARGS="thai_multitask emnist_small_cnn"
smoke: venv
	PYTHON=$(PY) scripts/smoke_presets.sh $(SMOKE_ARGS)

# tensor vs loader data path side by side on this CPU (the shared CIFAR-10 subset when present,
# else a synthetic one); the GPU counterpart is scripts/bench_gpu.sh (docs/benchmarks.md)
BENCH_DATA ?= $(wildcard ../shared/data/cifar10)
bench: venv
	$(PY) scripts/bench_speed.py --cpu $(if $(BENCH_DATA),--data $(BENCH_DATA),)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
