# Every target bootstraps .venv itself; `make quickstart` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
QUICKSTART_DIR := logs/quickstart/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: install quickstart train test lint tensorboard mlflow-ui clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

# Transfer learning on real data, offline: pretrain resnet18 on five Fashion-MNIST classes, then
# fine-tune it two-phase on the five others with 100 images per class; the same 100 images from
# scratch are the baseline. Then export the transfer model to ONNX (parity-gated) and predict a
# few test photos through the exported file.
quickstart: install
	$(PY) train.py experiment=fmnist_source hydra.run.dir=$(QUICKSTART_DIR)/source
	$(PY) train.py experiment=fmnist_transfer hydra.run.dir=$(QUICKSTART_DIR)/transfer \
		source_checkpoint=$(QUICKSTART_DIR)/source/checkpoints/best.ckpt
	$(PY) train.py experiment=fmnist_transfer hydra.run.dir=$(QUICKSTART_DIR)/scratch \
		model.weights=null finetune=full finetune.backbone_lr_ratio=1.0
	$(PY) scripts/compare_runs.py $(QUICKSTART_DIR)/transfer $(QUICKSTART_DIR)/scratch
	$(PY) export.py ckpt_path=$(QUICKSTART_DIR)/transfer/checkpoints/best.ckpt format=onnx \
		hydra.run.dir=$(QUICKSTART_DIR)/export
	$(PY) scripts/write_samples.py $(QUICKSTART_DIR)/samples --per-class 1 \
		--classes Dress Coat Sandal Shirt "Ankle boot"
	$(PY) predict.py model_path=$(QUICKSTART_DIR)/transfer/model.onnx \
		inputs=$(QUICKSTART_DIR)/samples hydra.run.dir=$(QUICKSTART_DIR)/predict
	$(PY) scripts/show_predictions.py $(QUICKSTART_DIR)/predict/predictions.csv
	@echo "The transfer model's evaluation report: $(QUICKSTART_DIR)/transfer/report.html"

# make train ARGS="model=mobilenet_v3_large data=cifar10"
train: install
	$(PY) train.py $(ARGS)

# Two workers, each test file on one of them (its module fixtures built once), one thread each.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

lint: install
	$(VENV)/bin/ruff check src tests scripts train.py eval.py predict.py export.py serve.py fit_reject.py

tensorboard: install
	$(VENV)/bin/tensorboard --logdir logs

# The MLflow UI over logger=mlflow's store, from its own venv (the full mlflow package).
mlflow-ui:
	test -x .venv-mlflow/bin/mlflow || ($(PYTHON) -m venv .venv-mlflow && \
		.venv-mlflow/bin/pip install -q "mlflow>=3")
	.venv-mlflow/bin/mlflow ui --backend-store-uri sqlite:///logs/mlflow.db

clean:
	rm -rf logs multirun outputs .pytest_cache .ruff_cache .venv-mlflow
