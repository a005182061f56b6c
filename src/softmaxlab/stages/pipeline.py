"""The four stages in one process, for the Hydra app and the tests.

The same stage functions as `dvc repro` (generate.generate, train.run, evaluate.run,
report.run), with `root` set to the run's own directory and one MLflow run around them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from softmaxlab.core.config import Config, DataConfig
from softmaxlab.core.metrics import TRAIN_SECONDS
from softmaxlab.stages import evaluate, generate, report, train

# Data per data config (its seed included), so a sweep generates each data set once.
_DATA_CACHE: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}


def data_for(data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    key = json.dumps(dataclasses.asdict(data), sort_keys=True)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = generate.generate(data)
    return _DATA_CACHE[key]


def run(
    cfg: Config,
    root: Path,
    tracker=None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    progress: bool = False,
    draw_beside: bool = False,
) -> dict[str, float]:
    """generate -> train -> evaluate -> report under `root`; returns the metrics (and the
    train stage's warning, if any, under "warning"). `progress`: Keras' progress bar.
    `draw_beside`: the figures are drawn in a process of its own while the job evaluates and
    records (report.background_drawer): for the app's own process, which runs job after job;
    not inside a launcher's worker (joblib's, Ray's), whose processes are not this one's to fork."""
    from softmaxlab.tracking.tracker import maybe_run

    root = Path(root)
    # Every stage runs inside the block: the run ends FINISHED or FAILED with it.
    with maybe_run(
        tracker, cfg, later_stages=(), run_name=run_name, parent_run_id=parent_run_id, tags=tags
    ) as run_id:
        drawer = (
            report.background_drawer() if draw_beside else None
        )  # started now: it imports matplotlib while this trains
        train_df, test_df = data_for(cfg.data)
        generate.write(cfg, train_df, test_df, root)
        trained = train.run(cfg, root, tracker, run_id, progress=progress)
        # The train stage's figures are drawn over there while this process evaluates and
        # records; report.run has the rest drawn and waits for both.
        early = drawer.submit(report.draw_train_figures, cfg, root) if drawer else None
        metrics = evaluate.run(cfg, root).metrics
        report.run(cfg, root, tracker, run_id, drawer=drawer, train_figures_drawn=early)
    return {
        **metrics,
        TRAIN_SECONDS: trained.train_seconds,
        "run_id": run_id,
        "warning": trained.info.get("warning"),
    }
