"""What a run records about where it came from: the code (git), the software (versions), a
name that says what ran, and the data (MLflow input datasets that point at DVC's copy)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from softmaxlab.core.config import Config
from softmaxlab.tracking.server import redact

# MLflow's dataset contexts for the data splits (cfg.paths keys).
DATA_CONTEXTS = {"train_data": "training", "test_data": "test"}
VERSIONED_PACKAGES = ("softmaxlab", "tensorflow", "jax", "keras", "numpy", "scikit-learn", "mlflow", "dvc")


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}
    return {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}


def environment_tags() -> dict[str, str]:
    tags = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"versions.{pkg}"] = metadata.version(pkg)
    return tags


def default_run_name(cfg: Config) -> str:
    """A run name that says what ran (the runs table shows it), instead of MLflow's random
    one: the DVC experiment's name where DVC runs it, else model, optimizer, lr and seed."""
    what = f"{cfg.model.name} {cfg.optimizer.name} lr={cfg.optimizer.lr:g} seed={cfg.seed}"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{exp}: {what}" if exp else what


def data_location(root: Path, rel: str, md5: str) -> str:
    """Where a teammate finds this version of a data file: DVC's object for it in the default
    remote (`<remote url>/files/md5/ab/cdef…`, the address `dvc pull` fetches) when `root` is a
    DVC project with a default remote and dvc.lock records this very content; else the file.
    Under `dvc repro` the generate stage's lock entry is written before train runs."""
    path = (root / rel).resolve()
    if not (root / ".dvc").is_dir():
        return str(path)  # the in-process pipeline writes its data into a run directory
    try:
        import dvc.api
        from dvc.config import Config as DvcConfig

        if not DvcConfig(dvc_dir=str(root / ".dvc"))["core"].get("remote"):
            return str(path)
        url = dvc.api.get_url(rel, repo=str(root))
    except Exception:  # not DVC-tracked (yet), or DVC cannot read its config: the file itself
        return str(path)
    return redact(url) if url.endswith(f"{md5[:2]}/{md5[2:]}") else str(path)


def dataset_inputs(cfg: Config, root: Path, frames: dict[str, Any]) -> list:
    """The data splits as MLflow DatasetInputs (the run page's "Datasets used", the runs
    table's Dataset column): `frames` maps a cfg.paths key (train_data, test_data) to its
    frame. Digest: the file's md5, which is DVC's hash of it; source: where DVC keeps that
    version (data_location)."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.models import infer_signature
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from softmaxlab.core.io import file_md5

    inputs = []
    with warnings.catch_warnings():
        # MLflow warns that a local path matches its two local sources (same class) and that
        # the integer label column cannot hold missing values: both true, neither something
        # a user of this run can act on.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
        for key, df in frames.items():
            rel = getattr(cfg.paths, key)
            md5 = file_md5(root / rel)
            dataset = mlflow.data.from_pandas(
                df, source=data_location(root, rel, md5), targets="label",
                name=f"{cfg.data.name}-{key.removesuffix('_data')}", digest=md5,
            )  # fmt: skip
            with contextlib.suppress(AttributeError):  # should MLflow make it read-only: it infers it then
                # MLflow infers the schema by scanning every value (5 s at 750,000 rows); the
                # columns' dtypes decide it, so the first row gives the same schema.
                dataset.schema = infer_signature(df.head(1)).inputs
            tags = [InputTag(MLFLOW_DATASET_CONTEXT, DATA_CONTEXTS[key]), InputTag("dvc.path", rel)]
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags))
    return inputs


def dataset_insert_race(err: Exception) -> bool:
    """Whether err is another job having inserted the same dataset (experiment, name, digest)
    a moment earlier: sqlite's "UNIQUE constraint failed: datasets…", PostgreSQL's "duplicate
    key value violates unique constraint "dataset_pk"" (through a server, in its message)."""
    msg = str(err)
    return "dataset" in msg and ("UNIQUE constraint failed" in msg or "violates unique constraint" in msg)
