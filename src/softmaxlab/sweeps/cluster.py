"""Sweeps on a cluster (docs/cluster.md): what the launching process prepares
before the first job, for Hydra's Ray launcher and for an Optuna study in a shared database.

Both run in SweepCallback.on_multirun_start: after the sweep's parent run exists, before
Hydra instantiates the sweeper and its launcher from the same config.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from softmaxlab.core.errors import UserError, first_line

# The plugin's own (hydra/launcher=ray) and ours, which launcher=ray uses
# (src/hydra_plugins/softmaxlab_ray/launcher.py).
RAY_LAUNCHERS = (
    "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
    "hydra_plugins.softmaxlab_ray.launcher.RayLauncher",
)
ENV_CWD = "SOFTMAXLAB_SWEEP_CWD"  # the launching process's directory, for Ray's workers


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
        start_ray(launcher.ray.init)


def ray_settings(config: DictConfig, env: dict[str, str], device: str) -> None:
    """Give the Ray launcher's jobs what the basic and joblib launchers' jobs inherit.

    Ray's worker processes are started by each node's raylet, not by this process, so they
    never see the variables on_multirun_start sets for the jobs (the parent run, the sweep id,
    the store). The sweep's job-level runtime env carries them to every worker it uses, on
    every node. Workers start in the directory their node was started from; each sweep's
    workers move to the launching process's directory (when the node has it: the same
    checkout path, or a shared file system), so that relative paths (the sweep directory,
    conf/, the default store) mean what they mean to the launching process, as for the
    other launchers. A job reserves a GPU when it trains on one."""
    launcher = config.hydra.launcher
    # Ray folds alike lines from different jobs into one ("[repeated 2x across cluster]"),
    # hiding which job said what. Read when the launcher imports Ray, after this.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with open_dict(launcher):
        init, remote = launcher.ray.init, launcher.ray.remote
        runtime_env = init.get("runtime_env") or {}
        env_vars = {**(runtime_env.get("env_vars") or {}), **env, ENV_CWD: os.getcwd()}
        init.runtime_env = {
            "worker_process_setup_hook": "softmaxlab.sweeps.cluster.ray_worker_setup", **runtime_env,
            "env_vars": env_vars,
        }  # fmt: skip
        if remote.get("num_gpus") is None:
            remote.num_gpus = 1 if device == "gpu" else 0


def start_ray(init: DictConfig) -> None:
    """ray.init as the launcher would call it, but here, where a cluster that cannot be
    reached (a wrong address, a missing token) can be said in one line; the launcher then
    finds Ray initialised and uses it."""
    import ray

    kwargs = OmegaConf.to_container(init, resolve=True)
    try:
        ray.init(**kwargs)
    except Exception as err:
        raise UserError(f"Ray: {_ray_error(err)} (address={kwargs.get('address')})") from err


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
        raise UserError(f"hydra.sweeper.storage={url!r} is not a usable database URL: {err}") from err
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
                    raise UserError(f"Optuna storage {_redact(url)} is not usable: {first}") from err
                if attempt == attempts - 1:
                    raise
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Another sweep created the same table or row first: the next try finds it.
                if attempt == attempts - 1:
                    raise
            time.sleep(0.2 * (attempt + 1))
    finally:
        engine.dispose()


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
