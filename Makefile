# Two commands on a fresh machine: `make run` (set up + default pipeline), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU wheel first so no requirement can pull a CUDA build; on a GPU cluster: make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
export OMP_NUM_THREADS ?= 2

.PHONY: setup run test dvc-repro readme-table clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: setup
	$(VENV)/bin/kd run

# a pytest worker per core, at most 4 (the end-to-end tests wait on subprocesses and servers); `pytest -n 0`: one process
test: setup
	$(VENV)/bin/pytest -n auto --maxprocesses 4 --dist worksteal

dvc-repro: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/dvc repro

# README's table from the default run's report (runs/default/reports/compare.json): after `make run`
readme-table: setup
	$(PY) -m kd_core.evaluation.readme_table runs/default README.md

clean:
	rm -rf runs mlflow.db mlartifacts .prefect
