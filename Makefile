# The README's commands. `make setup` is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/bundle:$(CURDIR)
# MONAI's notice that a bundle config is trusted code (the bundle's own are), by name: scripts/__init__.py
export PYTHONWARNINGS := ignore:parsing config_file:UserWarning:monai.bundle.scripts

help:
	@echo 'make demo | test | setup | lint | train DATA=... [KIND=classifier|3d|2d] | infer IN=... OUT=... | evaluate DATA=... PRED=...'
	@echo '     report IN=... PRED=... | report-setup | report-check | normals | preview | export | verify | bench | bench-training | bench-inference | bench-quality [MODELS=...] | bench-recipe | bench-slicewise'
	@echo '     demo-xray [BUDGET=1] | demo-train [GPU=1] | demo-finetune [DATASET=...] | deploy-setup | deploy-test | deploy-run IN=... OUT=... | deploy-package'
	@echo '     docker-setup | docker-image | docker-test | clean'
	@echo 'each target is described by the comment above it in the Makefile; README.md has the tour'

.PHONY: help setup test lint docker-setup docker-image docker-test demo demo-xray demo-train demo-finetune preview bench bench-training bench-inference bench-quality bench-recipe bench-slicewise train infer evaluate report report-setup report-check normals verify export deploy-setup deploy-test deploy-run deploy-package clean

# `make train DATA=folder [DATASET=brain|abdom] [OUT=runs] [FOREIGN=folder] [T=<training tasks per fold: 1 networks, 4 classifier>] [ARGS="--max_epochs 50"] [KIND=classifier|3d|2d]`
# KIND=classifier (the shipped recipe, bundle/models/README.md): the voxel classifier, fused with the shipped networks on
# brain; KIND=3d: the 3D networks alone (the GPU recipe); KIND=2d: the slice-wise FPI system (bundle/configs/slicewise.yaml)
# trains every model fold of the cross-validation split and writes OUT/models/DATASET/summary.json.
DATASET ?= brain
DATASETS := brain abdom xray
# one clear line for a dataset name the bundle has no overlay for (instead of MONAI's traceback)
check_dataset = $(if $(filter $(DATASETS),$(DATASET)),,$(error DATASET must be one of: $(DATASETS); got '$(DATASET)'))
OUT ?= runs
T ?=
# the inference workflow's configs for a dataset: the shared part, the workflow, the dataset overlay
inference_configs = ['bundle/configs/common.yaml','bundle/configs/inference.yaml','bundle/configs/$(1).yaml']

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "setup: $(VENV): the virtual environment (pyproject.toml changed or first run)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: the CPU build lies on this machine's disk; an unpinned torch pulls CUDA.
	@echo "setup: installing torch 2.13.0 (the CPU build)"
	@$(PY) -m pip install --quiet torch==2.13.0
	@echo "setup: installing the pinned dependencies of pyproject.toml (MONAI, Ignite, nibabel, ...; about 2 min the first time)"
	@$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)
	@echo "setup: done ($(VENV))"

# the tests on every core (pytest-xdist; PYTEST_JOBS=0 runs them in this process); a module's tests share a
# worker, so its module-scoped fixtures (a trained study, a quality run) are made once; session-scoped ones are
# made once per worker
PYTEST_JOBS ?= auto
test: setup
	$(VENV)/bin/ruff check bundle tests bench deploy tools
	$(PY) -m pytest -q -n $(PYTEST_JOBS) --dist loadscope

lint: setup
	$(VENV)/bin/ruff check bundle tests bench deploy tools

# The main job on an embedded default: a toy MOOD set scored by the four run scripts with the shipped
# weights, evaluated, and reported (the last line printed is `report: <path>`).
demo: setup
	$(PY) -m tools.demo --output_dir outputs/demo

# `make demo-xray [BUDGET=1]`: the native 2D system end to end on the chest phantom (nothing shipped, nothing
# downloaded): 20 normal radiographs and 10 test cases (tools/xray_phantom.py), all five folds trained with BUDGET
# minutes each (xray.yaml), inference (maps, scores, PNG overlays, the worklist), and the report with labels
demo-xray: setup
	rm -rf outputs/demo-xray
	$(PY) -m tools.xray_phantom --output_dir outputs/demo-xray/data --train 20 --toy 10 --seed 0
	$(PY) -m scripts.training --config_file bundle/configs/common.yaml bundle/configs/train.yaml \
		bundle/configs/xray.yaml --output_dir outputs/demo-xray/run --dataset_dir outputs/demo-xray/data/xray/xray_train \
		--time_budget $(or $(BUDGET),1) --max_epochs 1000 --max_val_samples 20 --num_workers 0
	$(PY) -m monai.bundle run --meta_file bundle/configs/metadata.json --bundle_root bundle \
		--config_file "$(call inference_configs,xray)" --dataset_dir outputs/demo-xray/data/xray/toy \
		--output_dir outputs/demo-xray/pred --mode both --models_dir outputs/demo-xray/run/models
	$(PY) -m tools.report --input outputs/demo-xray/data/xray --pred outputs/demo-xray/pred \
		--output_dir outputs/demo-xray/report
	@echo "demo-xray: outputs/demo-xray/report/report.html"

# Train default weights from scratch on toy normals and install them into bundle/models.
# `make demo-train`: the shipped CPU recipe (bundle/models/README.md): 30 cohort-varied toy normals per dataset at
# 256^3, then `make train` with its defaults (KIND=classifier: the voxel classifier, brain fused with the shipped
# networks); each dataset's folder is replaced. `make demo-train GPU=1 [BUDGET=60]`: the networks' GPU recipe (128^3
# grid, 40 normals, 8 base filters), every fold given BUDGET minutes (the cosine spans it), the five folds of a
# dataset trained at once on the one GPU.
ifdef GPU
DEMO_TRAIN_DATA = outputs/demo-train/data
DEMO_TRAIN_DATA_ARGS = --size 128 --train 40 --toy 2 --seed 0
DEMO_TRAIN_KIND = 3d
DEMO_TRAIN_ARGS = --spatial_size '[128,128,128]' --network_base_filters 8 --time_budget $(or $(BUDGET),60) \
	--max_epochs 10000 --early_stop_patience 10000 --val_interval 4 --num_workers 2 --seed 0 --parallel_folds 5 \
	--cache_dir outputs/demo-train/cache
else
DEMO_TRAIN_DATA = outputs/demo-train/cohort
DEMO_TRAIN_DATA_ARGS = --size 256 --train 30 --toy 6 --seed 0 --variability cohort
DEMO_TRAIN_KIND = classifier
DEMO_TRAIN_ARGS = --cache_dir outputs/demo-train/cache
endif
demo-train: setup
	test -d $(DEMO_TRAIN_DATA)/brain/brain_train -a -d $(DEMO_TRAIN_DATA)/abdom/abdom_train || \
		$(PY) -m tools.toy_data --output_dir $(DEMO_TRAIN_DATA) --datasets brain abdom $(DEMO_TRAIN_DATA_ARGS)
	rm -rf outputs/demo-train/models
	$(MAKE) train DATA=$(DEMO_TRAIN_DATA)/brain/brain_train DATASET=brain OUT=outputs/demo-train KIND=$(DEMO_TRAIN_KIND) \
		FOREIGN=$(DEMO_TRAIN_DATA)/abdom/abdom_train ARGS="$(DEMO_TRAIN_ARGS)"
	$(MAKE) train DATA=$(DEMO_TRAIN_DATA)/abdom/abdom_train DATASET=abdom OUT=outputs/demo-train KIND=$(DEMO_TRAIN_KIND) \
		FOREIGN=$(DEMO_TRAIN_DATA)/brain/brain_train ARGS="$(DEMO_TRAIN_ARGS)"
	for d in brain abdom; do rm -rf bundle/models/$$d && cp -r outputs/demo-train/models/$$d bundle/models/$$d; done

# `make demo-finetune [DATASET=abdom] [BUDGET=5] [LR=0.0008]`: every fold of the shipped DATASET models fine-tuned
# for BUDGET minutes on the shipped recipe's own data (128^3, 40 normals, seed 0) with the current defaults (e.g.
# the abdomen's robust normalisation), then installed into bundle/models (`git checkout bundle/models` undoes it):
# the CPU experiment of bundle/models/README.md. LR: the peak of the cosine, about where the shipped run's
# schedule stopped.
LR ?= 0.0008
OTHER = $(if $(filter brain,$(DATASET)),abdom,brain)
FINETUNE = outputs/demo-finetune
demo-finetune: setup
	$(check_dataset)
	test -d $(FINETUNE)/data/brain/brain_train -a -d $(FINETUNE)/data/abdom/abdom_train || \
		$(PY) -m tools.toy_data --output_dir $(FINETUNE)/data --size 128 --train 40 --toy 2 --seed 0
	rm -rf $(FINETUNE)/models/$(DATASET) $(FINETUNE)/metrics.json
	$(MAKE) train DATA=$(FINETUNE)/data/$(DATASET)/$(DATASET)_train DATASET=$(DATASET) OUT=$(FINETUNE) KIND=3d \
		FOREIGN=$(FINETUNE)/data/$(OTHER)/$(OTHER)_train ARGS="--init_models_dir bundle/models \
		--spatial_size '[128,128,128]' --network_base_filters 8 --time_budget $(or $(BUDGET),5) --learning_rate $(LR) \
		--warmup_epochs 0 --max_epochs 10000 --early_stop_patience 10000 --num_workers 1 --seed 0 \
		--cache_dir $(FINETUNE)/cache"
	cp $(FINETUNE)/models/$(DATASET)/* bundle/models/$(DATASET)/

preview: setup
	$(PY) -m tools.preview --output_dir bundle/docs/images

bench: setup
	$(PY) bench/bench_engine.py

# `make bench-training`: training samples per second of fp32, bf16 autocast and channels-last 3D, in turn, in one run
bench-training: setup
	$(PY) bench/bench_training.py --variants fp32 bf16 fp32_cl bf16_cl --repeats 3

# radiographs train their 2D networks (xray.yaml); brain and abdomen the voxel classifier
KIND ?= $(if $(filter xray,$(DATASET)),3d,classifier)
train: setup
	@test -n "$(DATA)" || (echo "usage: make train DATA=<folder of normal *.nii.gz> [DATASET=brain|abdom] [OUT=runs]"; exit 2)
	$(check_dataset)
	$(PY) -m scripts.training --config_file bundle/configs/common.yaml bundle/configs/train.yaml bundle/configs/$(DATASET).yaml \
		$(if $(filter 2d,$(KIND)),bundle/configs/slicewise.yaml) $(if $(filter classifier,$(KIND)),bundle/configs/classifier.yaml) --output_dir $(OUT) $(if $(T),--num_train_tasks $(T)) --dataset_dir $(DATA) \
		$(if $(FOREIGN),--foreign_dir $(FOREIGN)) $(ARGS)

# `make infer IN=folder OUT=folder [DATASET=brain|abdom] [MODE=pixel|sample|both] [MODELS=runs/models]`
MODE ?= pixel
infer: setup
	@test -n "$(IN)" || (echo "usage: make infer IN=<folder of scans> OUT=<folder> [DATASET=brain|abdom] [MODE=pixel|sample|both]"; exit 2)
	$(check_dataset)
	$(PY) -m monai.bundle run --meta_file bundle/configs/metadata.json --bundle_root bundle \
		--config_file "$(call inference_configs,$(DATASET))" \
		--dataset_dir "$(IN)" --output_dir "$(OUT)" --mode $(MODE) $(if $(MODELS),--models_dir "$(MODELS)")

# `make evaluate DATA=<MOOD-layout dataset folder> PRED=<predictions folder> [MODE=pixel|sample]`
evaluate: setup
	$(PY) -m scripts.evaluate --data_dir "$(DATA)" --pred_dir "$(PRED)" --mode $(MODE)

# `make report IN=<folder of scans, or a MOOD-layout dataset folder> PRED=<inference output folder> [OUT=report]
# [ARGS="--modality ct --max_views 20"]`: OUT/report.html, the worklist by score (flags and thresholds from
# PRED/scores.csv when there), three views per case and, with labels, AP and AUROC (tools/report.py)
report_out = $(if $(filter runs,$(OUT)),report,$(OUT))
report: setup
	@test -n "$(IN)" -a -n "$(PRED)" || (echo "usage: make report IN=<folder of scans or dataset folder> PRED=<predictions> [OUT=...]"; exit 2)
	$(PY) -m tools.report --input "$(IN)" --pred "$(PRED)" --output_dir "$(report_out)" $(ARGS)

# `make report-setup` (as root): Debian's chromium for report-check and its test (tests/test_report.py), when missing
report-setup:
	@command -v chromium > /dev/null || { echo "report-setup: installing chromium (Debian's package, about 35 s)"; \
		apt-get install -y -q chromium > /dev/null || { apt-get update -q > /dev/null && apt-get install -y -q chromium > /dev/null; }; }

# `make report-check [OUT=report]`: OUT/report.html in headless Chromium (a screenshot beside it; the page fits a
# 1400 px window, every image decodes, slices >= 300 px); needs a chromium binary (apt-get install -y chromium)
report-check: setup
	$(PY) -m tools.report_screenshot --report "$(report_out)/report.html"

# `make bench-inference [ARGS="--cases 3 --datasets brain abdom"]`: MOOD-sized toy cases through the previous
# release's pixel and sample runs and this checkout's one pass for both: seconds per case and per stage, the pure
# I/O floor, peak memory, the map data types, and the outputs unchanged (bench/bench_inference.py; ~10 min on 2 cores);
# models holding voxel classifiers, which that release cannot read, are timed against the models it shipped
bench-inference: setup
	$(PY) bench/bench_inference.py $(ARGS)

# `make bench-quality [MODELS=runs/models]`: held-out toy and gorilla sets through the four MOOD run scripts,
# pixel and sample AP per group next to two baselines (bench/bench_quality.py; about an hour on 2 cores)
bench-quality: setup
	$(PY) bench/bench_quality.py $(if $(MODELS),--models_dir "$(MODELS)")

# `make bench-slicewise [ARGS="--datasets brain --budget 8"]`: the slice-wise FPI system against the 3D default,
# both trained at once on the same toy normals with the same minutes per fold, then bench-quality on each
# (bench/bench_slicewise.py; with the defaults, per dataset on 2 cores: about 40 min of training, 30-35 min of scoring)
bench-slicewise: setup
	$(PY) bench/bench_slicewise.py $(ARGS)

# `make bench-recipe [ARGS="--budget 6 --datasets brain"]`: training settings compared at an equal time budget,
# one fold each, on synthetic validation (what chooses) and the held-out toy and gorilla sets (what checks)
# (bench/study_recipe.py; about 7 min per setting and dataset on 2 cores at the default 64^3)
bench-recipe: setup
	$(PY) bench/study_recipe.py $(ARGS)

# toy normal scans for trying training without MOOD data: `make normals DATASET=brain|abdom|xray [OUT=data/normals/brain]`
# (xray: 256^2 chest radiographs, PNG; without OUT they go to data/normals/<DATASET>, never into the training run folder)
normals: setup
	$(check_dataset)
	$(PY) -m tools.phantoms --dataset $(DATASET) --output_dir "$(if $(filter runs,$(OUT)),data/normals/$(DATASET),$(OUT))" --count 20

# The model-zoo checks, as MONAI's CLI runs them: metadata against the official schema (offline copy), and for each
# shipped dataset with networks (brain; the abdomen ships voxel classifiers alone, which have no network to check)
# network input/output against the metadata, TorchScript and ONNX export of fold 0.
# For the shipped 3D models (network_def on a volume); a slice-wise models folder: `make export MODELS=...`.
VERIFY_DIR := outputs/verify
META := bundle/configs/metadata.json
ONNX_KWARGS = $(shell PYTHONPATH=bundle $(PY) -c 'import scripts.export as e; print(e.ONNX_CONVERTER_KWARGS)')
define verify_dataset
	$(PY) -m monai.bundle verify_net_in_out network_def --meta_file $(META) \
		--config_file "$(call inference_configs,$(1))" --bundle_root bundle --n 2
	$(PY) -m monai.bundle ckpt_export network_def --filepath $(VERIFY_DIR)/$(1)/fold_0.ts \
		--ckpt_file bundle/models/$(1)/fold_0.pt --key_in_ckpt "" --meta_file $(META) \
		--config_file "$(call inference_configs,$(1))" --bundle_root bundle
	$(PY) -m monai.bundle onnx_export network_def --filepath $(VERIFY_DIR)/$(1)/fold_0.onnx \
		--ckpt_file bundle/models/$(1)/fold_0.pt --key_in_ckpt "" --meta_file $(META) \
		--config_file "$(call inference_configs,$(1))" --bundle_root bundle \
		--use_trace True --input_shape "[1, 1, 64, 64, 64]" --converter_kwargs "$(ONNX_KWARGS)"

endef
VERIFY_DATASETS = $(patsubst bundle/models/%/fold_0.pt,%,$(wildcard bundle/models/*/fold_0.pt))
verify: setup
	$(PY) -m monai.bundle verify_metadata --meta_file $(META) --filepath tests/fixtures/meta_schema_20240725.json
	mkdir -p $(VERIFY_DIR)/brain $(VERIFY_DIR)/abdom
	$(foreach d,$(VERIFY_DATASETS),$(call verify_dataset,$(d)))
# `make export [MODELS=bundle/models]`: fold_<k>.ts and fold_<k>.onnx next to every fold_<k>.pt, each checked
# against its state dict (export.json); inference then runs from them with `--model_format torchscript|onnx`.
export: setup
	$(PY) -m scripts.export --models_dir $(or $(MODELS),bundle/models)

# The MONAI Deploy application (deploy/) in its own virtual environment: the SDK pins protobuf and ml-dtypes
# below what onnx needs in the main one.
DEPLOY_VENV := .deploy-venv
DEPLOY_PY := $(DEPLOY_VENV)/bin/python
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
deploy-setup: $(DEPLOY_STAMP)

$(DEPLOY_STAMP): deploy/requirements.txt
	test -x $(DEPLOY_PY) || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_PY) -m pip install --quiet torch==2.13.0
	$(DEPLOY_PY) -m pip install --quiet -r deploy/requirements.txt
	touch $(DEPLOY_STAMP)

# Runs the app on tiny toy folders (both datasets, a bad scan, ONNX exports) and checks that its outputs equal the
# bundle inference's.
deploy-test: setup deploy-setup
	MOOD_DEPLOY_PYTHON=$(CURDIR)/$(DEPLOY_PY) $(PY) -m pytest -q tests/test_deploy.py

# `make deploy-run IN=<scans> OUT=<folder> [MODELS=bundle/models] [DATASET=brain|abdom]`: the app, locally.
deploy-run: deploy-setup
	@test -n "$(IN)" -a "$(OUT)" != runs || (echo "usage: make deploy-run IN=<folder of scans> OUT=<folder> [MODELS=bundle/models] [DATASET=brain|abdom]"; exit 2)
	$(check_dataset)
	MOOD_DATASET=$(DATASET) $(DEPLOY_PY) deploy/app.py -i "$(IN)" -o "$(OUT)" -m "$(or $(MODELS),bundle/models)"

# The MAP container image (needs Docker and internet access for the Holoscan base image; these machines have neither).
MAP_TAG ?= mood-anomaly:0.13.2
deploy-package: deploy-setup
	$(DEPLOY_VENV)/bin/monai-deploy package deploy -c deploy/app.yaml -t $(MAP_TAG) --platform x86_64 \
		--add bundle -m bundle/models

# The MOOD submission image (docker/Dockerfile), tested as the challenge's grader runs it: podman (Debian's package,
# as root) builds it on a base made locally with debootstrap (docker/make_base_image.sh; no registry is reachable
# here) with the CPU torch, then runs the four scripts read-only, without network, into output folders of root and
# of another uid, and checks the outputs against the native run scripts' (tools/docker_test.py).
DOCKER_TOOLS := podman runc debootstrap
docker-setup:
	@for tool in $(DOCKER_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "docker-test needs $(DOCKER_TOOLS): as root, apt-get install $(DOCKER_TOOLS)"; exit 1; fi; \
		echo "installing $(DOCKER_TOOLS) (Debian packages)"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DOCKER_TOOLS) >/dev/null; \
	fi

# DOCKER_TEST_ARGS=--no_build: test the image docker-image built (what CI does)
docker-test: setup docker-setup
	$(PY) -m tools.docker_test $(DOCKER_TEST_ARGS)

# the same image (localhost/mood-anomaly:test), built only
docker-image: setup docker-setup
	$(PY) -m tools.docker_test --build_only

clean:
	rm -rf outputs .pytest_cache .ruff_cache
