"""Shared fixtures: the real conf/, shrunk; a real sqlite MLflow store; one trained run.

Training is tiny here (2 epochs, a few hundred samples): the tests check behaviour, the
benchmarks in bench/ check speed, and `make run` checks the tutorial's accuracy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# What a project copy needs to run `dvc repro`: the pipeline, its config and its code.
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "conf",
    "src",
    ".dvc/config",
    ".dvc/plots",
    ".dvcignore",
    ".gitignore",
]

# Small enough to train in about a second, big enough for every stage to mean something.
TINY = [
    "data.n_samples=400",
    "data.n_test=100",
    "train.epochs=2",
    "train.batch_size=16",
    "train.grid_size=24",
    "evaluate.n_bootstrap=50",
]


@pytest.fixture(autouse=True)
def mlflow_tracking_uri_restored():
    """MLflow 3's set_tracking_uri keeps the URI in a module global and exports it as
    MLFLOW_TRACKING_URI: a test that tracks in-process would otherwise send every later test's
    clients and subprocesses (same xdist worker) to its own store."""
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    saved_global = utils._tracking_uri if utils else None
    yield
    if saved_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved_env
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils:
        utils._tracking_uri = saved_global


def tiny_overrides(*extra: str) -> list[str]:
    return [*TINY, *extra]


def compose_config(*overrides: str):
    """The real conf/ composed with overrides, as the Hydra app does, then validated."""
    from softmaxlab.core.config import compose, to_config

    return to_config(compose(list(overrides), with_schema=True))


def env_with_venv(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SOFTMAXLAB_DEBUG", None)
    env.update(extra)
    return env


def ctrl_c_reaches_it() -> None:
    """Popen's preexec_fn for a child the test interrupts: a shell that started the suite in
    the background (`make test &`) leaves SIGINT ignored, and the child would inherit that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cmd(args: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 600):
    proc = subprocess.run(
        args, cwd=cwd, env=env or env_with_venv(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def make_project(dest: Path, *overrides: str) -> Path:
    """A git + DVC project copied from this repo, params.yaml composed from conf/ with `overrides`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # Always composed from conf/: the workspace's params.yaml may hold an applied experiment.
    from softmaxlab.core.config import compose

    cwd = os.getcwd()
    try:
        os.chdir(dest)
        (dest / "params.yaml").write_text(OmegaConf.to_yaml(compose(list(overrides))))
    finally:
        os.chdir(cwd)
    env = env_with_venv()
    run_cmd(["git", "init", "-q", "-b", "main"], dest, env)
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest, env)
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"], dest, env)
    return dest


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tracking_uri):
    """One tiny in-process run of the whole pipeline, shared by the session's tests."""
    from softmaxlab.stages import pipeline
    from softmaxlab.tracking.tracker import connect

    cfg = compose_config(*tiny_overrides(f"tracking.uri={tracking_uri}"))
    root = tmp_path_factory.mktemp("run")
    tracker = connect(cfg)
    metrics = pipeline.run(cfg, root, tracker, run_name="session-fixture")
    return {"cfg": cfg, "root": root, "metrics": metrics, "tracker": tracker, "run_id": metrics["run_id"]}


@contextlib.contextmanager
def team_services(auth: bool = False):
    """The team's services (PostgreSQL, Ceph radosgw, MLflow server) started by the same code
    as `softmaxlab team up`, on free ports, in a fresh folder; everything it started is
    stopped (by PID) and its folder removed on the way out, even when a test fails."""
    import tempfile

    from softmaxlab.core.errors import UserError
    from softmaxlab.core.processes import free_port
    from softmaxlab.team import install, stack
    from softmaxlab.team.state import DEFAULT_PORTS

    missing = install.missing_programs()
    if missing and os.environ.get("CI") != "true":
        pytest.skip(f"team services need {', '.join(missing)} (Debian: {install.APT_PACKAGES})")
    # Not under pytest's 0700 temp root: PostgreSQL runs as user postgres, which must get in.
    state_dir = Path(tempfile.mkdtemp(prefix="softmaxlab-team-"))
    ports = {name: free_port() for name in DEFAULT_PORTS}
    try:
        try:
            state = stack.up(state_dir, ports=ports, auth=auth, say=lambda line: None)
        except UserError as err:
            raise AssertionError(f"team up failed: {err}") from err
        yield state
    finally:
        try:
            if (state_dir / "state.json").exists():
                stack.down(state_dir, say=lambda line: None)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def team_stack():
    """One team stack per test session (per xdist worker): a `softmaxlab.team.state.State` with
    `.env` (the variables of .team/env: MLFLOW_TRACKING_URI, AWS_*, SOFTMAXLAB_DVC_REMOTE,
    SOFTMAXLAB_OPTUNA_STORAGE), `.ports`, `.dir`, `.mlflow_url`, `.s3_url` and
    `.postgres_url(db)` (a SQLAlchemy URL for `mlflow`, `mlflow_auth` or `optuna`).
    `softmaxlab.team.users.configure_dvc(project, state.env)` points a project's DVC remote at it."""
    with team_services() as state:
        yield state
