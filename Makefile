# `make demo` and `make test` each set up .venv on first use (torch, triton, solo-learn, test tools).
# The adapter's tests run on PyPI's solo-learn 1.0.2 and its pinned stack (the `solo-test` extra);
# the `solo` extra users install holds only what the adapter imports.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint wheel-check gpu-check

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) "torch==2.14.1" "torchvision==0.29.1" "setuptools>=77,<81"
	$(PIP) -e ".[dev,triton,solo,solo-test,benchmarks]"
	$(PIP) --no-deps "solo-learn==1.0.2"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/msr-loss demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# On a CUDA machine: the kernel tests on CUDA, then the timing table (CSV, PNG, Markdown), <= 8 min.
gpu-check: $(VENV)/.installed
	$(PY) -m msr_loss.benchmarks.gpu_check --out-dir gpu-check-results --budget 480

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check msr_loss adapters tests benchmarks
	$(VENV)/bin/ruff format --check msr_loss adapters tests benchmarks
	$(VENV)/bin/mypy msr_loss adapters tests/typed_choices.py

wheel-check: $(VENV)/.installed
	rm -rf dist /tmp/msr-wheel-venv
	$(PY) -m build --wheel --outdir dist . >/dev/null
	python3 -m venv /tmp/msr-wheel-venv
	cd /tmp && /tmp/msr-wheel-venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" $(CURDIR)/dist/*.whl
	cd /tmp && /tmp/msr-wheel-venv/bin/python -c "import msr_loss, msr_loss.adapters, torch; print('wheel ok', msr_loss.__version__, msr_loss.__file__); print(msr_loss.interventional_loss(torch.randn(4, 8), torch.randn(4, 8), torch.rand(2, 8), temperature=0.5))"
