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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from softmaxlab.errors import UserError

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


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found; run the generate stage first (`dvc repro`)")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several classes for truncated/garbled files
        raise UserError(f"{path}: not a readable Parquet file ({type(err).__name__}); regenerate it") from err
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
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
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
    k = probs.shape[1]
    df = pd.DataFrame(probs, columns=prob_columns(k))
    df[logit_columns(k)] = logits
    df["label"] = labels.astype(np.int64)
    return df


def read_predictions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, probs, labels) from a predictions file written by the train stage."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: predictions not found; run the train stage first (`dvc repro`)")
    df = pd.read_parquet(path)
    k = n_classes_of(df)
    return (
        df[logit_columns(k)].to_numpy(np.float64),
        df[prob_columns(k)].to_numpy(np.float64),
        df["label"].to_numpy(np.int64),
    )
