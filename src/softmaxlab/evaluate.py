"""Stage `evaluate`: accuracy, loss and calibration of the saved predictions.

Works from the train stage's prediction files alone (no TensorFlow): test metrics with
bootstrap intervals, a temperature fitted on the validation split (Guo et al. 2017) and every
metric again after scaling, reliability tables and diagrams.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from softmaxlab import calibration
from softmaxlab.config import Config, EvaluateConfig, load_params
from softmaxlab.errors import UserError, entry_point
from softmaxlab.io import read_predictions, save_figure, write_json, write_table

Split = tuple[np.ndarray, np.ndarray, np.ndarray]  # logits, probs, labels


@dataclass
class EvalResult:
    metrics: dict[str, float]  # MLflow names: test_accuracy, test_ece_ts_ci_low, temperature, ...
    temperature: float
    tables: dict[str, pd.DataFrame]  # reliability, reliability_ts, classwise
    confidences: dict[str, np.ndarray]  # top probability per test sample, before / after


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

    def summary(probs: np.ndarray) -> dict[str, float]:
        return calibration.summarize(
            probs, test_labels, n_bins=cfg.n_bins, n_resamples=cfg.n_bootstrap, ci=cfg.ci,
            seed=seed, prefix="test_",
        )  # fmt: skip

    before, after = summary(test_probs), summary(scaled)
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
    confidences = {"reliability": test_probs.max(axis=1), "reliability_ts": scaled.max(axis=1)}
    return EvalResult(metrics, float(temperature), tables, confidences)


def dvc_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """reports/metrics.json: the test metrics without the `test_` prefix (accuracy, loss,
    ece, brier, ...), which is how `dvc metrics show` and `dvc exp show` list them."""
    return {k.removeprefix("test_"): round(v, 6) for k, v in sorted(metrics.items())}


def _interval(m: dict[str, float], key: str) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f"{m[key]:.4f} [{lo:.4f}, {hi:.4f}]" if lo is not None else f"{m[key]:.4f}"


def figures(result: EvalResult, ci: float) -> dict[str, object]:
    from softmaxlab import plots

    m = result.metrics
    pct = f"{ci:.0%} CI"
    titles = {
        "reliability": f"before scaling: acc {m['test_accuracy']:.3f}\nECE {_interval(m, 'test_ece')} ({pct})",
        "reliability_ts": f"after scaling (T = {result.temperature:.2f})\nECE {_interval(m, 'test_ece_ts')} ({pct})",
    }
    return {
        "reliability.png": plots.reliability(
            {k: result.tables[k] for k in titles}, result.confidences, titles
        ),
        "classwise.png": plots.classwise_reliability(
            result.tables["classwise"],
            f"per-class reliability (classwise ECE {m['test_ece_classwise']:.4f})",
        ),
    }


def run(cfg: Config, root: Path, tracker=None, run_id: str | None = None) -> EvalResult:
    """Read predictions under `root`, evaluate, write metrics/tables/plots, log them."""
    pred_dir = root / cfg.paths.predictions
    val, test = read_predictions(pred_dir / "val.parquet"), read_predictions(pred_dir / "test.parquet")
    result = evaluate(val, test, cfg.evaluate, cfg.seed)
    out = root / cfg.paths.calibration
    for name, table in result.tables.items():
        write_table(out / f"{name}.csv", table)
    for name, fig in figures(result, cfg.evaluate.ci).items():
        save_figure(fig, out / name)
    write_json(root / cfg.paths.metrics, dvc_metrics(result.metrics))
    if tracker:
        tracker.log_metrics(run_id, result.metrics)
        tracker.log_artifacts(run_id, [out], "calibration")
    return result


def train_info(cfg: Config, root: Path = Path(".")) -> dict:
    path = root / cfg.paths.train_info
    if not path.is_file():
        raise UserError(f"{path}: not found; run the train stage first (`dvc repro`)")
    return json.loads(path.read_text())


@entry_point
def main() -> None:
    from softmaxlab import tracking

    cfg = load_params()
    tracker, run_id = tracking.reopen(cfg, train_info(cfg))
    m = run(cfg, Path("."), tracker, run_id).metrics
    print(
        f"evaluate: accuracy {m['test_accuracy']:.4f}, loss {m['test_loss']:.4f}, "
        f"ECE {m['test_ece']:.4f} -> {m['test_ece_ts']:.4f} after temperature {m['temperature']:.3f}"
    )


if __name__ == "__main__":
    main()
