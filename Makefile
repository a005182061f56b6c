# Two commands for a fresh machine with Python 3.11: `make run` and `make test`
# (`make test-all`, CI's suite, wants more: see it below).
# Every target sets up .venv from the pinned versions in requirements.lock first (once).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
JAX_STAMP := $(VENV)/.installed-jax
TEAM_STAMP := $(VENV)/.installed-team
CLUSTER_STAMP := $(VENV)/.installed-cluster
# Stage commands are `python -m softmaxlab...`: run them with the venv's python.
export PATH := $(BIN):$(PATH)

.PHONY: setup setup-gpu setup-jax setup-team setup-cluster gpu-wheels gpu-check run test test-all bench bench-serve lint params ui serve team-install team-up team-down team-status team-join lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing the versions pinned in requirements.lock into .venv: about 150 packages,"
	@echo "       1.5 GB (TensorFlow, MLflow, DVC, ...); 2-4 minutes the first time, seconds after that"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@tools/pip_install.sh $(BIN)/python -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

## setup-gpu: TensorFlow with CUDA libraries (Linux, NVIDIA GPU); then train.device=auto|gpu
setup-gpu: setup
	@echo "setup-gpu: TensorFlow's CUDA libraries (several GB; minutes)"
	@tools/pip_install.sh $(BIN)/python -c requirements.lock -e '.[gpu,dev]'

## setup-jax: the JAX backend (train.backend=jax), pinned in requirements.lock
setup-jax: $(JAX_STAMP)

$(JAX_STAMP): $(STAMP)
	@echo "setup-jax: installing the jax extra (jax, jaxlib: about 100 MB, under a minute)"
	@tools/pip_install.sh $(BIN)/python -c requirements.lock -e '.[jax,dev]'
	@touch $(JAX_STAMP)

## setup-team: the team extra (PostgreSQL driver, DVC's S3 remote, boto3, MLflow's basic-auth app)
setup-team: $(TEAM_STAMP)

$(TEAM_STAMP): $(STAMP)
	@echo "setup-team: installing the team extra (psycopg2, dvc-s3, boto3, Flask-WTF: about 30 MB, under a minute)"
	@tools/pip_install.sh $(BIN)/python -c requirements.lock -e '.[team,dev]'
	@touch $(TEAM_STAMP)

## setup-cluster: Hydra's Ray and submitit launchers (Ray is a 240 MB wheel: a minute or two)
setup-cluster: $(CLUSTER_STAMP)

$(CLUSTER_STAMP): $(STAMP)
	@echo "setup-cluster: installing the cluster extra (ray, hydra-ray-launcher, hydra-submitit-launcher: about 300 MB)"
	@tools/pip_install.sh $(BIN)/python -c requirements.lock -e '.[cluster,dev]'
	@touch $(CLUSTER_STAMP)

## gpu-wheels: the few wheels (Keras, Hydra, ~11 MB) a borrowed GPU machine with Python 3.12
## and JAX but no network lacks, for bench/gpu_check.sh (bench/README.md)
gpu-wheels: setup
	rm -rf bench/gpu_wheels && mkdir -p bench/gpu_wheels
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d bench/gpu_wheels \
	  $$(grep -E '^(keras|absl-py|rich|markdown-it-py|mdurl|Pygments|namex|h5py|optree|hydra-core|omegaconf|PyYAML)==' requirements.lock)
	$(BIN)/python -m pip wheel --quiet --no-deps -w bench/gpu_wheels $$(grep -E '^antlr4-python3-runtime==' requirements.lock)

## gpu-check: bench/gpu_check.sh here (the GPU rows are skipped on a machine without one)
gpu-check: setup-jax
	PYTHON=$(BIN)/python bench/gpu_check.sh

## run: the whole pipeline (dvc repro); a second run says it is up to date
run: setup
	dvc repro
	@$(BIN)/python -m softmaxlab.tracking.where
	@git diff --quiet HEAD -- dvc.lock 2>/dev/null || echo "note: dvc.lock changed: this run's model.keras, \
	reports/train.json and report.html always differ from the committed run's (save time, MLflow run id), \
	and other CPUs can change predictions in the last bits; commit dvc.lock to record this run \
	(docs/reproducibility.md)"

## test: the fast tier, what to run before a commit (at most 5 minutes on 2 cores): every stage,
## config validation, the calibration maths, one real `dvc repro` in a temporary repo, one
## sweep, the served model and the CLI's one-line errors. The base install only (no extras),
## no root, no Debian packages. One worker per core: most of it is subprocesses starting
## Python, which one core leaves idle half the time.
FAST := not slow and not team and not cluster and not browser and not jax
test: setup
	$(BIN)/python -m pytest -n auto --dist loadgroup -m "$(FAST)" --durations=15

## test-all: everything, as CI runs it (.ci/run): the fast tier, the slow paths, the JAX backend,
## the team stack (PostgreSQL, Ceph, the MLflow server), Ray, SLURM and the browser. Installs the
## jax, team and cluster extras; the servers, clusters and browser need root and Debian packages
## (.ci/run installs them; elsewhere their tests are skipped). The team tests share one stack;
## those that stop its services have their own (an xdist group, hence --dist loadgroup).
test-all: setup-jax setup-team setup-cluster
	$(BIN)/python -m pytest -n auto --dist loadgroup --durations=15

## bench: speed against the tutorial's own script (bench/README.md)
bench: setup
	$(BIN)/python bench/run.py

## bench-serve: the served champion against the raw TF-flavour model (bench/README.md)
bench-serve: setup
	$(BIN)/python bench/serve.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## params: recompose params.yaml from conf/ (DVC does this itself on `dvc exp run`)
params: setup
	$(BIN)/python -m softmaxlab.core.config

## ui: MLflow's UI on http://127.0.0.1:5000 (local only); prints the runs table's link once it answers
ui: setup
	@$(BIN)/python -m softmaxlab ui

## serve: the registered model's champion (`softmaxlab promote` picks it) on
## http://127.0.0.1:$(PORT)/invocations, against the project's tracking store; `make serve PORT=5002`
PORT ?= 5001
serve: setup
	$(BIN)/python -m softmaxlab serve --port $(PORT)

## team-install: as root, Debian's PostgreSQL and Ceph packages (apt-get); `team-up` installs nothing
team-install: setup
	@$(BIN)/python -m softmaxlab.team.install

## team-up: PostgreSQL, Ceph radosgw (S3) and the MLflow server on 127.0.0.1, state in .team/
## (docs/team.md); `make team-up AUTH=1` puts MLflow's basic-auth app in front (kept until AUTH=0)
team-up: setup-team
	@$(BIN)/python -m softmaxlab team up $(if $(filter 1,$(AUTH)),--auth,$(if $(filter 0,$(AUTH)),--no-auth))

## team-down: stop them (by PID; the data stays in .team/)
team-down: setup-team
	@$(BIN)/python -m softmaxlab team down

## team-status: each service, its URL, whether it answers, its memory
team-status: setup-team
	@$(BIN)/python -m softmaxlab team status

## team-join: a teammate's clone: its DVC remote from the sourced .team/env (docs/team.md)
team-join: setup-team
	@$(BIN)/python -m softmaxlab team join

## lock: re-pin every dependency to what is installed now
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	rm -rf data models predictions reports outputs dvc_plots
