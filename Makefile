# The README's two commands: `make demo` and `make test`. Both set up .venv first (idempotent:
# a stamp keyed on pyproject.toml makes a second run skip the install).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROMPT ?= a photo of an astronaut riding a horse on mars

.PHONY: setup setup-test demo test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-runtime
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed-runtime
setup-test: $(VENV)/.installed-test

# Validate the embedded default model, generate an image on MAX, offline.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python python/text_to_image_secure.py \
		--prompt "$(PROMPT)" --output out/demo.png

# The whole test suite.
test: setup-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
