# Set-up and checks for the whole workspace. `make demo` and `make test` are the two commands
# in the README; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PACKAGES := core archscope-transformer archscope-mamba archscope-recurrent plugins/archscope-zoo
TESTS := core/tests archscope-transformer/tests archscope-mamba/tests archscope-recurrent/tests plugins/template/tests plugins/archscope-zoo/tests tests

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(foreach p,$(PACKAGES),$(p)/pyproject.toml) plugins/template/pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build on local disk; the packages only ask for torch>=2.2
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt $(foreach p,$(PACKAGES),-e "$(p)[test]") \
		-e "core[plot,ray,datasets,accelerate]" -e "plugins/template[test]" ruff mypy
	touch $@

demo: setup
	$(VENV)/bin/archscope bench --out report/report.md

test: lint
	$(PY) -m pytest -q $(TESTS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV)
