"""The people on the team's servers: MLflow users and their permissions on experiments (the
basic-auth app, `team up --auth`), and a teammate's clone joining the DVC remote."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
from pathlib import Path

from softmaxlab.core.errors import UserError, first_line
from softmaxlab.core.processes import restored_env
from softmaxlab.team.services import run
from softmaxlab.team.state import ADMIN, DVC_REMOTE_NAME, State, write_private

PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


@contextlib.contextmanager
def _as_admin(state: State):
    """MLflow's basic-auth client, acting as the admin: MLflow's clients read credentials from
    MLFLOW_TRACKING_USERNAME/PASSWORD at each request, so they are set for this block only."""
    import warnings

    if not state.auth:
        raise UserError("the team's MLflow server runs without basic-auth: `softmaxlab team up --auth` first")
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    with restored_env(*names):
        os.environ.update(dict(zip(names, (ADMIN, state.secrets["admin_password"]), strict=True)))
        with warnings.catch_warnings():
            # MLflow's server package imports starlette.middleware.wsgi, which Starlette deprecates.
            warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")
            from mlflow.server import get_app_client

            client = get_app_client("basic-auth", tracking_uri=state.mlflow_url)
        yield client


def _auth_call(what: str, fn):
    from mlflow.exceptions import MlflowException

    try:
        return fn()
    except MlflowException as err:
        from softmaxlab.tracking.server import refusal

        if refusal(err) == 401:
            raise UserError(
                f"{what}: the server refused the admin's credentials (HTTP 401): the admin password "
                "is MLFLOW_AUTH_ADMIN_PASSWORD, or .team/secrets.json's admin_password"
            ) from None
        # MLflow's message, without the database error it may carry after " Error: ".
        raise UserError(f"{what}: {first_line(err).split(' Error: ')[0]}") from None


def add_user(state: State, name: str, password: str | None = None) -> str:
    """Create MLflow user `name` (password generated unless given); returns the password."""
    password = password or secrets.token_urlsafe(18)
    with _as_admin(state) as client:
        _auth_call(f"creating user {name!r}", lambda: client.create_user(username=name, password=password))
    return password


def write_user_env(state: State, name: str, password: str) -> Path:
    """.team/users/NAME.env (0600): the MLFLOW_TRACKING_* lines to hand to user `name`."""
    users = state.path("users")
    users.mkdir(mode=0o700, exist_ok=True)
    path = users / f"{name}.env"
    write_private(
        path,
        f"export MLFLOW_TRACKING_URI={state.mlflow_url}\n"
        f"export MLFLOW_TRACKING_USERNAME={name}\nexport MLFLOW_TRACKING_PASSWORD={password}\n",
    )
    return path


def grant(state: State, name: str, experiment: str, permission: str) -> None:
    """Give user `name` `permission` (READ, EDIT, MANAGE or NO_PERMISSIONS) on the experiment
    named `experiment`."""
    import mlflow

    permission = permission.upper()
    if permission not in PERMISSIONS:
        raise UserError(f"permission {permission!r} is not allowed: choose one of {', '.join(PERMISSIONS)}")
    with _as_admin(state) as client:
        exp = _auth_call(
            f"finding experiment {experiment!r}",
            lambda: mlflow.MlflowClient(state.mlflow_url).get_experiment_by_name(experiment),
        )
        if exp is None:
            raise UserError(f"no experiment named {experiment!r} on {state.mlflow_url}")

        def set_permission():
            args = (name, "experiment", exp.experiment_id)
            try:
                client.grant_user_permission(*args, permission)
            except Exception as err:  # a grant exists already: replace it
                if "already exists" not in str(err):
                    raise
                client.revoke_user_permission(*args)
                client.grant_user_permission(*args, permission)

        _auth_call(f"granting {permission} on {experiment!r} to {name!r}", set_permission)


def configure_dvc(project: Path, env: dict[str, str] | None = None) -> str:
    """This clone's default DVC remote: the team bucket at the S3 endpoint, in
    .dvc/config.local (git-ignored; no keys: DVC reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    from the environment)."""
    env = {**os.environ, **(env or {})}
    url, endpoint = env.get("SOFTMAXLAB_DVC_REMOTE"), env.get("AWS_ENDPOINT_URL")
    if not url or not endpoint:
        raise UserError(
            "SOFTMAXLAB_DVC_REMOTE and AWS_ENDPOINT_URL must be set: `source .team/env` "
            "(copied from the machine that runs `team up`) first"
        )
    if not (project / ".dvc").is_dir():
        raise UserError(f"{project} is not a DVC project (no .dvc/)")
    local = project / ".dvc" / "config.local"
    if local.is_file() and f"endpointurl = {endpoint}" in local.read_text() and url in local.read_text():
        return f"DVC remote {DVC_REMOTE_NAME!r} already set: {url} at {endpoint}"
    dvc = shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}") or "dvc"
    run([dvc, "remote", "add", "--local", "--default", "--force", DVC_REMOTE_NAME, url],
        "dvc remote add", cwd=project)  # fmt: skip
    run([dvc, "remote", "modify", "--local", DVC_REMOTE_NAME, "endpointurl", endpoint],
        "dvc remote modify", cwd=project)  # fmt: skip
    return f"DVC remote {DVC_REMOTE_NAME!r} (default, in .dvc/config.local): {url} at {endpoint}"
