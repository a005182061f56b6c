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
from typing import Any

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
    df = read_output(path, pd.read_parquet, "predictions", "train")
    k = n_classes_of(df)
    _require_columns(path, df, [*prob_columns(k), *logit_columns(k), "label"], k)
    return (
        df[logit_columns(k)].to_numpy(np.float64),
        df[prob_columns(k)].to_numpy(np.float64),
        df["label"].to_numpy(np.int64),
    )


def read_grid(path: str | os.PathLike) -> pd.DataFrame:
    """The train stage's predictions over a grid of the input plane: x1, x2, p0..p{k-1}."""
    df = read_output(path, pd.read_parquet, "grid predictions", "train")
    k = n_classes_of(df)
    _require_columns(path, df, [*FEATURES, *prob_columns(k)], k)
    return df


def _require_columns(path, df: pd.DataFrame, expected: list[str], k: int) -> None:
    if k < 2 or not set(expected) <= set(df.columns):
        raise UserError(
            f"{path}: columns are {list(df.columns)}, expected {expected if k >= 2 else 'p0, p1, ...'}; "
            "re-create it with `dvc repro -f -s train`"
        )
