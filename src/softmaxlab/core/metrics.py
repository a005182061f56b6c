"""The name of every metric, declared once.

evaluate computes under these names, report records them in MLflow and lays out its table,
the sweep summary picks its columns, `objective` chooses among them, and reports/metrics.json
(what DVC shows) is built from HEADLINE. MLflow groups a run's charts by the part before the
first `/` and orders the sections by name, so the run page opens with the training curves
(curves/) and the headline test metrics (test/), while bootstrap bounds (test_ci/), the
after-scaling twins with their temperature (test_ts/, test_ts_ci/), the training time (train/)
and the validation metrics (val/) follow in sections of their own.
"""

from __future__ import annotations

# What calibration.summarize computes for one split, each with a bootstrap interval:
# key -> (label, note), in the order the report shows them.
CALIBRATION = {
    "accuracy": ("accuracy", "higher is better"),
    "nll": ("NLL", "negative log-likelihood of the true class, from the logits; lower is better"),
    "brier": ("Brier score", "sum over classes of squared error, in [0, 2]"),
    "ece": ("ECE", "top-label, equal-width bins"),
    "ece_adaptive": ("adaptive ECE", "equal-mass bins"),
    "ece_classwise": ("classwise ECE", "Kull et al. 2019"),
    "mce": ("MCE", "worst bin"),
}
CI_ENDS = ("low", "high")


def test(name: str, scaled: bool = False) -> str:
    """A test-split metric: test/ece, or test_ts/ece after temperature scaling."""
    return f"test{'_ts' if scaled else ''}/{name}"


def test_ci(name: str, end: str, scaled: bool = False) -> str:
    """A bootstrap bound: test_ci/ece_low, test_ts_ci/ece_high."""
    return f"test{'_ts' if scaled else ''}_ci/{name}_{end}"


# Fitted on the validation split; shown with the after-scaling metrics it produces.
TEMPERATURE = "test_ts/temperature"
TEMPERATURE_AT_BOUND = "test_ts/temperature_at_bound"  # 1.0 when the fit stopped at its bound
# evaluate's metrics of the validation split (the objectives below), all of the saved model:
# with early stopping's restore_best_weights, the kept weights, not the last epoch's.
VAL_NLL, VAL_ECE, VAL_BRIER = "val/nll", "val/ece", "val/brier"
VAL_ACCURACY = "val/accuracy"  # the saved model's; curves/val_accuracy is each epoch's, as trained
# The training curves, one point per epoch: column of reports/history.csv -> MLflow name. The
# loss is the training loss as configured (focal or label-smoothed when train.loss says so);
# evaluate's NLL is test/nll and val/nll.
CURVES = {
    "loss": "curves/loss",
    "accuracy": "curves/accuracy",
    "val_loss": "curves/val_loss",
    "val_accuracy": "curves/val_accuracy",
}
HISTORY_COLUMNS = ("epoch", *CURVES)  # reports/history.csv: one row per epoch
TRAIN_SECONDS = "train/seconds"

# What a sweep job returns to the sweeper, and which way is better. Validation metrics only:
# the test split is for reporting the chosen model, never for choosing it.
OBJECTIVES = {VAL_NLL: "minimize", VAL_ECE: "minimize", VAL_BRIER: "minimize"}
DEFAULT_OBJECTIVE = VAL_NLL

# The few numbers people compare runs by: reports/metrics.json (DVC's metrics: `dvc exp
# show`, `dvc metrics show`), the sweep summary's columns and the stages' summary lines.
HEADLINE = {
    "accuracy": test("accuracy"),
    "nll": test("nll"),
    "ece": test("ece"),
    "ece_ts": test("ece", scaled=True),
    "temperature": TEMPERATURE,
    "val_nll": VAL_NLL,
}


def short(name: str) -> str:
    """A column name for a metric: val/ece -> val_ece (HEADLINE's own where it has one)."""
    for key, full in HEADLINE.items():
        if full == name:
            return key
    return name.replace("/", "_")


def evaluate_names(with_intervals: bool = True) -> list[str]:
    """Every name evaluate writes, in a stable order."""
    names = []
    for scaled in (False, True):
        names += [test(k, scaled) for k in CALIBRATION]
        if with_intervals:
            names += [test_ci(k, end, scaled) for k in CALIBRATION for end in CI_ENDS]
    return [*names, TEMPERATURE, TEMPERATURE_AT_BOUND, VAL_ACCURACY, VAL_NLL, VAL_ECE, VAL_BRIER]
