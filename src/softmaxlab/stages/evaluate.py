"""Stage `evaluate`: accuracy, loss and calibration of the saved predictions.

Works from the train stage's prediction files alone: test metrics with bootstrap intervals,
a temperature fitted on the validation split (Guo et al. 2017) and every metric again after
scaling, and reliability tables. Numbers and files only: no TensorFlow, no matplotlib, no
MLflow. The report stage draws the diagrams and records all of it in the run, so this stage's
process starts in about a second instead of paying MLflow's and matplotlib's imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from softmaxlab.core import calibration
from softmaxlab.core import metrics as names
from softmaxlab.core.config import Config, EvaluateConfig, load_params
from softmaxlab.core.errors import entry_point
from softmaxlab.core.io import read_json, read_output, read_predictions, write_json, write_table
from softmaxlab.tracking.tracker import failure_recorded

Split = tuple[np.ndarray, np.ndarray, np.ndarray]  # logits, probs, labels
# Every metric evaluate computed, at full precision and under the names MLflow records,
# next to the reliability tables (reports/metrics.json is DVC's short view: names.HEADLINE).
METRICS_FILE = "metrics.json"
TABLES = ("reliability", "reliability_ts", "classwise")


@dataclass
class EvalResult:
    metrics: dict[str, float]  # names from softmaxlab.core.metrics: test/accuracy, test_ts_ci/ece_low, ...
    temperature: float
    tables: dict[str, pd.DataFrame]  # reliability, reliability_ts, classwise


def evaluate(val: Split, test: Split, cfg: EvaluateConfig, seed: int) -> EvalResult:
    """Pure: predictions in, metrics and tables out. The temperature is fitted on the
    validation split; the test split is only measured."""
    val_logits, _, val_labels = val
    test_logits, test_probs, test_labels = test
    temperature = calibration.fit_temperature(val_logits, val_labels)
    scaled = test_logits / temperature

    # One set of bootstrap resamples for both: at 250,000 test samples, drawing them is much
    # of this stage's time.
    summaries = calibration.summarize_paired(
        [test_logits, scaled],
        test_labels,
        n_bins=cfg.n_bins,
        n_resamples=cfg.n_bootstrap,
        ci=cfg.ci,
        seed=seed,
    )
    metrics = {}
    for is_scaled, (values, intervals) in zip((False, True), summaries, strict=True):
        for key, value in values.items():
            metrics[names.test(key, is_scaled)] = value
        for key, bounds in intervals.items():
            for end, bound in zip(names.CI_ENDS, bounds, strict=True):
                metrics[names.test_ci(key, end, is_scaled)] = bound
    metrics[names.TEMPERATURE] = float(temperature)
    metrics[names.TEMPERATURE_AT_BOUND] = float(calibration.at_bound(temperature))
    val_probs = calibration.softmax(val_logits)
    metrics[names.VAL_ACCURACY] = calibration.accuracy(val_probs, val_labels)
    metrics[names.VAL_NLL] = calibration.nll_from_logits(val_logits, val_labels)
    metrics[names.VAL_ECE] = calibration.ece(val_probs, val_labels, cfg.n_bins)
    metrics[names.VAL_BRIER] = calibration.brier(val_probs, val_labels)
    scaled_probs = calibration.softmax(scaled)
    tables = {
        "reliability": calibration.reliability_table(test_probs, test_labels, cfg.n_bins),
        "reliability_ts": calibration.reliability_table(scaled_probs, test_labels, cfg.n_bins),
        "classwise": calibration.classwise_reliability(test_probs, test_labels, cfg.n_bins),
    }
    return EvalResult(metrics, float(temperature), tables)


def dvc_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """reports/metrics.json: the headline numbers under short names (accuracy, nll, ece,
    ece_ts, temperature, val_nll), which is what `dvc exp show` and `dvc metrics show` list.
    The intervals and the rest stay in reports/calibration/metrics.json. Four significant
    digits: enough to compare runs, and narrow columns in DVC's table."""
    return {short: float(f"{metrics[full]:.4g}") for short, full in names.HEADLINE.items()}


def summary_line(metrics: dict[str, float]) -> str:
    """The headline in one line, for the stages' and the app's output."""
    m = {short: metrics[full] for short, full in names.HEADLINE.items()}
    return (
        f"test accuracy {m['accuracy']:.4f}, NLL {m['nll']:.4f}, ECE {m['ece']:.4f} "
        f"(after T={m['temperature']:.3f}: {m['ece_ts']:.4f}); validation NLL {m['val_nll']:.4f}"
    )


def run(cfg: Config, root: Path) -> EvalResult:
    """Read predictions under `root`, evaluate, write the metrics and reliability tables."""
    pred_dir = root / cfg.paths.predictions
    val, test = read_predictions(pred_dir / "val.parquet"), read_predictions(pred_dir / "test.parquet")
    result = evaluate(val, test, cfg.evaluate, cfg.seed)
    out = root / cfg.paths.calibration
    for name, table in result.tables.items():
        write_table(out / f"{name}.csv", table)
    write_json(out / METRICS_FILE, result.metrics)
    # HEADLINE's order is the order of DVC's columns: accuracy, nll, ece, ece_ts, ...
    write_json(root / cfg.paths.metrics, dvc_metrics(result.metrics), sort_keys=False)
    return result


def read(cfg: Config, root: Path) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """What run() wrote: the full metrics and the reliability tables."""
    out = root / cfg.paths.calibration
    metrics = read_output(out / METRICS_FILE, read_json, "metrics", "evaluate")
    tables = {name: read_output(out / f"{name}.csv", pd.read_csv, "table", "evaluate") for name in TABLES}
    return metrics, tables


@entry_point
def main() -> None:
    cfg = load_params()
    with failure_recorded(cfg, "evaluate"):
        print(f"evaluate: {summary_line(run(cfg, Path('.')).metrics)}")


if __name__ == "__main__":
    main()
