# The README's commands. `make setup` is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/bundle

.PHONY: setup test lint demo preview bench verify clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build lies on this machine's disk; an unpinned torch pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check bundle tests bench
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check bundle tests bench

# The main job on an embedded default. Until the toy-data issue lands: the synthetic-anomaly preview.
demo: setup
	$(PY) -m scripts.preview --output-dir outputs/preview

preview: setup
	$(PY) -m scripts.preview --output-dir bundle/docs/images

bench: setup
	$(PY) bench/bench_engine.py

verify: setup
	$(PY) -m monai.bundle verify_metadata --meta_file bundle/configs/metadata.json \
		--filepath tests/fixtures/meta_schema_20240725.json

clean:
	rm -rf outputs .pytest_cache .ruff_cache
