"""Stage `generate`: the tutorial's make_blobs data, split into train and test.

As in the tutorial, make_blobs shuffles and the first `n_test` samples are the test split.
The data has its own seed, `data.seed`: the top-level `seed` (weights, shuffling, bootstrap)
can change without changing the test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from softmaxlab.core.config import Config, DataConfig, load_params
from softmaxlab.core.errors import entry_point
from softmaxlab.core.io import FEATURES, write_table


def generate(data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) frames with columns x1, x2 (float64) and label (int64)."""
    from sklearn.datasets import make_blobs  # 1.5 s to import: only where it is used

    x, y = make_blobs(
        n_samples=data.n_samples,
        centers=np.asarray(data.centers, dtype=np.float64),
        cluster_std=data.cluster_std,
        random_state=data.seed,
    )
    df = pd.DataFrame(x, columns=list(FEATURES))
    df["label"] = y.astype(np.int64)
    test = df.iloc[: data.n_test].reset_index(drop=True)
    train = df.iloc[data.n_test :].reset_index(drop=True)
    return train, test


def write(cfg: Config, train: pd.DataFrame, test: pd.DataFrame, root=".") -> None:
    write_table(Path(root) / cfg.paths.train_data, train)
    write_table(Path(root) / cfg.paths.test_data, test)


@entry_point
def main() -> None:
    cfg = load_params()
    train, test = generate(cfg.data)
    write(cfg, train, test)
    print(f"generate: {len(train)} train and {len(test)} test samples, {len(cfg.data.centers)} classes")


if __name__ == "__main__":
    main()
