# Entry points. `make demo` and `make test` work on a fresh clone: both install first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
SHARDS ?= shards
DATA_ROOT ?=
WORKERS ?= $(shell nproc)

.PHONY: install demo shards test test-fast bench learn-check finetune gpu-wheels clean

install: $(STAMP)

# torch/torchvision resolve to the builds on this machine's disk (see README); the `reference`
# extra installs cellpose 4.2.1.1, which the tests and benchmarks compare against.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,reference]'
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py --out $(DEMO_OUT)

# Every dataset folder under DATA_ROOT (named as `python -m shardgen --list` prints) into SHARDS;
# without DATA_ROOT, the embedded default (synthetic images). Then re-read and check them all.
shards: install
ifeq ($(strip $(DATA_ROOT)),)
	$(BIN)/python -m shardgen --dataset synthetic --out $(SHARDS) --workers $(WORKERS)
else
	$(BIN)/python -m shardgen --data-root $(DATA_ROOT) --out $(SHARDS) --workers $(WORKERS)
endif
	$(BIN)/python -m shardgen verify $(SHARDS)

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.bench_flows
	$(BIN)/python -m benchmarks.bench_masks
	$(BIN)/python -m benchmarks.bench_shardgen

# Issue 4's learning check: the tiny model trained on CPU on ../shared/data (Cellpose cyto, DSB
# nuclei) and synthetic images, then scored on held-out DSB images (goal AP@0.5 >= 0.6).
learn-check: install
	$(BIN)/python scripts/learn_check.py --out runs/learn_check

# Fine-tune on your annotated images (Cellpose layouts: _img/_masks, GUI _seg.npy, images/ +
# masks/) from Cellpose's cpsam, an export or a run folder; prints held-out AP@0.5 before and
# after. NPROC GPUs (or CPU processes); ARGS for more, e.g. ARGS="--minutes 60 loop.epochs=200".
OUT ?= finetune_out
NPROC ?= 1
finetune: install
ifeq ($(and $(strip $(DATA)),$(strip $(INIT))),)
	$(error usage: make finetune DATA=<folder of annotated images> INIT=<cpsam | model_cellpose.pt | run folder> [OUT=finetune_out] [NPROC=1] [ARGS=...])
endif
	$(BIN)/python scripts/finetune.py --data $(DATA) --init $(INIT) --out $(OUT) --nproc $(NPROC) $(ARGS)

# For benchmarks/gpu_check.py on a lent GPU machine: the dependencies its image lacks (it has
# torch, numpy, numba, pyarrow, tifffile, opencv and the rest), as wheels for its Python 3.12,
# into .whl/; cellpose (with natsort and fill-voids) is the reference bench_infer compares with.
# Versions as pinned in pyproject.toml (tests/benchmarks/test_gpu_check.py holds them equal).
GPU_WHEELS := segment-anything==1.0 webdataset==1.0.2 braceexpand==0.1.7 fastremap==1.21.0 \
              zstandard==0.25.0 imagecodecs==2026.3.6 roifile==2026.2.10 \
              cellpose==4.2.1.1 natsort==8.4.0 fill-voids==2.1.2
gpu-wheels: install
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any --dest .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(SHARDS) .pytest_cache .hypothesis
