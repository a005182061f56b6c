"""Calibration of class probabilities: NumPy/SciPy functions over probs (n x k) and labels (n).

Binning convention (Guo et al. 2017): equal-width bins (lo, hi] over [0, 1]; a confidence of
exactly 0 goes to the first bin, exactly 1 to the last. Empty bins contribute nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class CalibrationInputError(ValueError):
    """Probabilities or labels that no metric can be computed from."""


def check_inputs(probs, labels, atol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise CalibrationInputError(f"probabilities must be a 2-D (n, k) array, got shape {p.shape}")
    n, k = p.shape
    if k < 2:
        raise CalibrationInputError(f"need at least 2 classes, got k={k}")
    if n == 0:
        raise CalibrationInputError("no samples: probabilities have 0 rows")
    if y.shape != (n,):
        raise CalibrationInputError(
            f"labels have shape {y.shape}, expected ({n},) to match the probabilities"
        )
    if not np.isfinite(p).all():
        i = int(np.argwhere(~np.isfinite(p))[0][0])
        raise CalibrationInputError(f"probabilities contain a non-finite value in row {i}: {p[i].tolist()}")
    if (p < 0).any() or (p > 1).any():
        i = int(np.argwhere((p < 0) | (p > 1))[0][0])
        raise CalibrationInputError(f"probabilities must lie in [0, 1]; row {i} is {p[i].tolist()}")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1)))
    if abs(sums[worst] - 1) > atol:
        raise CalibrationInputError(
            f"each row must sum to 1 (within {atol}); row {worst} sums to {sums[worst]:.6g}"
        )
    if not (
        np.issubdtype(y.dtype, np.integer)
        or (np.issubdtype(y.dtype, np.floating) and (y == np.round(y)).all())
    ):
        raise CalibrationInputError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= k)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CalibrationInputError(f"label {y[i]} at index {i} is outside 0..{k - 1}")
    return p, y


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)  # exp never overflows
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, temperature))


# -- per-sample quantities, shared by the metrics and the vectorised bootstrap --------------
def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence for bins (lo, hi]; 0 goes to bin 0. searchsorted against the
    same edges the tables report, not ceil(conf * n_bins): 0.6 * 5 is 3.0000000000000004."""
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.searchsorted(inner, conf, side="left")


def _nll_terms(p: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    return -np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0))


def _brier_terms(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return ((p - onehot) ** 2).sum(axis=1)


def _binned_gaps(conf, hit, n_bins):
    """Per bin: count, summed confidence, summed hits."""
    b = _bin_index(conf, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    return count, np.bincount(b, conf, n_bins), np.bincount(b, hit, n_bins)


def accuracy(probs, labels) -> float:
    p, y = check_inputs(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def nll(probs, labels, eps: float = 1e-15) -> float:
    p, y = check_inputs(probs, labels)
    return float(_nll_terms(p, y, eps).mean())


def brier(probs, labels) -> float:
    """Multiclass Brier score: mean over samples of the summed squared error, in [0, 2]."""
    p, y = check_inputs(probs, labels)
    return float(_brier_terms(p, y).mean())


def ece(probs, labels, n_bins: int = 15) -> float:
    """Top-label expected calibration error, equal-width bins."""
    p, y = check_inputs(probs, labels)
    count, conf, hits = _binned_gaps(p.max(axis=1), (p.argmax(axis=1) == y).astype(float), n_bins)
    return float(np.abs(conf - hits).sum() / len(y))


def mce(probs, labels, n_bins: int = 15) -> float:
    """Maximum calibration error: the worst non-empty bin's |accuracy - confidence|."""
    p, y = check_inputs(probs, labels)
    count, conf, hits = _binned_gaps(p.max(axis=1), (p.argmax(axis=1) == y).astype(float), n_bins)
    full = count > 0
    return float(np.max(np.abs(conf[full] - hits[full]) / count[full]))


def adaptive_ece(probs, labels, n_bins: int = 15) -> float:
    """ECE with equal-mass bins: samples sorted by confidence, split into n_bins groups."""
    p, y = check_inputs(probs, labels)
    conf = p.max(axis=1)
    hit = (p.argmax(axis=1) == y).astype(float)
    order = np.argsort(conf, kind="stable")
    groups = np.array_split(order, min(n_bins, len(y)))
    return float(sum(abs(conf[g].sum() - hit[g].sum()) for g in groups) / len(y))


def classwise_ece(probs, labels, n_bins: int = 15) -> float:
    """Kull et al. 2019: the calibration error of each class's probability against that
    class's indicator, equal-width bins, averaged over all k classes (absent ones too)."""
    p, y = check_inputs(probs, labels)
    n, k = p.shape
    total = 0.0
    for j in range(k):
        _, conf, hits = _binned_gaps(p[:, j], (y == j).astype(float), n_bins)
        total += np.abs(conf - hits).sum() / n
    return float(total / k)


def _edges(n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    e = np.linspace(0.0, 1.0, n_bins + 1)
    return e[:-1], e[1:]


def reliability_table(probs, labels, n_bins: int = 15) -> pd.DataFrame:
    """Per bin: count, mean confidence, accuracy and gap (accuracy - confidence)."""
    p, y = check_inputs(probs, labels)
    count, conf, hits = _binned_gaps(p.max(axis=1), (p.argmax(axis=1) == y).astype(float), n_bins)
    lo, hi = _edges(n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, acc = conf / count, hits / count
    return pd.DataFrame({
        "bin_lower": lo, "bin_upper": hi, "count": count.astype(np.int64),
        "confidence": mean_conf, "accuracy": acc, "gap": acc - mean_conf,
    })  # fmt: skip


def classwise_reliability(probs, labels, n_bins: int = 15) -> pd.DataFrame:
    """Long format, per class and bin: mean predicted p_j and observed frequency of class j."""
    p, y = check_inputs(probs, labels)
    lo, hi = _edges(n_bins)
    frames = []
    for j in range(p.shape[1]):
        count, conf, hits = _binned_gaps(p[:, j], (y == j).astype(float), n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            frames.append(pd.DataFrame({
                "class": j, "bin_lower": lo, "bin_upper": hi, "count": count.astype(np.int64),
                "confidence": conf / count, "frequency": hits / count,
            }))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def bootstrap_ci(
    probs, labels, n_bins: int = 15, n_resamples: int = 1000, ci: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for accuracy, ECE, Brier and NLL.

    Vectorised: one (n_resamples, n) index matrix; per-sample quantities are computed once
    and reduced per resample, ECE through one bincount over (resample, bin) pairs.
    """
    p, y = check_inputs(probs, labels)
    n = len(y)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    conf = p.max(axis=1)
    hit = (p.argmax(axis=1) == y).astype(float)
    flat_bin = (np.arange(n_resamples)[:, None] * n_bins + _bin_index(conf, n_bins)[idx]).ravel()
    size = n_resamples * n_bins
    gap = np.bincount(flat_bin, conf[idx].ravel(), size) - np.bincount(flat_bin, hit[idx].ravel(), size)
    samples = {
        "accuracy": hit[idx].mean(axis=1),
        "ece": np.abs(gap.reshape(n_resamples, n_bins)).sum(axis=1) / n,
        "brier": _brier_terms(p, y)[idx].mean(axis=1),
        "nll": _nll_terms(p, y, 1e-15)[idx].mean(axis=1),
    }
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
    return {k: tuple(float(v) for v in np.percentile(s, q)) for k, s in samples.items()}


def fit_temperature(logits, labels, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the NLL of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or not np.isfinite(z).all():
        raise CalibrationInputError(f"logits must be a finite 2-D array, got shape {z.shape}")
    _, y = check_inputs(np.full(z.shape, 1.0 / z.shape[1]), labels)
    rows = np.arange(len(y))

    def loss(log_t: float) -> float:
        return float(-log_softmax(z, np.exp(log_t))[rows, y].mean())

    res = minimize_scalar(loss, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def summarize(
    probs,
    labels,
    n_bins: int = 15,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    prefix: str = "",
) -> dict[str, float]:
    """Every metric, flat, with `_ci_low` / `_ci_high` for accuracy, ECE, Brier and NLL."""
    out = {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "mce": mce(probs, labels, n_bins),
        "ece_adaptive": adaptive_ece(probs, labels, n_bins),
        "ece_classwise": classwise_ece(probs, labels, n_bins),
    }
    if n_resamples > 0:
        for name, (lo, hi) in bootstrap_ci(probs, labels, n_bins, n_resamples, ci, seed).items():
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    return {f"{prefix}{k}": float(v) for k, v in out.items()}
