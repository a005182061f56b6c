"""Matplotlib figures for evaluate and report. Each function takes data, returns a Figure.

Agg backend: no display needed, and nothing here imports TensorFlow.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from softmaxlab.core.io import FEATURES, n_classes_of, prob_columns  # noqa: E402

CMAP = plt.get_cmap("tab10")
# Scatter plots draw at most this many points: beyond it they add ink and seconds, not
# information (1e6 samples take ~10 s to draw).
MAX_POINTS = 5000


def _thin(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if len(df) <= MAX_POINTS:
        return df, ""
    return df.sample(MAX_POINTS, random_state=0), f" ({MAX_POINTS:,} of {len(df):,} shown)"


def _color(k: int):
    return CMAP(k % 10)


def _layout(fig, **margins) -> None:
    # Fixed margins (fractions of the figure, found once with tight_layout): tight_layout
    # draws every figure an extra time to measure its text, which was half the cost of
    # drawing the six figures of a run.
    fig.subplots_adjust(**margins)


def reliability(tables: dict[str, pd.DataFrame], titles: dict[str, str]):
    """One column per variant (e.g. before / after temperature scaling): the reliability
    diagram with gap bars on top, below it how many test samples fall in each bin (the
    confidence histogram, binned as the ECE bins them)."""
    fig, axes = plt.subplots(
        2, len(tables), figsize=(5.2 * len(tables), 6.4), squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.2]}, sharex=True,
    )  # fmt: skip
    for col, (name, table) in enumerate(tables.items()):
        ax, hx = axes[0, col], axes[1, col]
        width = table["bin_upper"] - table["bin_lower"]
        filled = table["count"] > 0
        t = table[filled]
        w = width[filled]
        ax.bar(t["bin_lower"], t["accuracy"], width=w, align="edge", color="#4c72b0",
               edgecolor="white", label="accuracy")  # fmt: skip
        # Gap bars: from accuracy up (or down) to the mean confidence of the bin.
        ax.bar(t["bin_lower"], t["confidence"] - t["accuracy"], bottom=t["accuracy"], width=w,
               align="edge", color="#dd8452", alpha=0.55, edgecolor="#dd8452", hatch="//",
               label="gap to confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin", title=titles[name])
        ax.legend(loc="upper left", fontsize=8)
        hx.bar(t["bin_lower"], t["count"], width=w, align="edge", color="#55a868", edgecolor="white")
        hx.set(xlabel="confidence (top probability)", ylabel="samples", yscale="log")
    _layout(fig, left=0.07, right=0.975, bottom=0.09, top=0.9, wspace=0.19, hspace=0.1)
    return fig


def classwise_reliability(table: pd.DataFrame, title: str):
    fig, ax = plt.subplots(figsize=(5.6, 5))
    for k, g in table[table["count"] > 0].groupby("class"):
        ax.plot(g["confidence"], g["frequency"], "o-", color=_color(int(k)), ms=4, label=f"class {k}")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability of the class",
           ylabel="observed frequency of the class", title=title)  # fmt: skip
    ax.legend(fontsize=8)
    _layout(fig, left=0.12, right=0.955, bottom=0.115, top=0.925)
    return fig


def confusion(labels: np.ndarray, predicted: np.ndarray, n_classes: int, title: str):
    # A bincount, drawn: sklearn's ConfusionMatrixDisplay would cost the report stage ~1 s of
    # importing sklearn for the same picture.
    counts = np.bincount(labels * n_classes + predicted, minlength=n_classes**2).reshape(n_classes, n_classes)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.imshow(counts, cmap="Blues")
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > counts.max() / 2 else "black")
    ticks = list(range(n_classes))
    ax.set(xticks=ticks, yticks=ticks, title=title, xlabel="predicted class", ylabel="true class")
    _layout(fig, left=0.08, right=0.97, bottom=0.13, top=0.915)
    return fig


def training_curves(history: pd.DataFrame, title: str):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(history["epoch"], history["loss"], label="train")
    a.plot(history["epoch"], history["val_loss"], label="validation")
    a.set(xlabel="epoch", ylabel="categorical cross-entropy", yscale="log", title="loss")
    b.plot(history["epoch"], history["accuracy"], label="train")
    b.plot(history["epoch"], history["val_accuracy"], label="validation")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _layout(fig, left=0.08, right=0.985, bottom=0.15, top=0.82, wspace=0.16)
    return fig


def data(train: pd.DataFrame, test: pd.DataFrame, title: str):
    fig, ax = plt.subplots(figsize=(5.6, 5))
    x1, x2 = FEATURES
    (train, shown), (test, _) = _thin(train), _thin(test)
    title += shown
    for k, g in train.groupby("label"):
        ax.scatter(g[x1], g[x2], s=10, color=_color(int(k)), label=f"class {k} (train)")
    ax.scatter(test[x1], test[x2], s=14, facecolors="none", edgecolors="k", lw=0.5, label="test")
    ax.set(xlabel=x1, ylabel=x2, title=title, aspect="equal")
    ax.legend(fontsize=7, loc="best")
    _layout(fig, left=0.11, right=0.975, bottom=0.1, top=0.93)
    return fig


def landscape(grid: pd.DataFrame, train: pd.DataFrame, title: str):
    """The input plane coloured by predicted class and faded where the top probability is
    low: uncertain regions show up as pale bands between the clusters."""
    from matplotlib.colors import to_rgb

    x1, x2 = FEATURES
    k = n_classes_of(grid)
    probs = grid[prob_columns(k)].to_numpy()
    side = int(round(np.sqrt(len(grid))))
    top = probs.max(axis=1)
    rgb = np.array([to_rgb(_color(j)) for j in range(k)])[probs.argmax(axis=1)]
    # Blend towards white: a point at chance (1/k) is white, a confident one full colour.
    strength = np.clip((top - 1 / k) / (1 - 1 / k), 0, 1)[:, None]
    img = (1 - strength) * 1.0 + strength * rgb
    extent = (grid[x1].min(), grid[x1].max(), grid[x2].min(), grid[x2].max())
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    ax.imshow(img.reshape(side, side, 3), origin="lower", extent=extent, aspect="auto")
    cs = ax.contour(
        grid[x1].to_numpy().reshape(side, side), grid[x2].to_numpy().reshape(side, side),
        top.reshape(side, side), levels=[0.6, 0.9, 0.99], colors="k", linewidths=0.6,
    )  # fmt: skip
    ax.clabel(cs, fmt="p=%.2f", fontsize=7)
    train, shown = _thin(train)
    title += shown
    for j, g in train.groupby("label"):
        ax.scatter(g[x1], g[x2], s=6, color=_color(int(j)), edgecolors="k", lw=0.2)
    ax.set(xlabel=x1, ylabel=x2, title=title)
    _layout(fig, left=0.1, right=0.975, bottom=0.105, top=0.93)
    return fig
