# Two entry points on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: demo lint test test-portable lab notebooks benchmark demo-corpus demo-corpus-series demo-corpus-detection demo-corpus-cross-validation clean

# requirements-demo-corpus.txt is the demo corpus builder's (its tests run the real vocoders and TTS model).
$(STAMP): requirements.txt requirements-demo-corpus.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-demo-corpus.txt
	touch $@

# The whole notebook series on the built-in fixture corpus, written under build/: executed notebooks,
# figures, metrics, score files and checkpoints (the committed notebooks and results/ stay as they are).
demo: $(STAMP)
	VIT_PROGRESS=0 VIT_RESULTS_DIR=$(CURDIR)/build/results VIT_CHECKPOINT_DIR=$(CURDIR)/build/checkpoints \
	$(BIN)/jupyter nbconvert --to notebook --execute --output-dir build/notebooks $(NOTEBOOKS)

# The linter and the formatter's check (ruff, configured in pyproject.toml); `ruff format .` fixes the layout.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The linter, the unit tests, then every notebook under nbval in strict mode (outputs must match the
# committed ones).
test: lint
	$(BIN)/python -m pytest tests notebooks --nbval --nbval-sanitize-with nbval_sanitize.cfg -v --durations=15

# The notebooks again on another floating-point path (generic ATen kernels, oneDNN limited to SSE4.1, one
# thread): what nbval compares must not depend on the machine the committed outputs were made on.
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=1 \
	$(BIN)/python -m pytest notebooks --nbval --nbval-sanitize-with nbval_sanitize.cfg -v

# Jupyter refuses to start as root unless told to; containers and many cloud machines log in as root.
ALLOW_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks $(ALLOW_ROOT)

# Re-create the committed notebook outputs and results/ from a clean fixture run (after changing code or
# prose), on CPU in fp32 with two threads as the test session runs them (conftest.py).
notebooks: $(STAMP)
	rm -rf data/fixture_audio data/processed checkpoints/*.pth
	$(BIN)/jupyter nbconvert --clear-output --inplace $(NOTEBOOKS)
	VIT_PROGRESS=0 WANDB_MODE=offline VIT_DEVICE=cpu VIT_MIXED_PRECISION=off OMP_NUM_THREADS=2 $(BIN)/jupyter nbconvert --to notebook --execute --inplace $(NOTEBOOKS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/preprocessing.py

# Real vs synthetic speech from Debian packages (apt-get download, nothing installed), In-the-Wild layout.
DEMO_CORPUS ?= data/demo_corpus
demo-corpus: $(STAMP)
	$(BIN)/python -m vit_audio.demo_corpus --out $(DEMO_CORPUS)

# The notebook series on the demo corpus (after `make demo-corpus`): figures, metrics and score files in
# results/demo_corpus/, executed notebooks in build/demo_corpus/; notebook 04 trains three seeds.
demo-corpus-series: $(STAMP)
	VIT_PROGRESS=0 VIT_CORPUS=in_the_wild VIT_AUDIO_DIR=$(DEMO_CORPUS) VIT_CACHE_DIR=data/demo_processed \
	VIT_RESULTS_DIR=results/demo_corpus VIT_CHECKPOINT_DIR=checkpoints/demo_corpus VIT_EPOCHS=45 VIT_BATCH_SIZE=32 \
	VIT_SEEDS=42,43,44 VIT_GMM_COMPONENTS=64 \
	$(BIN)/jupyter nbconvert --to notebook --execute --output-dir build/demo_corpus $(NOTEBOOKS)

# File-level EER per kind of fake over three seeds, the LFCC-GMM baseline and the shortcut audit on the demo
# corpus: results/demo_corpus/detection.{json,md}.
demo-corpus-detection: $(STAMP)
	$(BIN)/python benchmarks/detection.py --corpus-dir $(DEMO_CORPUS) --gmm

# The demo corpus judged by five folds over its recorded persons (each fold's persons unseen in train and
# val), ViT_Small and the LFCC-GMM: results/demo_corpus/fourth_edition/cross_validation.{json,md}.
demo-corpus-cross-validation: $(STAMP)
	$(BIN)/python benchmarks/detection.py --corpus-dir $(DEMO_CORPUS) --models ViT_Small --gmm --seeds 42 \
		--folds 5 --out results/demo_corpus/fourth_edition --name cross_validation

clean:
	rm -rf data checkpoints build wandb
