"""Where probabilities and labels stop being valid: the one check behind io's readers (a file's
rows) and calibration's inputs (an array). Each caller words the error: a file names itself and
how to re-create it, an array its row and column. NumPy only, so both may import it.
"""

from __future__ import annotations

import numpy as np


def distribution_fault(probs: np.ndarray, atol: float) -> tuple[int, int | None] | None:
    """Where the rows of probs (n, k) stop being distributions, or None where none does:
    (row, column) of the first entry outside [0, 1] (NaN and infinities too), else (row, None)
    for the row whose sum is furthest from 1 when that is further than atol."""
    bad = ~((probs >= 0) & (probs <= 1))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        return int(i), int(j)
    off = np.abs(probs.sum(axis=1) - 1)
    if (off > atol).any():
        return int(np.argmax(off)), None
    return None


def label_outside(labels: np.ndarray, k: int) -> int | None:
    """Index of the first label outside 0..k-1, or None."""
    bad = (labels < 0) | (labels >= k)
    return int(np.flatnonzero(bad)[0]) if bad.any() else None
