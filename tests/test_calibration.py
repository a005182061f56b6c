"""softmaxlab.core.calibration against hand-worked values, scikit-learn and its own scalar paths."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

from softmaxlab.core import calibration as cal
from softmaxlab.core.calibration import CalibrationInputError

EDGES = ["bin_lower", "bin_upper"]


def two_class(p0, labels):
    """Rows [p, 1 - p] and int labels."""
    p0 = np.asarray(p0, dtype=np.float64)
    return np.column_stack([p0, 1 - p0]), np.asarray(labels)


def top_label(conf, correct):
    """Two-class rows whose top-label confidence is conf (> 0.5), right where correct is 1."""
    conf = np.asarray(conf, dtype=np.float64)
    return two_class(conf, 1 - np.asarray(correct))  # predicted class 0, so label 0 is right


def random_logits(n=300, k=4, seed=0, sharpen=2.0):
    """Over-confident predictions: labels drawn from softmax(z), reported as z sharpened."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k))
    labels = sample_labels(cal.softmax(logits), rng)
    return logits * sharpen, labels


def random_case(n=300, k=4, seed=0, sharpen=2.0):
    """random_logits as probabilities."""
    z, y = random_logits(n, k, seed, sharpen)
    return cal.softmax(z), y


def sample_labels(p, rng):
    """One label per row drawn from that row's distribution (inverse CDF)."""
    return (rng.random(len(p))[:, None] > p.cumsum(axis=1)).sum(axis=1)


# -- hand-worked metrics -------------------------------------------------------------------
def test_perfectly_calibrated():
    p, y = two_class([0.8] * 10, [0] * 8 + [1] * 2)  # confidence 0.8, 8 of 10 right
    assert cal.accuracy(p, y) == pytest.approx(0.8)
    assert cal.ece(p, y) == pytest.approx(0.0, abs=1e-12)
    assert cal.mce(p, y) == pytest.approx(0.0, abs=1e-12)
    assert cal.classwise_ece(p, y) == pytest.approx(0.0, abs=1e-12)
    assert cal.nll(p, y) == pytest.approx(-(8 * np.log(0.8) + 2 * np.log(0.2)) / 10)
    # right rows: 0.2^2 + 0.2^2 = 0.08; wrong rows: 0.8^2 + 0.8^2 = 1.28
    assert cal.brier(p, y) == pytest.approx((8 * 0.08 + 2 * 1.28) / 10)


def test_always_over_confident():
    p, y = two_class([0.9] * 10, [0, 1] * 5)  # confidence 0.9, half right
    assert cal.accuracy(p, y) == pytest.approx(0.5)
    assert cal.ece(p, y) == pytest.approx(0.4)
    assert cal.mce(p, y) == pytest.approx(0.4)  # one non-empty bin; empty ones are no NaN
    assert cal.adaptive_ece(p, y, n_bins=2) == pytest.approx(0.4)  # either split: |0.9 - 0.5|
    # class 0: p = 0.9 vs frequency 0.5; class 1: p = 0.1 vs frequency 0.5
    assert cal.classwise_ece(p, y) == pytest.approx(0.4)


def test_uniform_predictions():
    k = 4
    p = np.full((8, k), 1 / k)
    y = np.array([0, 1, 2, 3, 0, 0, 1, 2])  # argmax is class 0 everywhere: 3 of 8 right
    assert cal.accuracy(p, y) == pytest.approx(3 / 8)
    assert cal.nll(p, y) == pytest.approx(np.log(k))
    assert cal.brier(p, y) == pytest.approx(1 - 1 / k)
    assert cal.ece(p, y) == pytest.approx(abs(1 / k - 3 / 8))
    assert cal.mce(p, y) == pytest.approx(abs(1 / k - 3 / 8))


def test_single_sample():
    p, y = two_class([0.7], [1])  # confident in class 0, truth is class 1
    assert cal.accuracy(p, y) == 0.0
    assert cal.nll(p, y) == pytest.approx(-np.log(0.3))
    assert cal.brier(p, y) == pytest.approx(2 * 0.7**2)
    for metric in (cal.ece, cal.mce, cal.adaptive_ece, cal.classwise_ece):
        assert metric(p, y) == pytest.approx(0.7), metric.__name__
    z = np.log(p)
    assert cal.bootstrap_ci(z, y, n_resamples=20)["ece"] == pytest.approx((0.7, 0.7))
    assert cal.summarize(z, y, n_resamples=20)[1]["ece_adaptive"] == pytest.approx((0.7, 0.7))


def test_confidence_exactly_one():
    p, y = two_class([1.0, 1.0], [0, 1])  # one certain and right, one certain and wrong
    assert cal.ece(p, y) == pytest.approx(0.5)
    assert cal.mce(p, y) == pytest.approx(0.5)
    assert cal.nll(p, y) == np.inf  # not clipped: a certain, wrong prediction costs everything
    assert cal.brier(p, y) == pytest.approx(1.0)  # the wrong row scores the maximum, 2
    table = cal.reliability_table(p, y, n_bins=5)
    assert table["count"].tolist() == [0, 0, 0, 0, 2]


def test_bin_edges_are_lo_exclusive_hi_inclusive():
    values = [0.0, 0.2, 0.21, 0.4, 0.6, 0.8, 1.0]
    p, y = two_class(values, [0] * len(values))
    table = cal.classwise_reliability(p, y, n_bins=5)
    class0 = table[table["class"] == 0]
    # (0, .2]: 0 and 0.2; (.2, .4]: 0.21, 0.4; then 0.6, 0.8 and 1.0 close their bins
    assert class0["count"].tolist() == [2, 2, 1, 1, 1]
    assert class0["bin_upper"].tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert class0["confidence"].tolist() == pytest.approx([0.1, 0.305, 0.6, 0.8, 1.0])


def test_top_label_confidence_on_an_inner_edge():
    p = np.full((1, 5), 0.2)  # uniform over 5 classes: the top confidence is exactly 0.2
    table = cal.reliability_table(p, [0], n_bins=5)
    assert table["count"].tolist() == [1, 0, 0, 0, 0]
    assert (table.loc[0, "bin_lower"], table.loc[0, "bin_upper"]) == (0.0, 0.2)


def test_adaptive_ece_equal_mass_bins():
    conf = [0.6, 0.9, 0.7, 0.95, 0.52, 0.8, 0.55]
    correct = [1, 1, 0, 1, 1, 0, 0]
    p, y = top_label(conf, correct)
    # sorted: .52 .55 .6 | .7 .8 | .9 .95 (array_split puts the extra sample first)
    # |(.52 + .55 + .6) - 2| + |(.7 + .8) - 0| + |(.9 + .95) - 2| = .33 + 1.5 + .15
    assert cal.adaptive_ece(p, y, n_bins=3) == pytest.approx(1.98 / 7)
    # more bins than samples: one sample per bin, so the mean |correct - confidence|
    expected = np.mean(np.abs(np.array(correct) - np.array(conf)))
    assert cal.adaptive_ece(p, y, n_bins=50) == pytest.approx(expected)


def test_classwise_ece_two_classes():
    # p(class 1) = .2 .4 .7 .9 with labels 0 1 1 1; bins (0, .5], (.5, 1]
    p, y = two_class([0.8, 0.6, 0.3, 0.1], [0, 1, 1, 1])
    # class 1: |(.2 + .4) - 1| + |(.7 + .9) - 2| = .8
    # class 0: |(.3 + .1) - 0| + |(.8 + .6) - 1| = .8
    assert cal.classwise_ece(p, y, n_bins=2) == pytest.approx(0.8 / 4)
    # the top label is right 3 times in 4 at mean confidence .75: ECE misses the class error
    assert cal.ece(p, y, n_bins=2) == pytest.approx(0.0, abs=1e-12)


def test_classwise_ece_counts_an_absent_class():
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2]])
    y = np.array([0, 1])  # class 2 never occurs
    # per class, bins (0, .5], (.5, 1]: (.2 + .3) / 2, (.2 + .4) / 2, (.1 + .2 - 0) / 2
    assert cal.classwise_ece(p, y, n_bins=2) == pytest.approx((0.25 + 0.3 + 0.15) / 3)
    table = cal.classwise_reliability(p, y, n_bins=2)
    absent = table[table["class"] == 2]
    assert absent["count"].tolist() == [2, 0]
    assert absent["frequency"].iloc[0] == 0.0
    assert absent["confidence"].iloc[0] == pytest.approx(0.15)
    assert np.isnan(absent["frequency"].iloc[1])


def test_reliability_table_hand_values():
    p, y = top_label([0.55, 0.6, 0.75, 0.8, 1.0], [1, 0, 1, 1, 0])
    table = cal.reliability_table(p, y, n_bins=5)
    assert list(table.columns) == [*EDGES, "count", "confidence", "accuracy", "gap"]
    assert table["bin_lower"].tolist() == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert table["count"].tolist() == [0, 0, 2, 2, 1]
    assert table["confidence"].iloc[2:].tolist() == pytest.approx([0.575, 0.775, 1.0])
    assert table["accuracy"].iloc[2:].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert table["gap"].iloc[2:].tolist() == pytest.approx([-0.075, 0.225, -1.0])
    assert table.iloc[:2][["confidence", "accuracy", "gap"]].isna().all().all()
    assert cal.ece(p, y, n_bins=5) == pytest.approx((0.15 + 0.45 + 1.0) / 5)
    assert cal.mce(p, y, n_bins=5) == pytest.approx(1.0)


def test_reliability_table_agrees_with_ece():
    p, y = random_case()
    table = cal.reliability_table(p, y)
    assert len(table) == 15 and table["count"].sum() == len(y)
    full = table[table["count"] > 0]
    weighted = (full["count"] / len(y) * full["gap"].abs()).sum()
    assert weighted == pytest.approx(cal.ece(p, y))
    assert full["gap"].abs().max() == pytest.approx(cal.mce(p, y))

    long = cal.classwise_reliability(p, y)
    assert list(long.columns) == ["class", *EDGES, "count", "confidence", "frequency"]
    assert (long.groupby("class")["count"].sum() == len(y)).all()


# -- cross-checks against scikit-learn -----------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 6])
def test_against_sklearn(k):
    p, y = random_case(n=200, k=k, seed=k)
    if k > 2:
        y[y == k - 1] = 0  # leave the last class out of the labels: log_loss needs labels=
    assert cal.accuracy(p, y) == pytest.approx(accuracy_score(y, p.argmax(axis=1)))
    assert cal.nll(p, y) == pytest.approx(log_loss(y, p, labels=range(k)), rel=1e-9)
    if k == 2:  # the multiclass score counts each of the two classes' equal errors once
        assert cal.brier(p, y) == pytest.approx(2 * brier_score_loss(y, p[:, 1]), rel=1e-12)


# -- softmax -------------------------------------------------------------------------------
def test_softmax_is_stable_and_matches_scipy():
    z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    p = cal.softmax(z)
    assert p.dtype == np.float64 and np.isfinite(p).all()
    assert p == pytest.approx(scipy_softmax(z.astype(np.float64), axis=1))
    assert cal.log_softmax(z)[0] == pytest.approx([0.0, -1000.0, -2000.0])
    assert cal.softmax([[0.0, np.log(3.0)]])[0] == pytest.approx([0.25, 0.75])
    assert cal.softmax(z, 2.5) == pytest.approx(scipy_softmax(z.astype(np.float64) / 2.5, axis=1))


# -- bootstrap -----------------------------------------------------------------------------
SCALAR = {
    "accuracy": cal.accuracy, "nll": cal.nll, "brier": cal.brier, "ece": cal.ece, "mce": cal.mce,
    "ece_adaptive": cal.adaptive_ece, "ece_classwise": cal.classwise_ece,
}  # fmt: skip


def loop_metrics(p, y, idx, n_bins):
    """Each metric of each resample, by the scalar functions on the resampled arrays."""
    binned = {"ece", "mce", "ece_adaptive", "ece_classwise"}
    return {
        name: np.array([f(p[i], y[i], n_bins) if name in binned else f(p[i], y[i]) for i in idx])
        for name, f in SCALAR.items()
    }


def test_bootstrap_vectorised_equals_loop_for_every_metric():
    z, y = random_logits(n=120, k=3, seed=5)
    p = cal.softmax(z)
    idx = np.random.default_rng(1).integers(0, len(y), size=(200, len(y)))
    fast = cal._Terms(p, cal.log_softmax(z), y, n_bins=10).resampled(cal._draw_counts(idx, len(y)))
    slow = loop_metrics(p, y, idx, n_bins=10)
    assert fast.keys() == slow.keys() == set(cal.METRICS)
    for name in slow:  # weighted sums, not means of gathered values: equal to rounding
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-10, atol=1e-14, err_msg=name)


def test_bootstrap_ci_is_the_percentile_interval_of_seeded_resamples():
    z, y = random_logits(n=80, k=3, seed=6)
    got = cal.bootstrap_ci(z, y, n_bins=10, n_resamples=150, ci=0.9, seed=3)
    idx = np.random.default_rng(3).integers(0, len(y), size=(150, len(y)))
    for name, values in loop_metrics(cal.softmax(z), y, idx, n_bins=10).items():
        assert got[name] == pytest.approx(tuple(np.percentile(values, [5, 95])), rel=1e-10, abs=1e-14), name


def test_bootstrap_deterministic_and_covers_the_estimate():
    z, y = random_logits(n=500, k=4, seed=7)
    first = cal.bootstrap_ci(z, y, n_resamples=300, seed=11)
    assert first == cal.bootstrap_ci(z, y, n_resamples=300, seed=11)
    assert first != cal.bootstrap_ci(z, y, n_resamples=300, seed=12)
    point, _ = cal.summarize(z, y, n_resamples=0)
    assert first.keys() == point.keys() == set(cal.METRICS)
    for name, (lo, hi) in first.items():
        assert lo < point[name] < hi, name
        assert all(isinstance(v, float) for v in (lo, hi))


def test_paired_bootstrap_gives_each_array_its_own_intervals_from_shared_draws():
    z, y = random_logits(n=300, k=4, seed=9)
    w = z / 0.7  # the same predictions, sharpened
    both = cal.paired_bootstrap_ci([z, w], y, n_bins=10, n_resamples=250, seed=5)
    assert both == [cal.bootstrap_ci(x, y, n_bins=10, n_resamples=250, seed=5) for x in (z, w)]
    assert both[0] != both[1]
    paired = cal.summarize_paired([z, w], y, n_bins=10, n_resamples=250, seed=5)
    assert paired == [cal.summarize(x, y, n_bins=10, n_resamples=250, seed=5) for x in (z, w)]
    with pytest.raises(CalibrationInputError, match=r"labels have shape \(300,\), expected \(299,\)"):
        cal.paired_bootstrap_ci([z, w[:-1]], y)


# -- NLL from logits -----------------------------------------------------------------------
def test_nll_is_computed_from_logits_without_clipping():
    # Confidently wrong by a logit margin of 100: the true class has log-probability -100.
    # Probabilities would round it to 0 (and a clip at 1e-15 would report 34.5).
    z, y = np.array([[0.0, 100.0], [50.0, 0.0]]), np.array([0, 0])
    assert cal.nll_from_logits(z, y) == pytest.approx((100.0 + np.log1p(np.exp(-100.0)) + np.exp(-50.0)) / 2)
    values, intervals = cal.summarize(z, y, n_resamples=50)
    assert values["nll"] == pytest.approx(50.0)
    assert intervals["nll"][1] == pytest.approx(100.0)  # the resample drawing the wrong row twice
    # The temperature fit minimises the same NLL: at its optimum nudging T only hurts.
    zz, yy = random_logits(n=2000, k=3, seed=3)
    t = cal.fit_temperature(zz, yy)
    assert cal.nll_from_logits(zz, yy, t) < min(cal.nll_from_logits(zz, yy, t * f) for f in (0.95, 1.05))


# -- temperature scaling -------------------------------------------------------------------
@pytest.mark.parametrize("t_true", [2.5, 1.0])
def test_fit_temperature_recovers_the_true_temperature(t_true):
    rng = np.random.default_rng(2017)
    z = rng.normal(0.0, 3.0, size=(20000, 4))
    y = sample_labels(cal.softmax(z, t_true), rng)
    t = cal.fit_temperature(z, y)
    assert t == pytest.approx(t_true, rel=0.05)
    # the fitted T is the NLL minimum: nudging it either way only hurts
    for other in (t * 0.9, t * 1.1):
        assert cal.nll_from_logits(z, y, t) < cal.nll_from_logits(z, y, other)


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        ([[1.0, np.inf]], [0], "inf at row 0, column 1"),
        ([1.0, 2.0], [0], r"shape \(2,\)"),
        ([[1.0, 2.0]], [2], "label 2 at index 0"),
        ([[1.0, 2.0], [0.0, 0.0]], [0], r"shape \(1,\)"),
    ],
)
def test_fit_temperature_rejects_bad_input(logits, labels, match):
    with pytest.raises(CalibrationInputError, match=match):
        cal.fit_temperature(logits, labels)


# -- summary -------------------------------------------------------------------------------
def test_summarize_gives_every_metric_with_its_interval():
    z, y = random_logits(seed=8)
    p = cal.softmax(z)
    values, intervals = cal.summarize(z, y, n_bins=10, n_resamples=100, seed=4)
    assert list(values) == list(cal.METRICS) and set(intervals) == set(cal.METRICS)
    assert all(type(v) is float for v in values.values())
    assert values["ece"] == cal.ece(p, y, n_bins=10)
    assert values["mce"] == cal.mce(p, y, n_bins=10)
    assert values["ece_adaptive"] == cal.adaptive_ece(p, y, n_bins=10)
    assert values["ece_classwise"] == cal.classwise_ece(p, y, n_bins=10)
    assert values["nll"] == pytest.approx(cal.nll(p, y), rel=1e-12)
    assert intervals == cal.bootstrap_ci(z, y, n_bins=10, n_resamples=100, seed=4)
    for name, (lo, hi) in intervals.items():
        assert lo <= values[name] <= hi, name
    assert cal.summarize(z, y, n_bins=10, n_resamples=0) == (values, {})


def test_import_is_light():
    heavy = {"pandas", "scipy.optimize", "tensorflow", "matplotlib", "mlflow"}
    code = f"import sys, softmaxlab.core.calibration; print(sorted({heavy!r} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- input errors --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        ([0.5, 0.5], [0, 1], r"2-D .* shape \(2,\)"),
        ([[1.0], [1.0]], [0, 0], "k=1"),
        (np.empty((0, 3)), [], "0 rows"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, 1, 1], r"labels have shape \(3,\), expected \(2,\)"),
        ([["a", "b"]], [0], "numeric"),
        ([[0.5, 0.5], [np.nan, 0.5]], [0, 1], "nan at row 1, column 0"),
        ([[0.5, 0.5], [0.5, -np.inf]], [0, 1], "-inf at row 1, column 1"),
        ([[1.2, -0.2]], [0], r"probability 1.2 at row 0, column 0 not in \[0, 1\]"),
        ([[0.5, 0.5], [0.6, 0.6], [0.5, 0.45]], [0, 1, 0], "row 1 sums to 1.2"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, 0.5], "got 0.5 at index 1"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, np.nan], "got nan at index 1"),
        ([[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "dtype <U1: 'a'"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, 2], r"label 2 at index 1 is outside 0..1"),
        ([[0.5, 0.5], [0.5, 0.5]], [-1, 0], "label -1 at index 0"),
    ],
)
def test_check_inputs_rejects(probs, labels, match):
    with pytest.raises(CalibrationInputError, match=match):
        cal.check_inputs(probs, labels)


def test_check_inputs_normalises_types_and_tolerance():
    p, y = cal.check_inputs(np.array([[0.25, 0.7505]], dtype=np.float32), [1.0])
    assert (p.dtype, y.dtype, y.tolist()) == (np.float64, np.int64, [1])
    with pytest.raises(CalibrationInputError, match="within 0.0001"):
        cal.check_inputs([[0.25, 0.7505]], [1], atol=1e-4)
    assert issubclass(CalibrationInputError, ValueError)


@pytest.mark.parametrize(
    "metric",
    [
        cal.accuracy,
        cal.nll,
        cal.brier,
        cal.ece,
        cal.mce,
        cal.adaptive_ece,
        cal.classwise_ece,
        cal.reliability_table,
        cal.classwise_reliability,
    ],
)
def test_every_metric_rejects_unnormalised_rows(metric):
    with pytest.raises(CalibrationInputError, match="row 0 sums to 0.9"):
        metric([[0.6, 0.3], [0.5, 0.5]], [0, 1])


def test_n_bins_must_be_positive():
    with pytest.raises(ValueError, match="n_bins"):
        cal.ece([[0.5, 0.5]], [0], n_bins=0)


def test_bad_calibration_input_is_a_user_error_and_still_a_value_error():
    # The stages' entry point turns a UserError into one line and exit code 2.
    from softmaxlab.core.calibration import CalibrationInputError, check_inputs
    from softmaxlab.core.errors import UserError

    with pytest.raises(UserError, match="sum to 1") as err:
        check_inputs(np.array([[0.2, 0.2], [0.5, 0.5]]), np.array([0, 1]))
    assert isinstance(err.value, CalibrationInputError) and isinstance(err.value, ValueError)
