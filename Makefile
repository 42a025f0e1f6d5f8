# `make run` and `make test` each install what they need first (once: the stamp file records it).
PYTHON ?= python
STAMP := .install-stamp

.PHONY: install run test test-all test-fast lint format strip clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PYTHON) -m experiments.run --loss focal

test: $(STAMP)
	$(PYTHON) -m pytest -m "not extended"

test-all: $(STAMP)
	$(PYTHON) -m pytest

test-fast: $(STAMP)
	$(PYTHON) -m pytest -m "not slow"

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(STAMP)
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

strip:  # notebooks are stored without outputs (tests/test_notebooks.py checks it)
	$(PYTHON) -c "import nbformat, pathlib; [nbformat.write(nb, p) for p in pathlib.Path('notebooks').glob('*.ipynb') for nb in [nbformat.read(p, as_version=4)] if [c.update(outputs=[], execution_count=None) for c in nb.cells if c.cell_type == 'code'] is not None]"

clean:
	rm -rf $(STAMP) runs wandb lightning_logs .pytest_cache
