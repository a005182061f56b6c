"""Sweeps on a cluster (docs/cluster.md): what the launching process prepares
before the first job, for Hydra's Ray launcher and for an Optuna study in a shared database.

Both run in SweepCallback.on_multirun_start: after the sweep's parent run exists, before
Hydra instantiates the sweeper and its launcher from the same config.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from omegaconf import DictConfig, OmegaConf, open_dict

from softmaxlab.core.errors import UserError, first_line

# The plugin's own (hydra/launcher=ray) and ours, which launcher=ray uses
# (src/hydra_plugins/softmaxlab_ray/launcher.py).
RAY_LAUNCHERS = (
    "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
    "hydra_plugins.softmaxlab_ray.launcher.RayLauncher",
)
ENV_CWD = "SOFTMAXLAB_SWEEP_CWD"  # the launching process's directory, for Ray's workers
# Variables that are credentials themselves: never in a Ray runtime env (ray_settings).
SECRET_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN")
# scheme://user:password@ in any text: up to the last @ before the host, which ends at a /
USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s]*@")


SUBMITIT_LAUNCHERS = (
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
)


def prepare_launcher(config: DictConfig, env: dict[str, str], device: str) -> None:
    """The cluster launchers' settings that depend on the sweep: a job reserves a GPU when it
    trains on one (unless the launcher's GPU key is set); Ray's jobs get their environment.
    submitit's jobs (local processes, or SLURM jobs, which sbatch starts with the submitting
    environment) inherit it as joblib's do."""
    launcher = config.hydra.launcher
    target = launcher.get("_target_")
    if target in SUBMITIT_LAUNCHERS and launcher.get("gpus_per_node") is None and device == "gpu":
        with open_dict(launcher):
            launcher.gpus_per_node = 1
    elif target in RAY_LAUNCHERS:
        ray_settings(config, env, device)
        start_ray(launcher.ray.init, env.get("MLFLOW_TRACKING_URI"))


def ray_settings(config: DictConfig, env: dict[str, str], device: str) -> None:
    """Give the Ray launcher's jobs what the basic and joblib launchers' jobs inherit.

    Ray's worker processes are started by each node's raylet, not by this process, so they
    never see the variables on_multirun_start sets for the jobs (the parent run, the sweep id,
    the store). The sweep's job-level runtime env carries them to every worker it uses, on
    every node. Workers start in the directory their node was started from; each sweep's
    workers move to the launching process's directory (when the node has it: the same
    checkout path, or a shared file system), so that relative paths (the sweep directory,
    conf/, the default store) mean what they mean to the launching process, as for the
    other launchers. A job reserves a GPU when it trains on one.

    No credential goes into the runtime env: Ray keeps it in its job table, shows it to anyone
    who can reach the cluster and writes it to its logs. The tracking URI goes without its
    user info; each node's workers find the credentials where MLflow looks for them, in the
    environment the node was started with or in ~/.mlflow/credentials (0600). For a Ray
    started for the sweep, that environment is this process's (start_ray)."""
    launcher = config.hydra.launcher
    # Ray folds alike lines from different jobs into one ("[repeated 2x across cluster]"),
    # hiding which job said what. Read when the launcher imports Ray, after this.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with open_dict(launcher):
        init, remote = launcher.ray.init, launcher.ray.remote
        runtime_env = init.get("runtime_env") or {}
        own = runtime_env.get("env_vars") or {}
        for key, value in own.items():
            if key in SECRET_VARS or USERINFO.search(str(value)):
                raise UserError(
                    f"hydra.launcher.ray.init.runtime_env.env_vars.{key} holds a credential, which Ray "
                    f"would record and show: give the cluster's nodes their credentials in the environment "
                    f"they are started with, or in ~/.mlflow/credentials (0600)"
                )
        ours = {key: USERINFO.sub(r"\1", value) for key, value in env.items()}
        env_vars = {**own, **ours, ENV_CWD: os.getcwd()}
        init.runtime_env = {
            "worker_process_setup_hook": "softmaxlab.sweeps.cluster.ray_worker_setup", **runtime_env,
            "env_vars": env_vars,
        }  # fmt: skip
        if remote.get("num_gpus") is None:
            remote.num_gpus = 1 if device == "gpu" else 0


def start_ray(init: DictConfig, tracking_uri: str | None = None) -> None:
    """ray.init as the launcher would call it, but here, where a cluster that cannot be
    reached (a wrong address, a missing token) can be said in one line; the launcher then
    finds Ray initialised and uses it. Without an address (`local`), the Ray started for the
    sweep is one only this user can join (local_ray)."""
    kwargs = OmegaConf.to_container(init, resolve=True)
    if kwargs.get("address") in (None, "local"):
        kwargs.update(local_ray(tracking_uri))
    elif tracking_uri and urlsplit(tracking_uri).password:
        print(
            "softmaxlab: warning: the tracking URI's credentials are not sent to the Ray cluster's "
            "workers: each node needs its own (MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD in the "
            "environment of its `ray start`, or ~/.mlflow/credentials, 0600)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    import ray

    try:
        ray.init(**kwargs)
    except Exception as err:
        raise UserError(f"Ray: {_ray_error(err)} (address={kwargs.get('address')})") from err


def local_ray(tracking_uri: str | None) -> dict:
    """The settings of a Ray started for the sweep on this machine: ray.init's extra arguments,
    and the environment its processes inherit from this one (set here, before Ray is imported).

    - Token authentication, whatever RAY_AUTH_MODE says, with a new token of the sweep's own
      in a 0600 file (not ~/.ray/auth_token, which other clusters share); RAY_AUTH_TOKEN would
      win over the file, so it goes.
    - Every server on 127.0.0.1: Ray replaces a loopback node address with the machine's
      primary one unless multi-node clusters are off, which they are on macOS and Windows;
      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 turns them off here too (Ray reads it at import).
    - Its files (the token, Ray's session logs) in a new private folder (0700), not the
      shared /tmp/ray, whose latest cluster any `ray.init()` on the machine would join. Ray
      makes its own temp folder world-writable: that is a folder inside.
    - The tracking URI's credentials, if it has any, as MLflow's variables: the workers
      inherit them from the node, as on a cluster, since the runtime env carries none."""
    from softmaxlab.core.private import write_private

    folder = Path(tempfile.mkdtemp(prefix="softmaxlab-ray-", dir=os.environ.get("RAY_TMPDIR")))
    token = folder / "auth_token"
    write_private(token, secrets.token_hex(32))
    # Removed at exit, after Ray's own exit handler (registered when Ray is imported, after
    # this) has stopped the cluster.
    atexit.register(token.unlink, missing_ok=True)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"
    )
    parts = urlsplit(tracking_uri or "")
    if parts.password and "MLFLOW_TRACKING_USERNAME" not in os.environ:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return {"_temp_dir": str(folder / "ray")}


def _ray_error(err: BaseException) -> str:
    """Ray's connection errors carry the real reason as a traceback inside their message:
    the first line of the error, and the last exception line inside it, up to its first
    sentence (e.g. `InvalidAuthToken: Authentication token is missing or incorrect`)."""
    text = "\n".join(str(e) for e in (err, err.__cause__) if e is not None)
    first = first_line(text) or type(err).__name__
    raised = [
        line.strip() for line in text.splitlines() if re.match(r"[\w.]+(Error|Exception): ", line.strip())
    ]
    if raised and raised[-1] != first:
        return f"{first}: {raised[-1].split('. ')[0]}"
    return first


def ray_worker_setup() -> None:
    """Ray's worker_process_setup_hook for a sweep's workers (prepare_ray)."""
    cwd = os.environ.get(ENV_CWD)
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)


def job_tags() -> dict[str, str]:
    """Where a sweep job ran, when a cluster launcher ran it: its Ray node, its SLURM job."""
    tags = {}
    if "ray" in sys.modules:  # imported by the Ray launcher's worker that runs this job
        import ray

        if ray.is_initialized():
            tags["ray.node_id"] = ray.get_runtime_context().get_node_id()
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
        tags["slurm.node"] = os.environ.get("SLURMD_NODENAME", "")
    return tags


def prepare_optuna_storage(url: str, attempts: int = 10) -> None:
    """Create Optuna's tables in `url` (any SQLAlchemy URL) and stamp their schema version,
    in one committed transaction, if that has not been done yet.

    Optuna 2.10.1 (which hydra-optuna-sweeper pins) stamps the schema version on a
    connection it never commits, which SQLAlchemy 2 rolls back: creating the storage then
    fails with an AssertionError in get_current_version (optuna issue 4375, fixed in optuna
    3). A database prepared here is one Optuna finds complete and uses as is. Sweeps started
    at the same moment on one database may race to create the tables: the loser retries and
    finds them there."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # as Optuna does: no INFO chatter
    import sqlalchemy
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from optuna import version
    from optuna.storages import _rdb
    from optuna.storages._rdb import models
    from sqlalchemy import orm

    try:
        engine = sqlalchemy.create_engine(url)
    except Exception as err:
        shown = str(err).replace(url, _shown(url))
        raise UserError(f"hydra.sweeper.storage={_shown(url)} is not a usable database URL: {shown}") from err
    script = ScriptDirectory(str(Path(_rdb.__file__).parent / "alembic"))
    try:
        for attempt in range(attempts):
            try:
                with engine.begin() as conn:
                    models.BaseModel.metadata.create_all(conn)
                    session = orm.Session(bind=conn)
                    if models.VersionInfoModel.find(session) is None:
                        session.add(models.VersionInfoModel(
                            schema_version=models.SCHEMA_VERSION, library_version=version.__version__
                        ))  # fmt: skip
                        session.flush()
                    context = MigrationContext.configure(conn)
                    if context.get_current_revision() is None:
                        context.stamp(script, script.get_current_head())
                return
            except sqlalchemy.exc.OperationalError as err:
                # sqlite: a busy database, or a table another sweep just created: try again.
                if "locked" not in str(err) and "already exists" not in str(err):
                    first = first_line(err.orig or err)
                    raise UserError(f"Optuna storage {_shown(url)} is not usable: {first}") from err
                if attempt == attempts - 1:
                    raise
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Another sweep created the same table or row first: the next try finds it.
                if attempt == attempts - 1:
                    raise
            time.sleep(0.2 * (attempt + 1))
    finally:
        engine.dispose()


def _shown(url: str) -> str:
    """A database URL as a message may show it: without its user info. Unlike SQLAlchemy's
    URL.render_as_string(hide_password=True) (or tracking.server.redact), this works on a URL
    that does not parse, which is when the first message above is needed."""
    return USERINFO.sub(r"\1***@", url)
