# `make run` and `make test` each install what they need first (once: the stamp file records it).
PYTHON ?= python
STAMP := .install-stamp

.PHONY: install run test test-fast lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PYTHON) -m experiments.run --loss focal

test: $(STAMP)
	$(PYTHON) -m pytest

test-fast: $(STAMP)
	$(PYTHON) -m pytest -m "not slow"

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(STAMP)
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

clean:
	rm -rf $(STAMP) runs wandb lightning_logs .pytest_cache
