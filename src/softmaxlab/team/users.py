"""The people on the team's servers (`team up --auth`): each teammate's MLflow user (the
basic-auth app) with their permissions on experiments, their own S3 user (the DVC bucket's
policy lets it read, or read and write) and, at EDIT, their own database role (the `optuna`
database only), all in one join file they source; and a teammate's clone joining the DVC
remote."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
from pathlib import Path

from softmaxlab.core.errors import UserError, first_line
from softmaxlab.core.processes import restored_env
from softmaxlab.team import ceph, postgres
from softmaxlab.team.services import run
from softmaxlab.team.state import (
    ADMIN,
    DVC_REMOTE_NAME,
    LEVELS,
    State,
    check_name,
    load,
    locked,
    user_role,
    write_env_file,
)

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


def set_admin_password(state: State, password: str) -> str:
    """The MLflow admin's password changed on the server (MLflow keeps its own); returns it."""
    with _as_admin(state) as client:
        _auth_call(
            "changing the admin's password",
            lambda: client.update_user_password(
                ADMIN, password, current_password=state.secrets["admin_password"]
            ),
        )
    return password


def join_file(state: State, name: str) -> Path:
    return state.path("users", f"{name}.env")


def add_user(state: State, name: str, level: str = "EDIT") -> Path:
    """Teammate `name` at `level` (READ: reads runs, pulls data; EDIT: also logs runs, pushes
    data, gets an Optuna storage): their MLflow user, S3 user and (EDIT) database role, each
    with a generated secret, written to their join file .team/users/NAME.env (0600), which is
    returned. Whatever was made before a failure is removed again."""
    check_name(name)
    level = level.upper()
    if level not in LEVELS:
        raise UserError(f"level {level!r} is not allowed: choose {' or '.join(LEVELS)}")
    with locked(state.dir):
        _refresh(state)
        return _add_user(state, name, level)


def _refresh(state: State) -> None:
    """The users and secrets as on disk now (another command may have changed them)."""
    fresh = load(state.dir)
    state.users, state.secrets = fresh.users, fresh.secrets


def _add_user(state: State, name: str, level: str) -> Path:
    if name in state.users:
        raise UserError(f"user {name!r} exists: `softmaxlab team remove-user {name}` first")
    password = secrets.token_urlsafe(18)
    with _as_admin(state) as client:
        _auth_call(f"creating user {name!r}", lambda: client.create_user(username=name, password=password))
    try:
        state.users[name] = level
        keys = ceph.add_user(state, user_role(name))
        ceph.set_dvc_policy(state)
        db_password = secrets.token_urlsafe(24) if level == "EDIT" else None
        if db_password:
            postgres.add_role(state, user_role(name), db_password)
        state.save()
        env = state.join_env(user_role(name), keys, db_password)
        env.update(MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=password)
        state.path("users").mkdir(mode=0o700, exist_ok=True)
        what = "reads runs, pulls data" if level == "READ" else "logs runs, pushes data, Optuna storage"
        return write_env_file(join_file(state, name), env, [
            f"Teammate {name} ({level}: {what}) on the team stack: `source` this file.",
            "Their own MLflow login, S3 keys" + (" and database role." if db_password else "."),
            "Theirs alone: `softmaxlab team remove-user` revokes all of it.",
        ])  # fmt: skip
    except BaseException:
        _remove_user(state, name)
        raise


def remove_user(state: State, name: str) -> None:
    """Everything teammate `name` held revoked: MLflow user, S3 user and keys, database role
    (its sessions ended), join file. What is already gone is skipped."""
    check_name(name)
    with locked(state.dir):
        _refresh(state)
        _remove_user(state, name)


def _remove_user(state: State, name: str) -> None:
    from mlflow.exceptions import MlflowException

    with _as_admin(state) as client:

        def delete():
            try:
                client.delete_user(name)
            except MlflowException as err:
                if "not found" not in str(err):
                    raise

        _auth_call(f"removing user {name!r}", delete)
    state.users.pop(name, None)
    state.save()
    ceph.set_dvc_policy(state)  # out of the policy before the S3 user goes
    ceph.remove_user(state, user_role(name))
    postgres.drop_role(state, user_role(name))
    join_file(state, name).unlink(missing_ok=True)


def grant(state: State, name: str, experiment: str, permission: str) -> None:
    """Give user `name` `permission` (READ, EDIT, MANAGE or NO_PERMISSIONS) on the experiment
    named `experiment`."""
    import mlflow

    permission = permission.upper()
    if permission not in PERMISSIONS:
        raise UserError(f"permission {permission!r} is not allowed: choose one of {', '.join(PERMISSIONS)}")
    if state.users.get(name) == "READ" and permission in ("EDIT", "MANAGE"):
        raise UserError(
            f"user {name!r} is a READ user: {permission} is not allowed (READ or NO_PERMISSIONS); "
            f"to let them write, `softmaxlab team remove-user {name}` and add them again at EDIT"
        )
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
