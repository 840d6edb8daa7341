# The two commands of the README: `make up` (stack + demo) and `make test` (the suite).
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: up test venv lint schemas lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

up: $(STAMP)
	scripts/system-deps
	$(VENV)/bin/shipline up

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shipline ingress streams deployer projections outbound console

schemas: $(STAMP)
	$(VENV)/bin/python -m shipline.schemagen

lock:
	$(VENV)/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
