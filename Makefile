# Two commands a new user needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?= config/smoke.yaml
CORES  ?= all
# Which torch build the venv holds: cpu (default), cu12 or cu13 (`make install-gpu`). The venv
# remembers it, so a later `make install` (after a lock change) keeps the build it has.
TORCH_BUILD ?= $(shell cat $(VENV)/.torch-build 2>/dev/null || echo cpu)
LOCKS    = requirements/pylock.cpu.toml requirements/pylock.cu13.toml
# Folders that may hold torch's +cpu wheel (PyPI has only CUDA builds for Linux): pip's own
# find-links when it has one; else PyTorch's CPU index (requirements/lock.py: TORCH_BUILDS).
TORCH_CPU_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
# LOCKED=0: resolve pyproject.toml's ranges instead of the lock (other platforms; not
# reproducible, and every result records what was installed).
LOCKED ?= 1
# uv makes the venv and installs the lock (pylock files: a uv preview feature); pip puts uv in a
# folder of its own inside $(VENV), outside the venv's packages, so syncing the lock leaves it be.
UV_VERSION = 0.13.9
UV       = $(VENV)/uv-$(UV_VERSION)/bin/uv
UV_PIP   = $(UV) pip --preview-features pylock
# uv, unlike pip, writes no .pyc unless asked; where PYTHONDONTWRITEBYTECODE is set (CI,
# containers) every job's process would then compile torch, mlflow, ... from source again
# (about 9 s a process: the smoke demo took 21 min instead of 12). uv reads this variable.
export UV_COMPILE_BYTECODE = 1
# install-gpu's build: auto (from the NVIDIA driver: README, Locked environment), cu12 or cu13.
CUDA    ?= auto

.PHONY: install install-gpu lock demo test bench report clean-results

$(UV):  # with $(PYTHON)'s pip, else (none, or an externally managed one) a bootstrap venv's
	$(PYTHON) -m pip install --quiet --target $(VENV)/uv-$(UV_VERSION) uv==$(UV_VERSION) 2>/dev/null || \
	  { $(PYTHON) -m venv $(VENV)/uv-boot && \
	    $(VENV)/uv-boot/bin/python -m pip install --quiet --target $(VENV)/uv-$(UV_VERSION) uv==$(UV_VERSION); }

$(BIN)/dydiff-bench: pyproject.toml $(LOCKS) requirements/lock.py
ifeq ($(LOCKED),1)
	@$(PYTHON) requirements/lock.py check $(TORCH_BUILD)
endif
	@$(MAKE) --no-print-directory $(UV)
	test -x $(BIN)/python || $(UV) venv --quiet --allow-existing --seed --python $(PYTHON) $(VENV)
ifeq ($(LOCKED),1)
	@# exactly the lock for this Python and platform (hashes checked), then torch where it is
	@# the one package outside the lock (Linux, cpu and cu12 builds), then this project. From
	@# uv's cache alone first (--offline: seconds, the same hashes checked), as uv would
	@# otherwise fetch every locked wheel again (an index's changed headers on revalidation).
	lock=requirements/$$($(PYTHON) requirements/lock.py lock-file $(TORCH_BUILD)); \
	  $(UV_PIP) sync --python $(BIN)/python --offline --quiet $$lock 2>/dev/null || \
	  $(UV_PIP) sync --python $(BIN)/python $$lock
	torch="$$($(PYTHON) requirements/lock.py torch $(TORCH_BUILD) $(TORCH_CPU_LINKS))"; \
	  test -z "$$torch" || $(UV_PIP) install --python $(BIN)/python $$torch
	$(UV_PIP) install --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(UV_PIP) check --python $(BIN)/python
else
	$(UV_PIP) install --python $(BIN)/python \
	  $$($(PYTHON) requirements/lock.py torch-unlocked $(TORCH_BUILD) $(TORCH_CPU_LINKS))
	$(UV_PIP) install --python $(BIN)/python -e ".[test,slurm]"
endif
	echo $(TORCH_BUILD) > $(VENV)/.torch-build
	touch $@

install: $(BIN)/dydiff-bench

# The same torch version as a CUDA build, into a new or existing venv: CUDA=auto picks it from the
# NVIDIA driver (nvidia-smi), CUDA=cu12 / cu13 names it.
install-gpu:
	build=$(CUDA); test "$$build" != auto || build=$$($(PYTHON) requirements/lock.py gpu-build) || exit 1; \
	  rm -f $(BIN)/dydiff-bench && $(MAKE) install TORCH_BUILD=$$build
	$(BIN)/python -c "import torch; print('torch', torch.__version__, '| CUDA build', torch.version.cuda, '| GPU visible:', torch.cuda.is_available())"

# Re-resolve the lock (requirements/pylock.*.toml) from pyproject.toml for every target of
# requirements/lock.py (needs PyPI, and TORCH_CPU_LINKS a folder with torch's +cpu wheel for
# its requirements). Every version the lock holds stays unless pyproject.toml excludes it or
# UPGRADE names its package (UPGRADE=all: every package). Commit what it writes.
UPGRADE ?=
lock:
	@$(MAKE) --no-print-directory $(UV)
	$(PYTHON) requirements/lock.py lock $(UV) $(TORCH_CPU_LINKS) \
	  $(if $(filter all,$(UPGRADE)),--upgrade,$(addprefix --upgrade-package=,$(UPGRADE)))

demo: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG)
	$(BIN)/snakemake --cores 1 --configfile $(CONFIG) --report results/report.html
	@$(BIN)/dydiff-bench where --configfile $(CONFIG)

test: install
	# pytest exits 5 when it collects no test: that is a failure here, not a pass.
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

bench: install
	$(BIN)/python -m pytest tests/benchmarks --benchmark-enable --benchmark-only

clean-results:
	rm -rf results/*/ results/*.html results/mlflow.db
