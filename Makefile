# Two commands a new user types: `make demo` (a real sweep on the embedded default) and `make test`.
# Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 2

.PHONY: demo demo-train test test-fast test-all faults lint bench screenshots install clean

$(BIN)/kdtune: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,dashboard]'
	touch $(BIN)/kdtune

install: $(BIN)/kdtune

demo: $(BIN)/kdtune
	$(BIN)/kdtune sweep sweeps/digits.yaml

# The engine alone: a teacher, a KD student and its CE-trained twin on digits.
demo-train: $(BIN)/kdtune
	$(BIN)/kdtune train data=digits model=resnet8x4 method=ce epochs=30 seed=0 out=runs/teacher overwrite=true --no-progress
	$(BIN)/kdtune train data=digits model=resnet8 method=ce epochs=30 seed=0 out=runs/ce overwrite=true --no-progress
	$(BIN)/kdtune train data=digits model=resnet8 teacher=runs/teacher method=kd epochs=30 seed=0 out=runs/kd overwrite=true --no-progress

test: $(BIN)/kdtune
	$(BIN)/python -m pytest

# The quick loop while editing: no long integration test (slow, gpu, faults, cluster); a few minutes on 2 cores.
test-fast: $(BIN)/kdtune
	$(BIN)/python -m pytest -m "not slow and not gpu and not faults and not cluster and not browser"

# The fault-injection suite alone (killed drivers and workers, damaged files, two drivers, a CPU hog), with
# its figures; KDTUNE_FAULT_SEED=<seed> replays the kill moments of a failed run.
faults: $(BIN)/kdtune
	$(BIN)/python -m pytest -m faults tests/faults -s

test-all: $(BIN)/kdtune
	$(BIN)/python -m pytest -m "not gpu"

lint: $(BIN)/kdtune
	$(BIN)/ruff check kdtune tests search_spaces launch

bench: $(BIN)/kdtune
	$(BIN)/kdtune bench --batch 64 512

# The demo experiment as a person sees it: MLflow's runs table, a trial's charts, the parent run and
# optuna-dashboard, opened by `kdtune dashboard` in headless Chromium (.ci/setup-chromium.sh), into docs/screenshots.
screenshots: demo
	$(BIN)/python -m tests.browser runs/sweeps/digits-demo docs/screenshots

clean:
	rm -rf $(VENV) runs kdtune-experiments
