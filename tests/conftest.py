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
import threading
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


class Lines:
    """A process's output read line by line as it comes, in a thread: a pipe, or a
    pseudo-terminal's side (which ends with an OSError once the process has gone)."""

    def __init__(self, stream):
        self.lines, self.ended, self.changed = [], False, threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        with contextlib.suppress(OSError):
            for line in stream:
                with self.changed:
                    self.lines.append(line)
                    self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        """Until a line holds `text` (True), or the stream ends or `timeout` passes (False)."""
        with self.changed:
            self.changed.wait_for(lambda: self.ended or any(text in line for line in self.lines), timeout)
            return any(text in line for line in self.lines)

    def text(self) -> str:
        self.thread.join(timeout=60)
        return "".join(self.lines)


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


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a project (git, DVC cache, outputs, mlflow.db): a test changes its copy."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def ran_project(tmp_path_factory):
    """A project (tiny settings) whose pipeline `dvc repro` ran once, its outputs and dvc.lock
    committed: (the project, the repro's CompletedProcess). Shared by the session's tests (one
    per xdist worker): a test that changes a project changes a `copy_project` of it."""
    project = make_project(tmp_path_factory.mktemp("ran") / "proj", *tiny_overrides())
    first = run_cmd(["dvc", "repro"], project)
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "outputs"], project)
    return project, first


# What the tests of a mark import (`make test-all` installs it): without it they are skipped.
EXTRAS = {"jax": ["jax"], "team": ["psycopg2", "boto3"], "cluster": ["ray", "submitit"]}


def pytest_runtest_setup(item):
    import importlib.util

    for mark, modules in EXTRAS.items():
        if item.get_closest_marker(mark) and not all(importlib.util.find_spec(m) for m in modules):
            pytest.skip(f"the {mark} extra is not installed (make setup-{mark})")


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


# The xdist group of the team tests that stop a service, restart the stack or switch its auth:
# they run on one worker, one after another, on a stack of their own (`team_stack` and
# `auth_stack` give it to them); every other team test shares the session's one stack.
OWN_TEAM_STACK = "team-own-stack"
TEAM_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def start_team_services(auth: bool):
    """The team's services (PostgreSQL, Ceph radosgw, MLflow server) started by the same code
    as `softmaxlab team up`, on free ports, in a fresh folder: their `State`. Anything started
    before a failure is stopped again."""
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
        return stack.up(state_dir, ports=ports, auth=auth, say=lambda line: None)
    except BaseException as err:
        stop_team_services(state_dir)
        if isinstance(err, UserError):
            raise AssertionError(f"team up failed: {err}") from err
        raise


def stop_team_services(state_dir: Path) -> None:
    """Everything the stack in `state_dir` started, stopped by PID (`softmaxlab team down`'s
    code); then its folder removed, and PostgreSQL's (postgres.remove_data)."""
    from softmaxlab.team import postgres, stack
    from softmaxlab.team.state import load

    try:
        if (state_dir / "state.json").exists():
            stack.down(state_dir, say=lambda line: None)
    finally:
        if (state_dir / "state.json").exists():  # as root PostgreSQL's files are outside it
            postgres.remove_data(load(state_dir))
        shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def team_services(auth: bool = False):
    """A team stack of its own for a block; stopped (by PID) and its folder removed on the way
    out, even when a test fails."""
    state = start_team_services(auth)
    try:
        yield state
    finally:
        stop_team_services(state.dir)


@pytest.fixture(scope="session")
def shared_team_stack(tmp_path_factory):
    """The one team stack (basic-auth on) that the session's team tests share, xdist workers
    included: the first worker to need it starts it, the last to finish stops it. The workers
    meet in the session's temporary root (each worker's basetemp is a folder in it), where
    team-stack.json, under team-stack.lock, names the stack's folder and counts its users, and
    team-stack.log says who started, joined, left and stopped it (with the services' PIDs)."""
    import json

    from filelock import FileLock

    from softmaxlab.team.services import running_pid
    from softmaxlab.team.state import SERVICES, load

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    meet = base.parent if worker else base  # without xdist the parent is every session's
    record, lock, log = meet / "team-stack.json", FileLock(meet / "team-stack.lock"), meet / "team-stack.log"

    def note(what: str, state) -> None:
        pids = {name: running_pid(state, name) for name in SERVICES}
        with log.open("a") as f:
            f.write(f"{worker or 'main'} {what} {state.dir} pids {pids}\n")

    with lock.acquire(timeout=900):  # a start takes a minute or two on a loaded machine
        shared = json.loads(record.read_text()) if record.exists() else None
        if shared is None:
            state = start_team_services(auth=True)
            shared = {"dir": str(state.dir), "users": 0}
            note("started", state)
        else:
            state = load(Path(shared["dir"]))
            note("joined", state)
        shared["users"] += 1
        record.write_text(json.dumps(shared))
    try:
        yield state
    finally:
        with lock.acquire(timeout=900):
            shared = json.loads(record.read_text())
            shared["users"] -= 1
            if shared["users"]:
                record.write_text(json.dumps(shared))
                note("left", state)
            else:
                note("stopping", state)
                record.unlink()
                stop_team_services(state.dir)


@pytest.fixture(scope="session")
def own_team_stack():
    """The stack (basic-auth on) of the tests in the xdist group OWN_TEAM_STACK: they stop
    its services and start them again."""
    with team_services(auth=True) as state:
        yield state


def _team_stack_for(request):
    group = request.node.get_closest_marker("xdist_group")
    own = group is not None and OWN_TEAM_STACK in (*group.args, *group.kwargs.values())
    return request.getfixturevalue("own_team_stack" if own else "shared_team_stack")


@pytest.fixture
def team_stack(request, monkeypatch):
    """The team stack for one test: a `softmaxlab.team.stack.State` with `.env` (the variables
    of .team/env: MLFLOW_TRACKING_URI and the admin's MLFLOW_TRACKING_USERNAME/PASSWORD, the
    `team` S3 user's AWS_* keys, SOFTMAXLAB_DVC_REMOTE, SOFTMAXLAB_OPTUNA_STORAGE as the `team`
    role), `.ports`, `.dir`, `.mlflow_url`, `.s3_url` and `.postgres_url(db)` (the owner's
    SQLAlchemy URL for `mlflow`, `mlflow_auth` or `optuna`: what the server holds, no teammate). The admin's login is in this test's environment, as `source .team/env` puts it
    in a teammate's shell: the test's MLflow clients and the commands it runs log in.
    `softmaxlab.team.stack.configure_dvc(project, state.env)` points a project's DVC remote at it.
    The session's shared stack, or for the xdist group OWN_TEAM_STACK a stack of its own."""
    state = _team_stack_for(request)
    for name in TEAM_LOGIN:
        monkeypatch.setenv(name, state.env[name])
    return state


@pytest.fixture
def auth_stack(request, monkeypatch):
    """The same stack as `team_stack` with no login in the environment: the basic-auth tests
    say who they are themselves."""
    for name in TEAM_LOGIN:
        monkeypatch.delenv(name, raising=False)
    return _team_stack_for(request)
