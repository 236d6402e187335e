# Fine-grained image classification with fastai. `make` prepares Stanford Cars; see README.md.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
DATASET     ?= cars
DATA_DIR    ?= data
SOURCE      ?=
RESIZE      ?=
SKIP_BAD    ?=
DEMO_DIR    ?= demo
DATASET_DIR_cars     := stanford_cars
DATASET_DIR_aircraft := fgvc_aircraft
DATASET_DIR_cub      := cub_200_2011

.PHONY: data install trackers demo test quick lint reproduce clean
.DEFAULT_GOAL := data

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

# Optional experiment trackers for run.py --tracker tensorboard|wandb|mlflow (pinned packages never move)
trackers: $(VENV)/.trackers

$(VENV)/.trackers: requirements-trackers.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-trackers.txt -c requirements.txt
	touch $@

# Download (or, with SOURCE=path, import) the dataset into $(DATA_DIR)/<dataset>/{train,test}.csv;
# with RESIZE=320 also a copy shrunk once for fast GPU training, which `make reproduce RESIZE=320` trains on;
# with SKIP_BAD=1 unreadable images are left out (each named) instead of stopping
data: install
	$(PY) data.py --dataset $(DATASET) --root $(DATA_DIR) $(if $(SOURCE),--source $(SOURCE)) $(if $(RESIZE),--resize $(RESIZE)) $(if $(filter 1,$(SKIP_BAD)),--skip-bad)

# The published recipe: ResNeXt50, 20 frozen + 40 unfrozen epochs at 224 px, 40 at 299 px, then the test set
reproduce: data
	$(PY) run.py --data $(DATA_DIR)/$(DATASET_DIR_$(DATASET))$(if $(RESIZE),/resized_$(RESIZE)) --out runs/$(DATASET)_resnext50

# A small generated fine-grained set, the same three-stage recipe scaled down, on the CPU in a few minutes
demo: install
	rm -rf $(DEMO_DIR)
	$(PY) tools/synth.py --out $(DEMO_DIR)/source --classes 6 --train-per-class 60 --test-per-class 25
	$(PY) data.py --dataset cars --root $(DEMO_DIR)/data --source $(DEMO_DIR)/source
	$(PY) lr_find.py --data $(DEMO_DIR)/data/stanford_cars --arch resnet18 --no-pretrained --sizes 64,96 --bs 16,16 --num-it 40 --out $(DEMO_DIR)/run
	$(PY) run.py --data $(DEMO_DIR)/data/stanford_cars --arch resnet18 --no-pretrained \
	    --epochs 1,6,2 --sizes 64,96 --bs 16,16 --out $(DEMO_DIR)/run
	$(PY) test.py --model $(DEMO_DIR)/run --folder $(DEMO_DIR)/source/cars_test \
	    --csv $(DEMO_DIR)/source/cars_test_labels.csv --label-col 5 --heatmaps 4 --top-losses 8 \
	    --out $(DEMO_DIR)/run/holdout_predictions.csv
	@echo "plots and predictions: $(DEMO_DIR)/run (loss_plot_frozen.png, augmented_batch.png: what the model sees, training_curves.png, holdout_predictions*.{csv,png})"
	@echo "open the reports: $(DEMO_DIR)/run/report.html (the run), $(DEMO_DIR)/run/holdout_predictions_report.html (heatmaps, worst classes)"

# Everything CI runs: the layering contract (pyproject.toml), then the whole suite
test: lint install trackers
	$(PY) -m pytest

# The inner loop: the suite without the end-to-end and subprocess tests (marked slow)
quick: install
	$(PY) -m pytest -m "not slow"

# Layers point one way (finegrained/__init__.py): import-linter fails the build on an import that points up
lint: install
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
