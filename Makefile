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

.PHONY: install run test suite clean-checkpoints

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[train,dev]'
	touch $@

run: install
	dvc repro
	@echo
	@echo "Results:"
	@echo "  metrics      metrics/<task>/metrics.json   (dvc metrics show)"
	@echo "  plots        metrics/<task>/plots, metrics/<task>/train   (dvc plots show)"
	@echo "  validation   metrics/<task>/validation.json, metrics/<task>/datadocs/index.html"
	@echo "  models       models/<task>/model.onnx + model.json (model card)"
	@echo "  predictions  data/predictions/<task>.csv"
	@dvc metrics show

test: install
	python -m pytest

# (Re)create the Great Expectations suite for TASK from its training split.
suite: install
	python -m stages.validate $(TASK) --new-suite

clean-checkpoints:
	rm -rf models/*/checkpoints
