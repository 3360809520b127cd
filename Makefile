# Two targets a new user needs: `make serve` (the demo model on :8080) and `make test`.
# Both build .venv first. TORCH picks the torch build to install before the project, so that the
# project's `torch>=2.4` is already met (set TORCH=torch to take the registry's default build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PORT ?= 8080

.PHONY: serve test lint

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

serve: $(VENV)/.installed
	$(PY) server.py --model demo --port $(PORT)

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	@# mypy reads packages from folders of their name: trickle's modules sit at the top of the checkout,
	@# so it checks them through a folder of links named trickle.
	rm -rf build/typecheck && mkdir -p build/typecheck/trickle
	for part in server.py notify.py api config generation; do ln -s ../../../$$part build/typecheck/trickle/; done
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p trickle
