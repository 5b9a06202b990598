# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml
DATA   ?=
# A real WHU-OHS copy: make run DATA=/data/WHU-OHS CONFIG=configs/base.yaml
RUN_ARGS := $(if $(DATA),data.source=$(abspath $(DATA)))

.PHONY: help install run test test-slow test-images lint bench bench-ingest bench-train bench-gpu bench-loader images images-local push-images tools pipeline submit clean
KFP_HOST   ?=
EXPERIMENT ?= hsissl
# IMAGE_REGISTRY and IMAGE_TAG: the one setting compile and CI read (make images IMAGE_TAG=dev ...)
include pipelines/images.env
IMAGE_ARGS := --image-registry $(IMAGE_REGISTRY) --image-tag $(IMAGE_TAG)
export IMAGE_REGISTRY IMAGE_TAG

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv with pinned dependencies

run: $(STAMP)  ## run the whole pipeline locally (kfp.local) on the generated dataset (or DATA=<WHU-OHS folder>)
	$(VENV)/bin/hsissl-pipeline run-local --config $(CONFIG) $(RUN_ARGS)

pipeline: $(STAMP)  ## compile the Kubeflow pipeline to pipelines/hsissl.yaml (review the diff)
	$(VENV)/bin/hsissl-pipeline compile

submit: $(STAMP)  ## submit to Kubeflow: make submit KFP_HOST=http://<kfp api> [EXPERIMENT=hsissl]
	@test -n "$(KFP_HOST)" || { echo "set KFP_HOST, e.g. make submit KFP_HOST=http://localhost:8080"; exit 2; }
	$(VENV)/bin/hsissl-pipeline submit --host $(KFP_HOST) --experiment $(EXPERIMENT) $(IMAGE_ARGS)

test: $(STAMP)  ## run the test suite (CPU, tiny presets)
	$(VENV)/bin/ruff check src tests components pipelines scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q

test-images: $(STAMP)  ## build both images here (buildah, LOCAL=1) and run ingest + report inside as uid 10001
	@command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || { \
	  echo "test-images: installing buildah and mmdebstrap (Debian packages)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah mmdebstrap; }
	$(VENV)/bin/pytest -q -m images tests/test_images.py

test-slow: $(STAMP)  ## the slow tests: S3 killed at counted operations of a re-ingest and a pretraining, 10 concurrent-ingest trials (~10 min)
	$(VENV)/bin/pytest -q -s -m slow

lint: $(STAMP)  ## ruff lint + format check + import contracts (.importlinter)
	$(VENV)/bin/ruff check src tests components pipelines scripts
	$(VENV)/bin/ruff format --check src tests components pipelines scripts
	$(VENV)/bin/lint-imports

bench: bench-ingest bench-loader bench-train  ## all benchmarks (figures: docs/benchmarks.md)

bench-ingest: $(STAMP)  ## ingest throughput vs raw rasterio reads of the same files
	$(PY) scripts/bench_ingest.py

bench-loader: $(STAMP)  ## random-tile throughput of the shard loader
	$(PY) scripts/bench_loader.py

BENCH_ARGS ?=
bench-train: $(STAMP)  ## pretraining img/s, MFU, peak memory per method (base models on CUDA); BENCH_ARGS="--quick ..."
	$(PY) scripts/bench_train.py $(BENCH_ARGS)

bench-real-baseline: $(STAMP)  ## evaluate-real's DeepLabV3+ step on the CPU, fp32 vs bf16 autocast
	$(PY) scripts/bench_real_baseline.py

bench-gpu:  ## the GPU pretraining bench in one command, no venv needed (scripts/gpu_bench.sh; results in OUT, default runs/bench-gpu/)
	bash scripts/gpu_bench.sh

images:  ## build both images (docker, podman or buildah): $(IMAGE_REGISTRY)/hsissl-{cpu,train}:$(IMAGE_TAG) and :<git SHA>
	bash scripts/images.sh build

images-local:  ## the same without a registry: Debian base made with mmdebstrap, this machine's pip config (buildah/podman)
	LOCAL=1 bash scripts/images.sh build

push-images:  ## push what make images built (both tags)
	bash scripts/images.sh push

tools:  ## install helm and kubectl into .tools/bin (chart tests, docs/deploy.md)
	bash scripts/install_tools.sh

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs .pytest_cache
