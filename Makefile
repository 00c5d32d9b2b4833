# Set-up and checks for the whole workspace. `make demo` and `make test` are the two commands
# in the README; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The lowest transformers release the backend packages declare (their pyproject.toml floors).
TRANSFORMERS_FLOOR := 5.6.0
PACKAGES := core archscope-transformer archscope-mamba archscope-recurrent archscope-hybrid plugins/archscope-zoo plugins/archscope-graphs
TESTS := core/tests archscope-transformer/tests archscope-mamba/tests archscope-recurrent/tests archscope-hybrid/tests plugins/template/tests plugins/archscope-zoo/tests plugins/archscope-graphs/tests tests
# The backend suites again, against the oldest transformers the backend packages allow
# (their pyproject.toml floors), in a second venv pinned by constraints-oldest.txt.
OLDEST := .venv-oldest
OLDEST_PY := $(OLDEST)/bin/python
OLDEST_TESTS := archscope-transformer/tests archscope-mamba/tests archscope-recurrent/tests archscope-hybrid/tests plugins/template/tests

.PHONY: setup setup-oldest demo test test-latest test-oldest lint lock bench clean

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

test: lint test-latest test-oldest

test-latest: setup
	$(PY) -m pytest -q $(TESTS)

setup-oldest: $(OLDEST)/.installed

$(OLDEST)/.installed: $(foreach p,$(PACKAGES),$(p)/pyproject.toml) Makefile constraints-oldest.txt
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST_PY) -m pip --disable-pip-version-check -q install torch==2.13.0
	$(OLDEST_PY) -m pip --disable-pip-version-check -q install -c constraints-oldest.txt \
		$(foreach p,$(PACKAGES),-e "$(p)[test]") -e "plugins/template[test]"
	touch $@

test-oldest: setup-oldest
	$(OLDEST_PY) -c "import transformers; print('backend suites on transformers', transformers.__version__)"
	$(OLDEST_PY) -m pytest -q $(OLDEST_TESTS)

# Refresh the pins on purpose: the newest releases the packages' ranges allow (constraints.txt)
# and the floors they declare (constraints-oldest.txt). Then run `make test` and commit both.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip --disable-pip-version-check -q install torch==2.13.0
	.venv-lock/bin/pip --disable-pip-version-check -q install $(foreach p,$(PACKAGES),-e "$(p)[test]") \
		-e "core[plot,ray,datasets,accelerate]" -e "plugins/template[test]" ruff mypy
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip --disable-pip-version-check -q install torch==2.13.0
	.venv-lock/bin/pip --disable-pip-version-check -q install "transformers==$(TRANSFORMERS_FLOOR)" \
		$(foreach p,$(PACKAGES),-e "$(p)[test]") -e "plugins/template[test]"
	{ sed -n '/^#/p' constraints-oldest.txt; .venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints-oldest.txt
	rm -rf .venv-lock

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(OLDEST)
