# The whole set-up on a fresh machine: `make demo` or `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install benchmark clean

# Ranges in pyproject.toml (installs beside an existing scverse stack); `make` installs the exact versions
# of constraints.txt (tested, CPU torch) so every machine gets the same environment.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/histocell-sd demo

test: $(STAMP)
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(PY) -m pytest -p nbval --nbval-lax -q tests tutorials notebooks

clean:
	rm -rf $(VENV) histocell_demo
