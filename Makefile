# Two commands a new user needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?= config/smoke.yaml
CORES  ?= all
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench report clean-results

$(BIN)/dydiff-bench: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	# CPU torch first: an unpinned torch pulls several GB of CUDA wheels (README: GPU install).
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test,slurm]"
	touch $@

install: $(BIN)/dydiff-bench

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
