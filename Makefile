# Two commands set up everything on a fresh machine with Python 3.11: `make demo`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
# buf (lint and breaking-change checks of protos/), pinned in package.json / package-lock.json.
NPM ?= npm
BUF := node_modules/.bin/buf
TOOLS := node_modules/.installed
# The last release: `make breaking` checks the public API against its image.
RELEASE := v0.1.0
PUBLIC_PROTOS := --path protos/cardcheck/v1/gateway.proto --path protos/cardcheck/v1/common.proto

.PHONY: demo test protos docs lint breaking release-image bench venv tools up constraints

$(STAMP): pyproject.toml constraints.txt
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

# The stubs and docs/api.md, both generated from protos/ (tests fail when either drifts).
protos: $(STAMP)
	$(VENV)/bin/python -m cardcheck.protogen
	$(VENV)/bin/python -m cardcheck.protodoc

docs: $(STAMP)
	$(VENV)/bin/python -m cardcheck.protodoc

lint: $(STAMP) $(TOOLS)
	$(VENV)/bin/ruff check .
	$(BUF) lint

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
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/python -m pip freeze --exclude-editable | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
