# Two entry points on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: demo test lab notebooks benchmark clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The whole notebook series on the built-in fixture corpus; figures and metrics land in results/,
# executed copies of the notebooks in build/notebooks/ (the committed notebooks stay as they are).
demo: $(STAMP)
	VIT_PROGRESS=0 $(BIN)/jupyter nbconvert --to notebook --execute --output-dir build/notebooks $(NOTEBOOKS)

# Unit tests, then every notebook under nbval in strict mode (outputs must match the committed ones).
test: $(STAMP)
	$(BIN)/python -m pytest tests notebooks --nbval -v --durations=15

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

# Re-create the committed notebook outputs from a clean fixture run (after changing code or prose).
notebooks: $(STAMP)
	rm -rf data checkpoints
	$(BIN)/jupyter nbconvert --clear-output --inplace $(NOTEBOOKS)
	VIT_PROGRESS=0 WANDB_MODE=offline $(BIN)/jupyter nbconvert --to notebook --execute --inplace $(NOTEBOOKS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/preprocessing.py

clean:
	rm -rf data checkpoints build wandb
