"""Files in and out: atomic writes, the data/prediction tables, hashes.

Every output is written to a temporary file beside its target and renamed into place, so an
interrupted stage leaves the previous output whole and the next `dvc repro` starts clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from softmaxlab.core.checks import distribution_fault, label_outside
from softmaxlab.core.errors import UserError
from softmaxlab.core.metrics import HISTORY_COLUMNS

if TYPE_CHECKING:  # imported where used: the check stage needs this module, not pandas (0.5 s)
    import pandas as pd

FEATURES = ("x1", "x2")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp"
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: object, sort_keys: bool = True) -> None:
    """Sorted keys by default (stable bytes); sort_keys=False keeps the dict's order, for the
    files whose key order is the column order of `dvc exp show`."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_output(path: str | os.PathLike, read: Callable[[Path], Any], what: str, stage: str) -> Any:
    """read(path) for a file a stage writes, or a one-line UserError naming the file and the
    stage that makes it: missing (that stage has not run) or unreadable (damaged by hand)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; run the {stage} stage first (`dvc repro`)")
    try:
        return read(path)
    except Exception as err:  # pyarrow, pandas and json raise many classes for damaged files
        kind = {".parquet": "Parquet", ".csv": "CSV", ".json": "JSON"}.get(path.suffix, "")
        raise UserError(
            f"{path}: not a readable {kind} file ({type(err).__name__}); "
            f"re-create it with `dvc repro -f -s {stage}`"
        ) from err


def write_table(path: str | os.PathLike, df: pd.DataFrame) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)


def save_figure(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        # No bbox_inches="tight": the figures are laid out already, and it renders them twice.
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip("."))
    plt.close(fig)


def file_md5(*paths: str | os.PathLike) -> str:
    """md5 over the files' bytes, in order: DVC's hash for a single file."""
    h = hashlib.md5()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_split(path: str | os.PathLike, n_classes: int | None = None) -> pd.DataFrame:
    """Read a data split and refuse anything but columns x1, x2 (finite floats), label (ints
    in [0, n_classes)), at least one row."""
    import pandas as pd

    path = Path(path)
    df = read_output(path, pd.read_parquet, "data file", "generate")
    expected = [*FEATURES, "label"]
    if list(df.columns) != expected:
        raise UserError(f"{path}: columns are {list(df.columns)}, expected {expected}")
    if len(df) == 0:
        raise UserError(f"{path}: the split is empty")
    for col in FEATURES:
        if not pd.api.types.is_float_dtype(df[col]):
            raise UserError(f"{path}: column {col} has dtype {df[col].dtype}, expected float")
        bad = ~np.isfinite(df[col].to_numpy())
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"{path}: column {col} has a non-finite value {df[col].iloc[row]} at row {row}")
    if not pd.api.types.is_integer_dtype(df["label"]):
        raise UserError(f"{path}: column label has dtype {df['label'].dtype}, expected integer")
    if n_classes is not None:
        labels = df["label"].to_numpy()
        row = label_outside(labels, n_classes)
        if row is not None:
            raise UserError(
                f"{path}: label {labels[row]} at row {row} is outside 0..{n_classes - 1} "
                f"(the config has {n_classes} centers)"
            )
    return df


def n_classes_of(df: pd.DataFrame) -> int:
    """Number of probability columns p0..p{k-1} in a predictions or grid frame."""
    return sum(c.startswith("p") and c[1:].isdigit() for c in df.columns)


def prob_columns(k: int) -> list[str]:
    return [f"p{j}" for j in range(k)]


def logit_columns(k: int) -> list[str]:
    return [f"logit{j}" for j in range(k)]


def predictions_frame(logits: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    import pandas as pd

    k = probs.shape[1]
    df = pd.DataFrame(probs, columns=prob_columns(k))
    df[logit_columns(k)] = logits
    df["label"] = labels.astype(np.int64)
    return df


RECREATE_TRAIN = "re-create it with `dvc repro -f -s train`"
TRAIN_INFO_KEYS = ("run_id", "experiment_id", "tracking_uri")


def _check_probabilities(path, probs: np.ndarray, atol: float = 1e-3) -> None:
    """Each row a distribution: finite, in [0, 1], summing to 1 (a hand-edited file is not)."""
    fault = distribution_fault(probs, atol)
    if fault is None:
        return
    i, j = fault
    if j is not None:
        raise UserError(
            f"{path}: probability p{j} = {probs[i, j]} at row {i} is not in [0, 1]; {RECREATE_TRAIN}"
        )
    raise UserError(
        f"{path}: the probabilities of row {i} sum to {probs[i].sum():.6g}, not 1; {RECREATE_TRAIN}"
    )


def read_predictions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, probs, labels) from a predictions file written by the train stage."""
    import pandas as pd

    df = read_output(path, pd.read_parquet, "predictions", "train")
    k = n_classes_of(df)
    _require_columns(path, df, [*prob_columns(k), *logit_columns(k), "label"], k)
    probs = df[prob_columns(k)].to_numpy(np.float64)
    _check_probabilities(path, probs)
    return df[logit_columns(k)].to_numpy(np.float64), probs, df["label"].to_numpy(np.int64)


def read_grid(path: str | os.PathLike) -> pd.DataFrame:
    """The train stage's predictions over a grid of the input plane: x1, x2, p0..p{k-1}, one
    row per point of a full grid (the landscape is drawn from it as an image)."""
    import pandas as pd

    df = read_output(path, pd.read_parquet, "grid predictions", "train")
    k = n_classes_of(df)
    _require_columns(path, df, [*FEATURES, *prob_columns(k)], k)
    nx, ny = df["x1"].nunique(), df["x2"].nunique()
    if len(df) != nx * ny or df.duplicated(list(FEATURES)).any():
        raise UserError(
            f"{path}: {len(df)} rows do not make a full {nx} x {ny} grid of (x1, x2); {RECREATE_TRAIN}"
        )
    _check_probabilities(path, df[prob_columns(k)].to_numpy(np.float64))
    return df


def read_history(path: str | os.PathLike) -> pd.DataFrame:
    """The train stage's per-epoch history: one row per epoch, HISTORY_COLUMNS at least."""
    import pandas as pd

    df = read_output(path, pd.read_csv, "training history", "train")
    missing = [c for c in HISTORY_COLUMNS if c not in df.columns]
    if missing or df.empty:
        what = f"has no column {', '.join(missing)}" if missing else "has no rows"
        raise UserError(f"{path}: the training history {what}; {RECREATE_TRAIN}")
    return df


def read_train_info(path: str | os.PathLike) -> dict:
    """The train stage's record (reports/train.json): the MLflow run later stages add to."""
    info = read_output(path, read_json, "training record", "train")
    missing = (
        [k for k in TRAIN_INFO_KEYS if k not in info] if isinstance(info, dict) else list(TRAIN_INFO_KEYS)
    )
    if missing:
        raise UserError(f"{path}: the training record has no {', '.join(missing)}; {RECREATE_TRAIN}")
    return info


def _require_columns(path, df: pd.DataFrame, expected: list[str], k: int) -> None:
    if k < 2 or not set(expected) <= set(df.columns):
        raise UserError(
            f"{path}: columns are {list(df.columns)}, expected {expected if k >= 2 else 'p0, p1, ...'}; "
            "re-create it with `dvc repro -f -s train`"
        )
