"""Stage `train`: train the model the config describes (model/training.py), save it, its
predictions and its history, and log the run to MLflow.

`python -m softmaxlab.stages.train` is the stage's command in dvc.yaml; `run()` is the same
stage for the in-process pipeline (the Hydra app).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from softmaxlab.core import timing
from softmaxlab.core.config import Config, fit_size, load_params
from softmaxlab.core.errors import UserError, entry_point
from softmaxlab.core.io import atomic_path, file_md5, read_split, write_json, write_table
from softmaxlab.model import backend
from softmaxlab.model.network import keras_for
from softmaxlab.model.training import TrainResult, shortfall, show_progress, train, val_accuracy
from softmaxlab.tracking.server import redact


def save(cfg: Config, result: TrainResult, root: Path) -> None:
    with atomic_path(root / cfg.paths.model, suffix=".keras") as tmp:
        result.model.save(tmp)
    pred_dir = root / cfg.paths.predictions
    for name, df in result.predictions.items():
        write_table(pred_dir / f"{name}.parquet", df)
    write_table(root / cfg.paths.history, result.history)


def load_data(cfg: Config, root: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The validated train and test splits under `root`, and their md5."""
    k = len(cfg.data.centers)
    train_path, test_path = root / cfg.paths.train_data, root / cfg.paths.test_data
    train_df, test_df = read_split(train_path, k), read_split(test_path, k)
    n_fit = fit_size(len(train_df), cfg.train.validation_split)
    if n_fit < 1 or n_fit == len(train_df):
        raise UserError(
            f"{train_path}: {len(train_df)} rows cannot be split by train.validation_split="
            f"{cfg.train.validation_split} into non-empty training and validation parts"
        )
    if cfg.train.batch_size > n_fit:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is not allowed: must be <= the {n_fit} samples trained on"
        )
    return train_df, test_df, file_md5(train_path, test_path)


def setup(cfg: Config) -> dict[str, Any]:
    """reports/setup.json, a DVC metrics file: what a run trained, in the leftmost columns of
    `dvc exp show` (DVC lists metrics before params). DVC always lists every key of
    params.yaml too, after these, with the list-valued ones as wide cells; this file puts the
    parameters people change (model, optimizer, lr, epochs, data, backend) next to the
    experiment's name at a glance, and model.hidden as one word (12-8) that DVC never wraps."""
    return {
        "model": cfg.model.name,
        "hidden": "-".join(str(units) for units in cfg.model.hidden),
        "optimizer": cfg.optimizer.name,
        "lr": cfg.optimizer.lr,
        "epochs": cfg.train.epochs,
        "data": cfg.data.name,
        "backend": cfg.train.backend,
    }


def run(
    cfg: Config, root: Path, tracker=None, run_id: str | None = None, data=None, progress: bool = False
) -> TrainResult:
    """Read the data under `root` (or take `data` from load_data), train, write the model,
    predictions and history; log to the tracker's run. Shared by `dvc repro` and the Hydra app."""
    train_df, test_df, data_md5 = data or load_data(cfg, root)
    if tracker:
        with timing.phase("tracking"):
            tracker.set_tags(run_id, {"data_md5": data_md5, "data.name": cfg.data.name})
            tracker.log_data(run_id, cfg, root, {"train_data": train_df, "test_data": test_df})
    with timing.phase("train"):
        result = train(cfg, train_df, test_df, progress)
    with timing.phase("save"):
        save(cfg, result, root)
    last = result.history.iloc[-1]
    warning = shortfall(result)
    result.info = {
        "run_id": run_id,
        "experiment_id": tracker.experiment_id if tracker else None,
        "tracking_uri": redact(tracker.uri) if tracker else None,
        "device": result.device,
        "backend": result.backend,
        "backend_version": backend.version(result.backend),
        "train_seconds": round(result.train_seconds, 4),
        "epochs": int(last["epoch"]),
        "final_loss": float(last["loss"]),
        # The saved model's (early stopping may have kept an earlier epoch's weights); each
        # epoch's, as trained, is in the history.
        "val_accuracy": val_accuracy(result),
        "val_accuracy_reference": result.info["val_accuracy_reference"],
        "warning": warning,
        "data_md5": data_md5,
    }
    if tracker:
        with timing.phase("tracking"):
            tracker.log_training(run_id, result, cfg)
    write_json(root / cfg.paths.train_info, result.info)
    write_json(root / cfg.paths.setup, setup(cfg), sort_keys=False)
    return result


def summary_line(result: TrainResult, run_id: str | None) -> str:
    last = result.history.iloc[-1]
    line = (
        f"train: {len(result.history)} epochs in {result.train_seconds:.2f} s on {result.device} "
        f"({result.backend}); loss {last['loss']:.4f}, saved model's val_accuracy {val_accuracy(result):.4f}"
        + (f"; MLflow run {run_id}" if run_id else "")
    )
    return line + (f"\ntrain: warning: {result.info['warning']}" if result.info.get("warning") else "")


def stage(cfg: Config, root: Path, progress: bool = False) -> tuple[TrainResult, str | None]:
    """The `dvc repro` stage: data checked before any MLflow run exists, then run() with the
    MLflow half in a process of its own (tracking.beside): it imports MLflow, opens the store
    (creating a new one) and the run while this process imports Keras."""
    from softmaxlab.tracking.beside import beside

    with timing.phase("read data"):
        data = load_data(cfg, root)  # bad data is refused before any MLflow run exists
    if not cfg.tracking.enabled:
        keras_for(cfg)
        return run(cfg, root, None, None, data, progress), None
    with timing.edges(beside(cfg), "tracking") as tracker:  # leaving it waits for the run's records
        keras_for(cfg)
        with timing.phase("tracking"):  # what is left to wait for: a refused login stops here
            run_id = tracker.run_id()
        result = run(cfg, root, tracker, run_id, data, progress)
    return result, run_id


@entry_point
def main() -> None:
    result, run_id = stage(load_params(), Path("."), progress=show_progress())
    print(summary_line(result, run_id))


if __name__ == "__main__":
    main()
