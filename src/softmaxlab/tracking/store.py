"""Where runs go: the tracking URI (configured, else the project's local sqlite store), its
experiment, and sqlite's moments of "database is locked"."""

from __future__ import annotations

import os
import time
from pathlib import Path

from softmaxlab.core.config import Config, project_root
from softmaxlab.core.errors import UserError
from softmaxlab.tracking.server import password_refusal, redact

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def retry_locked(fn, *args, attempts: int = 12, **kwargs):
    """Call fn, retrying while sqlite says "database is locked": parallel sweep jobs share
    one sqlite file, and a write can collide with another job's for a moment."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if "database is locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def local_uri() -> str:
    """MLflow's own default store, sqlite:///mlflow.db, anchored at the project root."""
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def resolve_uri(cfg: Config) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else MLflow's own default store,
    sqlite:///mlflow.db (local_uri), anchored at the project root so that runs started from
    Hydra's output directories or DVC's experiment copies land in one store.

    A password in tracking.uri (params.yaml, conf/, `dvc exp run -S`) is refused: it would be
    recorded as the run's param. In MLFLOW_TRACKING_URI, which nothing records, it is allowed
    and shown redacted everywhere (server.redact)."""
    if refused := password_refusal("tracking.uri", cfg.tracking.uri):
        raise refused
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return local_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///"))
        return f"sqlite:///{(project_root() / path).resolve()}"
    return uri


def use_uri(uri: str) -> None:
    """mlflow.set_tracking_uri for this process's fluent calls, without the side effect it has
    since MLflow 3: exporting MLFLOW_TRACKING_URI. resolve_uri reads that variable as what the
    user configured; after a fallback to the local store, a sweep's later jobs (and joblib's
    workers) would take the local store for the configured one, untagged, and sync would
    never send their runs."""
    import mlflow

    from softmaxlab.core.processes import restored_env

    private_sqlite(uri)
    with restored_env("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(uri)


def private_sqlite(uri: str) -> None:
    """A sqlite store's file readable by its owner only (sqlite gives its journal the same
    mode): created so before MLflow opens it, an older one made so."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if str(path) == ":memory:" or not path.parent.is_dir():
            return  # no file, or MLflow says so itself
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)


def ensure_experiment(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(
                f"tracking.experiment={name!r} is deleted in {redact(uri)}: restore it "
                "(`mlflow experiments restore`) or choose another name"
            )
        return exp.experiment_id
    try:
        # The tag makes `mlflow ui` treat it as a classic ML experiment (runs table).
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    except Exception:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def runs_table_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """`mlflow ui` opens on its GenAI view; this link goes straight to the runs table."""
    return f"{host}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
