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

from softmaxlab import calibration
from softmaxlab.config import Config, EvaluateConfig, load_params
from softmaxlab.errors import entry_point
from softmaxlab.io import read_json, read_output, read_predictions, write_json, write_table

Split = tuple[np.ndarray, np.ndarray, np.ndarray]  # logits, probs, labels
# Every metric evaluate computed, at full precision and under the names MLflow records,
# next to the reliability tables (reports/metrics.json is DVC's rounded, shorter view).
METRICS_FILE = "metrics.json"
TABLES = ("reliability", "reliability_ts", "classwise")


@dataclass
class EvalResult:
    metrics: dict[str, float]  # MLflow names: test_accuracy, test_ece_ts_ci_low, temperature, ...
    temperature: float
    tables: dict[str, pd.DataFrame]  # reliability, reliability_ts, classwise


def _scaled_name(key: str) -> str:
    """test_ece -> test_ece_ts, test_ece_ci_low -> test_ece_ts_ci_low."""
    for tail in ("_ci_low", "_ci_high"):
        if key.endswith(tail):
            return key.removesuffix(tail) + "_ts" + tail
    return key + "_ts"


def evaluate(val: Split, test: Split, cfg: EvaluateConfig, seed: int) -> EvalResult:
    """Pure: predictions in, metrics and tables out."""
    val_logits, _, val_labels = val
    test_logits, test_probs, test_labels = test
    temperature = calibration.fit_temperature(val_logits, val_labels)
    scaled = calibration.softmax(test_logits, temperature)

    # One set of bootstrap resamples for both: at 250,000 test samples, drawing them is most
    # of this stage's time.
    before, after = calibration.summarize_paired(
        [test_probs, scaled], test_labels, n_bins=cfg.n_bins, n_resamples=cfg.n_bootstrap,
        ci=cfg.ci, seed=seed, prefix="test_",
    )  # fmt: skip
    metrics = {**before, "test_loss": before["test_nll"]}
    metrics.update({_scaled_name(k): v for k, v in after.items()})
    metrics["temperature"] = float(temperature)
    metrics["temperature_at_bound"] = float(calibration.at_bound(temperature))
    val_probs = calibration.softmax(val_logits)
    metrics["val_ece"] = calibration.ece(val_probs, val_labels, cfg.n_bins)
    metrics["val_nll"] = calibration.nll(val_probs, val_labels)
    tables = {
        "reliability": calibration.reliability_table(test_probs, test_labels, cfg.n_bins),
        "reliability_ts": calibration.reliability_table(scaled, test_labels, cfg.n_bins),
        "classwise": calibration.classwise_reliability(test_probs, test_labels, cfg.n_bins),
    }
    return EvalResult(metrics, float(temperature), tables)


def dvc_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """reports/metrics.json: the test metrics without the `test_` prefix (accuracy, loss,
    ece, brier, ...), which is how `dvc metrics show` and `dvc exp show` list them."""
    return {k.removeprefix("test_"): round(v, 6) for k, v in sorted(metrics.items())}


def run(cfg: Config, root: Path) -> EvalResult:
    """Read predictions under `root`, evaluate, write the metrics and reliability tables."""
    pred_dir = root / cfg.paths.predictions
    val, test = read_predictions(pred_dir / "val.parquet"), read_predictions(pred_dir / "test.parquet")
    result = evaluate(val, test, cfg.evaluate, cfg.seed)
    out = root / cfg.paths.calibration
    for name, table in result.tables.items():
        write_table(out / f"{name}.csv", table)
    write_json(out / METRICS_FILE, result.metrics)
    write_json(root / cfg.paths.metrics, dvc_metrics(result.metrics))
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
    m = run(cfg, Path(".")).metrics
    print(
        f"evaluate: accuracy {m['test_accuracy']:.4f}, loss {m['test_loss']:.4f}, "
        f"ECE {m['test_ece']:.4f} -> {m['test_ece_ts']:.4f} after temperature {m['temperature']:.3f}"
    )


if __name__ == "__main__":
    main()
