# fedgov: `make demo` and `make test` do all the set-up on a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedgov-installed

.PHONY: demo test test-fast test-statistical lint clean venv bench browser

venv: $(STAMP)

# torch is installed first and pinned: pip then takes the CPU wheel where one is at hand
# (a find-links folder such as /opt/wheels), instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "fedgov needs Python 3.11; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	@$(BIN)/python -c 'import torch; print("torch", torch.__version__, "CUDA build" if torch.version.cuda else "CPU build")'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedgov run configs/tasks/adult-income.toml

# One gate: lint, types, then the whole test suite (CI runs exactly this), on two workers
# (pytest-xdist): the end-to-end tests, which start Flower processes, one after the other on one
# worker; every other test module whole on either (tests/conftest.py groups them).
PYTEST := $(BIN)/python -m pytest -q -rs -n 2 --dist loadgroup

test: lint browser
	$(PYTEST)

# The web consoles' browser tests drive the system's Chromium: installed here where the machine
# allows (root and apt-get); what could not be installed is said, and those tests are skipped.
browser:
	@scripts/ensure_chromium.sh

lint: $(STAMP)
	$(BIN)/ruff check fedgov server clients tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The benchmark suite (not part of `make test`; about 50 minutes on 2 cores): JSON in
# benchmarks/results/, and the table benchmarks/results/summary.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The tests that draw fresh noise, masks or keys (marker `statistical`), 200 times in a row.
test-statistical: $(STAMP)
	scripts/repeat_statistical.sh 200 -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
