"""evaluate's claims: the temperature comes from the validation split, the test split is only
measured, and the report warns when the fit stopped at its bound."""

from __future__ import annotations

import numpy as np
import pytest

from softmaxlab.core import calibration
from softmaxlab.core import metrics as names
from softmaxlab.core.config import EvaluateConfig
from softmaxlab.stages import evaluate, report


def split(t_true: float, seed: int, n: int = 4000):
    """Logits whose labels are drawn from softmax(logits / t_true): calibrated at T = t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, size=(n, 4))
    p = calibration.softmax(z, t_true)
    y = (rng.random(n)[:, None] > p.cumsum(axis=1)).sum(axis=1)
    return z, calibration.softmax(z), y


def test_temperature_is_fitted_on_the_validation_split_not_the_test_split():
    val, test = split(2.0, seed=1), split(0.5, seed=2)
    result = evaluate.evaluate(val, test, EvaluateConfig(n_bootstrap=0), seed=0)
    assert result.temperature == pytest.approx(2.0, rel=0.1)  # the test split's would be 0.5
    assert result.metrics[names.TEMPERATURE] == result.temperature
    # The validation metrics are the validation split's; the test metrics the test split's.
    assert result.metrics[names.VAL_NLL] == pytest.approx(calibration.nll_from_logits(val[0], val[2]))
    assert result.metrics[names.test("nll")] == pytest.approx(calibration.nll_from_logits(test[0], test[2]))
    scaled = calibration.nll_from_logits(test[0], test[2], result.temperature)
    assert result.metrics[names.test("nll", scaled=True)] == pytest.approx(scaled)


def test_evaluate_writes_every_declared_name_and_nothing_else():
    result = evaluate.evaluate(split(1.0, 3, 300), split(1.0, 4, 300), EvaluateConfig(n_bootstrap=20), seed=0)
    assert set(result.metrics) == set(names.evaluate_names())
    assert set(evaluate.dvc_metrics(result.metrics)) == set(names.HEADLINE)


def test_report_warns_when_the_temperature_is_at_its_bound(trained):
    cfg, m = trained["cfg"], trained["metrics"]
    page = (trained["root"] / cfg.paths.report).read_text()
    warned = "Temperature at its bound" in page
    assert warned == bool(m[names.TEMPERATURE_AT_BOUND])  # the real run's page agrees with its fit
    for at_bound in (0.0, 1.0):
        html = report.render(cfg, {**m, names.TEMPERATURE_AT_BOUND: at_bound}, {}, [])
        assert ("Temperature at its bound" in html) == bool(at_bound)
