# Two commands do all the set-up on a fresh machine (Python 3.11+):
#   make run    create .venv, install Kiln, run the pipeline on the bundled offline default
#   make test   create .venv, install Kiln and its test tools, run the test suite
#   make lint   ruff and mypy (configured in pyproject.toml); .ci/run runs it before the tests
VENV ?= .venv
PYTHON ?= python3
PIP = $(VENV)/bin/python -m pip
STAMP = $(VENV)/.installed
# torch first, on its own: then nothing later can resolve torch to a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 -c constraints.txt
	$(PIP) install -q -e '.[dev]' -c constraints.txt
	touch $(STAMP)

LLAMA_STAMP = $(VENV)/.installed-llama
$(LLAMA_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev,llama]' -c constraints.txt
	touch $(LLAMA_STAMP)

.PHONY: install run test lint bench
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kiln run

test: $(LLAMA_STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	for b in bench/*.py; do case $$b in *_metric.py|*/_*) ;; *) $(VENV)/bin/python $$b || exit 1;; esac; done
