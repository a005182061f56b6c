"""The team's MLflow tracking server on PostgreSQL, with proxied artifacts in
s3://softmaxlab-mlflow/mlflow (clients need only its URL), optionally behind MLflow's
basic-auth app (`team up --auth`). Its secrets reach it through its environment and files
under .team/ (0600), never its command line."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from softmaxlab.core.errors import UserError
from softmaxlab.core.private import write_private
from softmaxlab.core.probe import answers_ok
from softmaxlab.core.processes import stop_group
from softmaxlab.team.services import check_port_free, last_lines, running_pid, spawn, wait
from softmaxlab.team.state import ADMIN, HOST, MLFLOW_BUCKET, REGION, State, postgres_url

ARTIFACTS = f"s3://{MLFLOW_BUCKET}/mlflow"
# MLflow's fastapi app imports starlette.middleware.wsgi, which this Starlette deprecates.
HIDE_WARNINGS = "ignore:starlette.middleware.wsgi is deprecated"


def _auth_ini(state: State) -> Path:
    path = state.path("mlflow", "basic_auth.ini")
    path.parent.mkdir(exist_ok=True)
    # READ by default: everyone browses every experiment; writing to one needs EDIT, which its
    # creator has (MANAGE) and others get with `softmaxlab team grant`.
    write_private(
        path,
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {postgres_url(state, 'mlflow_auth')}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {state.secrets['admin_password']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    return path


def _server_env(state: State) -> dict[str, str]:
    keys = state.secrets["s3"]["mlflow"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        # The backend store reaches the server (and its uvicorn workers) through the
        # environment, so `ps` never shows the database password.
        MLFLOW_BACKEND_STORE_URI=postgres_url(state, "mlflow"),
        MLFLOW_S3_ENDPOINT_URL=state.s3_url,
        AWS_ENDPOINT_URL=state.s3_url,
        AWS_ACCESS_KEY_ID=keys["access_key"],
        AWS_SECRET_ACCESS_KEY=keys["secret_key"],
        AWS_DEFAULT_REGION=REGION,
        # Without this, the server also starts a job runner and huey consumers (15 processes, 2 GB).
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        PYTHONWARNINGS=HIDE_WARNINGS,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if state.auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_auth_ini(state))
        # The auth app's CSRF key: one for all workers, kept across restarts.
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = state.secrets["flask_secret_key"]
    return env


# What `mlflow db upgrade URL` runs, and the auth app's own migrations (`python -m
# mlflow.server.auth db upgrade --url URL`), with the URLs from the environment instead of argv.
MIGRATE = """
import os, sqlalchemy
from mlflow.db import upgrade
from mlflow.server.auth.db import utils as auth_db
upgrade.callback(os.environ["MLFLOW_BACKEND_STORE_URI"])
if os.environ.get("SOFTMAXLAB_AUTH_DB_URI"):
    engine = sqlalchemy.create_engine(os.environ["SOFTMAXLAB_AUTH_DB_URI"])
    auth_db.migrate(engine, "head")
    engine.dispose()
"""


def _migrate(state: State, env: dict[str, str]) -> None:
    """Deliberate schema migrations before the server starts (its workers would otherwise race
    to create an empty database's tables; MLflow pinned, so a version change is a deliberate
    act), logged to logs/migrate.log."""
    log = state.path("logs", "migrate.log")
    if state.auth:
        env = {**env, "SOFTMAXLAB_AUTH_DB_URI": postgres_url(state, "mlflow_auth")}
    with open(log, "ab") as out:
        proc = subprocess.run([sys.executable, "-c", MIGRATE], env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise UserError(
            f"migrating the MLflow databases failed (exit code {proc.returncode}): {last_lines(log)}"
        )


def _mode(state: State) -> str | None:
    with contextlib.suppress(OSError):
        return state.path("pids", "mlflow.mode").read_text().strip()
    return None


def start(state: State, restart: bool = False) -> str:
    """The server, unless it runs in the state's mode; `restart`: anew even then (new secrets)."""
    mode = "basic-auth" if state.auth else "open"
    pid = running_pid(state, "mlflow")
    if pid and _mode(state) == mode and not restart:
        return "already running"
    what = "started with basic-auth" if state.auth else "started"
    if pid:
        stop_group(pid)
        what = "restarted with basic-auth" if state.auth else "restarted without basic-auth (--no-auth)"
    check_port_free(state, "mlflow")
    env = _server_env(state)
    _migrate(state, env)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--host", HOST, "--port", str(state.ports["mlflow"]),
           "--workers", "2", "--artifacts-destination", ARTIFACTS]  # fmt: skip
    if state.auth:
        cmd += ["--app-name", "basic-auth"]
    proc = spawn(state, "mlflow", cmd, env)
    state.path("pids", "mlflow.mode").write_text(mode + "\n")
    wait("mlflow server", lambda: health(state), proc, state.path("logs", "mlflow.log"), 180)
    return what


def health(state: State) -> bool:
    return answers_ok(f"{state.mlflow_url}/health", timeout=3)
