# The whole set-up on a fresh machine: `make demo` or `make test` (`make docs` builds the documentation).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test install docs benchmark clean

# Ranges in pyproject.toml (installs beside an existing scverse stack); `make` installs the exact versions
# of constraints.txt (tested, CPU torch) so every machine gets the same environment.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[docs]"
	@touch $(DOCS_STAMP)

# Offline (no intersphinx), notebooks rendered from their stored outputs, warnings are errors; always from
# scratch (~20 s), so stale autosummary pages or cached warnings cannot hide a problem.
docs: $(DOCS_STAMP)
	rm -rf docs/_build docs/generated
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

demo: $(STAMP)
	$(VENV)/bin/histocell-sd demo

test: $(STAMP)
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(PY) -m pytest -p nbval --nbval-lax -q --durations=15 tests tutorials notebooks

clean:
	rm -rf $(VENV) histocell_demo docs/_build docs/generated
