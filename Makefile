# Two commands a new user needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?= config/smoke.yaml
CORES  ?= all
# Which torch build the venv holds: cpu (default) or cuda (`make install-gpu`). The venv
# remembers it, so a later `make install` (after a lock change) keeps the build it has.
TORCH_BUILD ?= $(shell cat $(VENV)/.torch-build 2>/dev/null || echo cpu)
LOCK     = requirements/$(TORCH_BUILD).txt
# Where pip finds the +cpu torch wheel of requirements/cpu.txt (PyPI has only the CUDA build).
TORCH_CPU_LINKS ?= https://download.pytorch.org/whl/cpu/torch/
# LOCKED=0: resolve pyproject.toml's ranges instead of the lock (other platforms; not
# reproducible, and every result records what was installed).
LOCKED ?= 1
UV_VERSION = 0.13.9

.PHONY: install install-gpu lock demo test bench report clean-results

$(BIN)/dydiff-bench: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
ifeq ($(LOCKED),1)
	@# The locks are resolved for CPython 3.11 on Linux x86_64 (README: Locked environment).
	@$(BIN)/python -c "import platform, sys; ok = sys.platform == 'linux' and platform.machine() == 'x86_64' and sys.version_info[:2] == (3, 11); sys.exit(0 if ok else 'the locks in requirements/ are for CPython 3.11 on Linux x86_64, this is Python ' + platform.python_version() + ' on ' + sys.platform + ' ' + platform.machine() + ': run \"make lock\" here, or \"make install LOCKED=0\" (unlocked)')"
	@# torch first, alone: only its lookup needs TORCH_CPU_LINKS (the lock's torch entry, hashes included)
	sed -n '/^torch==/,/^    # via/p' $(LOCK) > $(VENV)/torch-lock.txt
	$(BIN)/python -m pip install --quiet --retries 1 --no-deps --require-hashes --find-links $(TORCH_CPU_LINKS) -r $(VENV)/torch-lock.txt
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
else
	$(BIN)/python -m pip install --quiet --retries 1 --find-links $(TORCH_CPU_LINKS) -r requirements/torch-$(TORCH_BUILD).in
	$(BIN)/python -m pip install --quiet -e ".[test,slurm]"
endif
	echo $(TORCH_BUILD) > $(VENV)/.torch-build
	touch $@

install: $(BIN)/dydiff-bench

# The same torch version as a CUDA build (requirements/cuda.txt), into a new or existing venv.
install-gpu:
	test ! -x $(BIN)/python || $(BIN)/python -m pip uninstall --quiet --yes torch
	rm -f $(BIN)/dydiff-bench
	$(MAKE) install TORCH_BUILD=cuda
	$(BIN)/python -c "import torch; print('torch', torch.__version__, '| CUDA build', torch.version.cuda, '| GPU visible:', torch.cuda.is_available())"

# Re-resolve both locks from pyproject.toml and requirements/torch-*.in (needs the package
# index; TORCH_CPU_LINKS must reach the +cpu wheel). Commit the two files it writes.
lock: install
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra test --extra slurm --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
	  --override requirements/torch-cpu.in --find-links $(TORCH_CPU_LINKS) --quiet -o requirements/cpu.txt
	$(BIN)/uv pip compile pyproject.toml --extra test --extra slurm --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
	  --override requirements/torch-cuda.in --quiet -o requirements/cuda.txt

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
