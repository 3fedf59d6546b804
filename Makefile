# Two commands set up everything on a fresh machine with Python 3.11: `make demo`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test protos lint bench venv up constraints

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	bash deploy/local/demo.sh

up: $(STAMP)
	$(VENV)/bin/cardcheck up

test: $(STAMP)
	$(VENV)/bin/pytest

protos: $(STAMP)
	$(VENV)/bin/python -m cardcheck.protogen

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python -m bench

# After a dependency changes in pyproject.toml: install it, then pin the whole tree again.
constraints: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/python -m pip freeze --exclude-editable | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
