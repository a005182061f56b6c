# Over 400 lines: metrics, bootstrap and temperature fit share the private bins and per-sample terms.
"""Calibration of class probabilities: NumPy/SciPy functions over probs (n, k) and labels (n,).

Binning convention (Guo et al. 2017): n_bins equal-width bins (lo, hi] over [0, 1], edges
i / n_bins. A confidence exactly on an inner edge belongs to the bin it closes (0.2 with 5 bins
is in (0, 0.2]), exactly 0 goes to the first bin and exactly 1 to the last. Empty bins
contribute nothing to ECE, MCE or the class-wise ECE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from softmaxlab.core.checks import distribution_fault, label_outside
from softmaxlab.core.errors import UserError

if TYPE_CHECKING:  # pandas is imported only by the two table functions: it costs ~0.5 s
    import pandas as pd


class CalibrationInputError(UserError, ValueError):
    """Probabilities, logits or labels that no metric can be computed from: bad input, so a
    user error (one line, exit 2) for the stages, and still a ValueError for library callers."""


def _as_matrix(a, what: str) -> np.ndarray:
    """A finite float64 (n, k) array with n >= 1 and k >= 2."""
    try:
        m = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CalibrationInputError(f"{what} must be a numeric (n, k) array: {e}") from None
    if m.ndim != 2:
        raise CalibrationInputError(f"{what} must be a 2-D (n, k) array, got shape {m.shape}")
    n, k = m.shape
    if k < 2:
        raise CalibrationInputError(f"{what} need at least 2 classes, got k={k}")
    if n == 0:
        raise CalibrationInputError(f"no samples: {what} have 0 rows")
    bad = ~np.isfinite(m)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise CalibrationInputError(f"{what} must be finite; got {m[i, j]} at row {i}, column {j}")
    return m


def _as_labels(labels, n: int, k: int) -> np.ndarray:
    """int64 (n,) labels in [0, k); integral floats (3.0) are accepted, 0.5 is not."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise CalibrationInputError(f"labels have shape {y.shape}, expected ({n},) to match")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating):
            first = y.tolist()[0]
            raise CalibrationInputError(f"labels must be integers, got dtype {y.dtype}: {first!r}")
        bad = ~(y == np.round(y))  # NaN is caught here too
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CalibrationInputError(f"labels must be integers; got {y[i]} at index {i}")
    y = y.astype(np.int64)
    i = label_outside(y, k)
    if i is not None:
        raise CalibrationInputError(f"label {y[i]} at index {i} is outside 0..{k - 1}")
    return y


def check_inputs(probs, labels, atol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (n, k) probabilities and int64 (n,) labels, or CalibrationInputError."""
    p = _as_matrix(probs, "probabilities")  # finite: NaN and infinities are refused there
    fault = distribution_fault(p, atol)
    if fault is not None:
        i, j = fault
        if j is not None:
            raise CalibrationInputError(f"probability {p[i, j]} at row {i}, column {j} not in [0, 1]")
        raise CalibrationInputError(
            f"each row must sum to 1 (within {atol}); row {i} sums to {p[i].sum():.6g}"
        )
    return p, _as_labels(labels, *p.shape)


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)  # exp never overflows, and the max term is exp(0)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, temperature))


# -- per-sample quantities, shared by the metrics and the vectorised bootstrap --------------
def _edges(n_bins: int) -> np.ndarray:
    """i / n_bins, not linspace: 3 / 5 is the double 0.6, linspace's is 0.6000000000000001."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    return np.arange(n_bins + 1) / n_bins


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each value for bins (lo, hi], 0 in bin 0: searchsorted against the edges the
    tables report, not ceil(conf * n_bins), which puts 0.6 (0.6 * 5 = 3.0000000000000004) in
    the wrong bin."""
    return np.searchsorted(_edges(n_bins)[1:-1], conf, side="left")


def _top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidence of the predicted class and whether it is right (as 0.0 / 1.0)."""
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def _nll_terms(log_p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log p of the true class from log-probabilities (log_softmax of the logits): exact
    however confident the model is, where -log(softmax) loses everything below 1e-16."""
    return -log_p[np.arange(len(y)), y]


def _brier_terms(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return ((p - onehot) ** 2).sum(axis=1)


def _binned(value: np.ndarray, target: np.ndarray, n_bins: int):
    """Per bin: count, summed value and summed target."""
    b = _bin_index(value, n_bins)
    count = np.bincount(b, minlength=n_bins)
    return count, np.bincount(b, value, n_bins), np.bincount(b, target, n_bins)


def _binned_error(value: np.ndarray, target: np.ndarray, n_bins: int) -> float:
    """sum_b |B_b| / n * |mean target - mean value| = sum_b |sum target - sum value| / n."""
    _, v, t = _binned(value, target, n_bins)
    return float(np.abs(v - t).sum() / len(value))


# -- metrics -------------------------------------------------------------------------------
def accuracy(probs, labels) -> float:
    p, y = check_inputs(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def nll(probs, labels) -> float:
    """Mean negative log-probability of the true class, not clipped: a zero probability for
    a true class is an infinite loss. From logits, use nll_from_logits (exact)."""
    p, y = check_inputs(probs, labels)
    with np.errstate(divide="ignore"):
        return float(_nll_terms(np.log(p), y).mean())


def nll_from_logits(logits, labels, temperature: float = 1.0) -> float:
    """Mean NLL of softmax(logits / temperature) through log-softmax: what the temperature
    fit minimises and what the reports show. A confidently wrong prediction costs its full
    logit margin, not a clip constant."""
    z = _as_matrix(logits, "logits")
    return float(_nll_terms(log_softmax(z, temperature), _as_labels(labels, *z.shape)).mean())


def brier(probs, labels) -> float:
    """Multiclass Brier score: mean over samples of the summed squared error, in [0, 2]."""
    p, y = check_inputs(probs, labels)
    return float(_brier_terms(p, y).mean())


def ece(probs, labels, n_bins: int = 15) -> float:
    """Top-label expected calibration error, equal-width bins."""
    p, y = check_inputs(probs, labels)
    return _binned_error(*_top_label(p, y), n_bins)


def mce(probs, labels, n_bins: int = 15) -> float:
    """Maximum calibration error: the worst non-empty bin's |accuracy - confidence|."""
    p, y = check_inputs(probs, labels)
    count, conf, hits = _binned(*_top_label(p, y), n_bins)
    full = count > 0
    return float(np.max(np.abs(hits[full] - conf[full]) / count[full]))


def adaptive_ece(probs, labels, n_bins: int = 15) -> float:
    """ECE with equal-mass bins: samples sorted by confidence (stable, so ties keep their
    order), split by np.array_split into min(n_bins, n) groups."""
    p, y = check_inputs(probs, labels)
    conf, hit = _top_label(p, y)
    order = np.argsort(conf, kind="stable")
    groups = np.array_split(order, min(n_bins, len(y)))
    return float(sum(abs(hit[g].sum() - conf[g].sum()) for g in groups) / len(y))


def classwise_ece(probs, labels, n_bins: int = 15) -> float:
    """Kull et al. 2019: the binned calibration error of each class's probability against that
    class's indicator, averaged over all k classes (absent ones too)."""
    p, y = check_inputs(probs, labels)
    k = p.shape[1]
    errors = [_binned_error(p[:, j], (y == j).astype(np.float64), n_bins) for j in range(k)]
    return float(sum(errors) / k)


def reliability_table(probs, labels, n_bins: int = 15) -> pd.DataFrame:
    """One row per bin: count, mean confidence, accuracy and gap = accuracy - confidence
    (NaN for empty bins)."""
    import pandas as pd

    p, y = check_inputs(probs, labels)
    count, conf, hits = _binned(*_top_label(p, y), n_bins)
    edges = _edges(n_bins)
    with np.errstate(invalid="ignore"):  # 0 / 0 in empty bins is the NaN we want
        mean_conf, acc = conf / count, hits / count
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "count": count,
            "confidence": mean_conf,
            "accuracy": acc,
            "gap": acc - mean_conf,
        }
    )


def classwise_reliability(probs, labels, n_bins: int = 15) -> pd.DataFrame:
    """Long format, one row per (class, bin): mean predicted p_j and observed frequency of j."""
    import pandas as pd

    p, y = check_inputs(probs, labels)
    edges = _edges(n_bins)
    frames = []
    for j in range(p.shape[1]):
        count, conf, hits = _binned(p[:, j], (y == j).astype(np.float64), n_bins)
        with np.errstate(invalid="ignore"):
            conf, freq = conf / count, hits / count
        frame = {"class": j, "bin_lower": edges[:-1], "bin_upper": edges[1:], "count": count}
        frames.append(pd.DataFrame({**frame, "confidence": conf, "frequency": freq}))
    return pd.concat(frames, ignore_index=True)


# -- uncertainty ---------------------------------------------------------------------------
_BOOTSTRAP_CHUNK = 4_000_000  # index-matrix elements per chunk


def _draw_counts(idx: np.ndarray, m: int) -> np.ndarray:
    """(resamples, m) float64: how often each of m samples is drawn in each row of idx."""
    n_resamples = idx.shape[0]
    rows = (np.arange(n_resamples)[:, None] * m + idx).ravel()
    return np.bincount(rows, minlength=n_resamples * m).reshape(n_resamples, m).astype(np.float64)


class _Terms:
    """Per-sample quantities of one set of predictions, arranged so that every metric of a
    resample follows from how often the resample draws each sample (`_draw_counts`).

    A resample only changes how often each sample counts, so every metric but adaptive ECE
    is a function of weighted sums of per-sample terms: one product of the draw counts
    (resamples x samples) with a sparse terms matrix (samples x [hit, brier, nll, then per
    top-label bin the gap confidence - hit and a 1, then per class and bin the gap p_j -
    [y = j]]), each sample reading only its own bins. Equal-mass bins (adaptive ECE) are cut
    at fixed positions of the resample sorted by confidence, read off cumulative sums.
    """

    def __init__(self, p: np.ndarray, log_p: np.ndarray, y: np.ndarray, n_bins: int):
        from scipy import sparse  # scipy.optimize (the temperature fit) imports it anyway

        m, k = p.shape
        conf, hit = _top_label(p, y)
        self.n_bins, self.k = n_bins, k
        rows = np.arange(m)
        top = _bin_index(conf, n_bins)
        cols = [np.full(m, 0), np.full(m, 1), np.full(m, 2), 3 + top, 3 + n_bins + top]
        vals = [hit, _brier_terms(p, y), _nll_terms(log_p, y), conf - hit, np.ones(m)]
        for j in range(k):
            cols.append(3 + 2 * n_bins + j * n_bins + _bin_index(p[:, j], n_bins))
            vals.append(p[:, j] - (y == j))
        shape = (m, 3 + (2 + k) * n_bins)
        # Transposed, so the product is a sparse (terms x samples) times the dense counts.
        self.terms_t = sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(cols), np.tile(rows, len(cols)))), shape=shape[::-1]
        )
        self.order = np.argsort(conf, kind="stable")
        self.gap = (conf - hit)[self.order]

    def resampled(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric of each resample (a row of counts), equal to the scalar functions'
        on that resample to rounding (adaptive ECE: where no two samples tie in confidence)."""
        m, nb = counts.shape[1], self.n_bins
        sums = np.asarray(self.terms_t @ counts.T).T
        gaps, drawn = sums[:, 3 : 3 + nb], sums[:, 3 + nb : 3 + 2 * nb]
        with np.errstate(divide="ignore", invalid="ignore"):  # bins this resample left empty
            worst = np.nanmax(np.where(drawn > 0, np.abs(gaps) / drawn, np.nan), axis=1)
        classwise = np.abs(sums[:, 3 + 2 * nb :]).sum(axis=1)
        return {
            "accuracy": sums[:, 0] / m,  # a resample draws as many as there are samples
            "nll": sums[:, 2] / m,
            "brier": sums[:, 1] / m,
            "ece": np.abs(gaps).sum(axis=1) / m,
            "mce": worst,
            "ece_adaptive": self._adaptive(counts[:, self.order]) / m,
            "ece_classwise": classwise / (m * self.k),
        }

    def _adaptive(self, c: np.ndarray) -> np.ndarray:
        """Summed |gap| over equal-mass bins: a resample sorted by confidence is each sample
        repeated as often as it is drawn, split as np.array_split splits m items."""
        rows, m = c.shape
        groups = min(self.n_bins, m)
        sizes = np.full(groups, m // groups)
        sizes[: m % groups] += 1
        cuts = np.cumsum(sizes)[:-1]  # positions in the resample's sorted sequence
        drawn = np.cumsum(c, axis=1)  # in [0, m], non-decreasing along each row
        summed = np.cumsum(c * self.gap, axis=1)
        # One searchsorted for all rows: offset each row past the previous one's values.
        offset = np.arange(rows)[:, None] * (m + 1)
        flat = np.searchsorted((drawn + offset).ravel(), (cuts + offset).ravel())
        i = flat.reshape(rows, len(cuts)) - np.arange(rows)[:, None] * m
        r = np.arange(rows)[:, None]
        # The prefix of length P ends inside sample i's copies: take all of them, give back
        # the copies past P.
        prefix = summed[r, i] - (drawn[r, i] - cuts) * self.gap[i]
        edges = np.column_stack([np.zeros(rows), prefix, summed[:, -1]])
        return np.abs(np.diff(edges, axis=1)).sum(axis=1)


def _check_logits(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z = _as_matrix(logits, "logits")
    return z, _as_labels(labels, *z.shape)


def bootstrap_ci(
    logits, labels, n_bins: int = 15, n_resamples: int = 1000, ci: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for every metric summarize() reports (METRICS).

    Resamples are rows of default_rng(seed).integers(0, n, (rows, n)), drawn in chunks of
    rows so the index matrix stays near 32 MB however large n is (one (1000, 250000) matrix
    would be 2 GB); the metrics of each resample equal the scalar functions' on it.
    """
    return paired_bootstrap_ci([logits], labels, n_bins, n_resamples, ci, seed)[0]


def paired_bootstrap_ci(
    logits_list, labels, n_bins: int = 15, n_resamples: int = 1000, ci: float = 0.95, seed: int = 0
) -> list[dict[str, tuple[float, float]]]:
    """bootstrap_ci of several logit arrays for the same labels (a model's before and after
    temperature scaling), all on one set of resamples. Drawing and counting the resamples
    is much of the cost, so two arrays cost less than twice one; and each array's intervals
    are exactly what bootstrap_ci gives it alone (same seed, same draws).
    """
    checked = [_check_logits(z, labels) for z in logits_list]
    if n_resamples < 1 or not 0 < ci < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < ci < 1, got {n_resamples} and {ci}")
    _edges(n_bins)  # refuses n_bins < 1
    m = len(checked[0][1])
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK // m)
    terms = [_Terms(softmax(z), log_softmax(z), y, n_bins) for z, y in checked]
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in terms]
    for start in range(0, n_resamples, chunk):
        counts = _draw_counts(rng.integers(0, m, size=(min(chunk, n_resamples - start), m)), m)
        for part, t in zip(parts, terms, strict=True):
            part.append(t.resampled(counts))
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
    return [
        {
            name: tuple(float(v) for v in np.percentile(np.concatenate([c[name] for c in part]), q))
            for name in part[0]
        }
        for part in parts
    ]


# -- temperature scaling -------------------------------------------------------------------
TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(logits, labels, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Temperature scaling (Guo et al. 2017): the T in bounds minimising the mean NLL of
    softmax(logits / T), the same NLL the reports show. Searched over log T, where the
    loss is better conditioned."""
    from scipy.optimize import minimize_scalar  # scipy.optimize is slow to import

    z, y = _check_logits(logits, labels)

    def loss(log_t: float) -> float:
        return float(_nll_terms(log_softmax(z, np.exp(log_t)), y).mean())

    res = minimize_scalar(loss, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def at_bound(temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> bool:
    return temperature <= bounds[0] * 1.001 or temperature >= bounds[1] * 0.999


# The metrics summarize() reports, each with a bootstrap interval.
METRICS = ("accuracy", "nll", "brier", "ece", "mce", "ece_adaptive", "ece_classwise")


def summarize(
    logits, labels, n_bins: int = 15, n_resamples: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Every metric of softmax(logits) (METRICS; NLL through log-softmax) and its bootstrap
    interval (none when n_resamples is 0)."""
    return summarize_paired([logits], labels, n_bins, n_resamples, ci, seed)[0]


def summarize_paired(
    logits_list, labels, n_bins=15, n_resamples=1000, ci=0.95, seed=0
) -> list[tuple[dict[str, float], dict[str, tuple[float, float]]]]:
    """summarize() of each logit array for the same labels, with the intervals of
    paired_bootstrap_ci (arguments as summarize's)."""
    checked = [_check_logits(z, labels) for z in logits_list]
    values = []
    for z, y in checked:
        p = softmax(z)
        values.append(
            {
                "accuracy": accuracy(p, y),
                "nll": float(_nll_terms(log_softmax(z), y).mean()),
                "brier": brier(p, y),
                "ece": ece(p, y, n_bins),
                "mce": mce(p, y, n_bins),
                "ece_adaptive": adaptive_ece(p, y, n_bins),
                "ece_classwise": classwise_ece(p, y, n_bins),
            }
        )
    if n_resamples == 0:
        return [(v, {}) for v in values]
    intervals = paired_bootstrap_ci([z for z, _ in checked], checked[0][1], n_bins, n_resamples, ci, seed)
    return list(zip(values, intervals, strict=True))
