# Two commands set up everything on a fresh machine with Python 3.11, 3.12 or 3.13: `make demo`,
# `make test`. PYTHON=... picks the interpreter, VENV=... the virtualenv it goes into.
SUPPORTED := 3.11 3.12 3.13
NEWEST := $(lastword $(SUPPORTED))
IS_SUPPORTED := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))
# The oldest supported one that runs (what the image has), else python3 if it is supported. Each
# is run, not only looked up: pyenv has shims for versions it has not made active.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(shell for p in $(SUPPORTED:%=python%) python3; do \
	$$p -c '$(IS_SUPPORTED)' 2>/dev/null && command -v $$p; done))
endif
# The newest supported one, for `make test-newest`: on the PATH or installed by pyenv.
PYTHON_NEWEST ?= $(firstword $(shell for p in python$(NEWEST) $$(pyenv root 2>/dev/null)/versions/$(NEWEST)*/bin/python$(NEWEST); do \
	$$p -c '$(IS_SUPPORTED)' 2>/dev/null && echo $$p; done))
VENV ?= .venv
STAMP := $(VENV)/.installed
# buf (lint and breaking-change checks of protos/), pinned in package.json / package-lock.json.
NPM ?= npm
BUF := node_modules/.bin/buf
TOOLS := node_modules/.installed
# The last release: `make breaking` checks the public API against its image.
RELEASE := v0.1.0
PUBLIC_PROTOS := --path protos/cardcheck/v1/gateway.proto --path protos/cardcheck/v1/common.proto

.PHONY: demo test test-newest protos docs lint typecheck breaking release-image bench venv tools up constraints client

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c '$(IS_SUPPORTED)' 2>/dev/null || { echo "make: needs Python 3.11, 3.12 or 3.13, found" \
	  "$(or $(PYTHON),none): install one, or name it with PYTHON=/path/to/python3.x" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(TOOLS): package.json package-lock.json
	$(NPM) ci --no-audit --no-fund
	touch $(TOOLS)

tools: $(TOOLS)

demo: $(STAMP)
	bash deploy/local/demo.sh

up: $(STAMP)
	$(VENV)/bin/cardcheck up

test: $(STAMP)
	$(VENV)/bin/pytest

# The suite again on the newest supported Python, in a virtualenv of its own.
test-newest:
	@test -n "$(PYTHON_NEWEST)" || { echo "make: no Python $(NEWEST) found; name it with PYTHON_NEWEST=..." >&2; exit 1; }
	$(MAKE) test PYTHON=$(PYTHON_NEWEST) VENV=.venv-$(NEWEST)

# The cardcheck-client wheel (clients/python: the client and the public stubs alone) into dist/.
client: $(STAMP)
	$(VENV)/bin/python -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w dist clients/python

# The stubs and docs/api.md, both generated from protos/ (tests fail when either drifts).
protos: $(STAMP)
	$(VENV)/bin/python -m cardcheck.protogen
	$(VENV)/bin/python -m cardcheck.protodoc

docs: $(STAMP)
	$(VENV)/bin/python -m cardcheck.protodoc

lint: $(STAMP) $(TOOLS)
	$(VENV)/bin/ruff check .
	$(BUF) lint

# mypy as pyproject.toml's [tool.mypy] says: every package, the shared runtime and the domain
# modules strictly, against the stubs' own types.
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The public API (gateway.proto, common.proto) may grow, never break: checked on the wire and in
# JSON against the image of the last release. The internal protos are not in it: every service
# deploys from one image, so they change together.
breaking: $(TOOLS)
	$(BUF) breaking --against protos/releases/$(RELEASE).binpb

# At a release (`make release-image RELEASE=v0.2.0`, then set RELEASE above): the public API's
# image that later changes are checked against.
release-image: $(TOOLS)
	$(BUF) build $(PUBLIC_PROTOS) --exclude-source-info -o protos/releases/$(RELEASE).binpb

bench: $(STAMP)
	$(VENV)/bin/python -m bench

# After a dependency changes in pyproject.toml: install it, then pin the whole tree again.
constraints: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/python -m pip freeze --exclude-editable --exclude setuptools | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
