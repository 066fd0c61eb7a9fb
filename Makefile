# The README's commands. `make setup` is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/bundle

.PHONY: setup test lint demo preview bench bench-training bench-inference train infer evaluate report normals verify clean

# `make train DATA=folder [DATASET=brain|abdom] [OUT=runs] [FOREIGN=folder] [T=1] [ARGS="--max_epochs 50"]`
# trains every model fold of the cross-validation split and writes OUT/models/DATASET/summary.json.
DATASET ?= brain
OUT ?= runs
T ?= 1

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

bench-training: setup
	$(PY) bench/bench_training.py

train: setup
	@test -n "$(DATA)" || (echo "usage: make train DATA=<folder of normal *.nii.gz> [DATASET=brain|abdom] [OUT=runs]"; exit 2)
	$(PY) -m scripts.training --config_file bundle/configs/train.yaml bundle/configs/$(DATASET).yaml \
		--output_dir $(OUT) --num_train_tasks $(T) --dataset_dir $(DATA) \
		$(if $(FOREIGN),--foreign_dir $(FOREIGN)) $(ARGS)

# `make infer IN=folder OUT=folder [DATASET=brain|abdom] [MODE=pixel|sample] [MODELS=runs/models]`
MODE ?= pixel
infer: setup
	@test -n "$(IN)" || (echo "usage: make infer IN=<folder of scans> OUT=<folder> [DATASET=brain|abdom] [MODE=pixel|sample]"; exit 2)
	$(PY) -m monai.bundle run inference --meta_file bundle/configs/metadata.json --bundle_root bundle \
		--config_file "['bundle/configs/inference.yaml','bundle/configs/$(DATASET).yaml']" \
		--input_dir "$(IN)" --output_dir "$(OUT)" --mode $(MODE) $(if $(MODELS),--models_dir "$(MODELS)")

# `make evaluate DATA=<MOOD-layout dataset folder> PRED=<predictions folder> [MODE=pixel|sample]`
evaluate: setup
	$(PY) -m scripts.evaluate --data_dir "$(DATA)" --pred_dir "$(PRED)" --mode $(MODE)

# `make report IN=<MOOD-layout dataset folder> PRED=<predictions (pixel maps and/or .txt scores)> [OUT=report]`
report: setup
	@test -n "$(IN)" -a -n "$(PRED)" || (echo "usage: make report IN=<dataset folder> PRED=<predictions> [OUT=...]"; exit 2)
	$(PY) -m scripts.report --data_dir "$(IN)" --pixel_dir "$(PRED)" --sample_dir "$(PRED)" \
		--output_dir "$(if $(filter runs,$(OUT)),report,$(OUT))"

bench-inference: setup
	$(PY) bench/bench_inference.py

# toy normal scans for trying training without MOOD data: `make normals DATASET=brain OUT=data/normals`
normals: setup
	$(PY) -m scripts.phantoms --dataset $(DATASET) --output-dir $(OUT) --count 20

verify: setup
	$(PY) -m monai.bundle verify_metadata --meta_file bundle/configs/metadata.json \
		--filepath tests/fixtures/meta_schema_20240725.json

clean:
	rm -rf outputs .pytest_cache .ruff_cache
