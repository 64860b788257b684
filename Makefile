# make test   create/refresh the virtual environment when needed, then run the test suite
# make test-fast   the same without the end-to-end and multi-process tests (marked slow)
# make demo   the whole chain on a generated long-video benchmark (see README)
# make env    only create/refresh the environment
#
# The environment lives outside the repository and is reused between runs; it is rebuilt when
# requirements.txt or pyproject.toml change. Override its place with  make test VENV=/path/to/venv
PYTHON ?= python3
VENV ?= $(HOME)/.cache/lv-mae/venv
PY := $(VENV)/bin/python
# the stamp names the requirements and this checkout (the project is installed editable from it)
STAMP := $(VENV)/.lv-mae-$(shell (cat requirements.txt pyproject.toml; echo '$(CURDIR)') | sha1sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: env test test-fast demo clean-env

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.lv-mae-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)

DEMO_ARGS ?=

demo: $(STAMP)
	$(PY) tools/demo.py $(DEMO_ARGS)
