"""How the rows reach `fit` on TensorFlow: whole-epoch tf.data pipelines, no per-batch work.

Given NumPy arrays, Keras' array adapter slices every batch with a tf.data function call
(`tf.gather` under a parallel `map`). At the seed config's batch of 5 that is 150 calls an
epoch, and it cost ~3.5 s of `fit`'s 7 s for 30 epochs (bench/results/fit-*.md). Here each
epoch is shuffled by one permutation, gathered once and reshaped into its batches, so a batch
is only a slice; it is as fast as Keras' adapter at 10^6 rows, where tf.data's element-wise
`shuffle` (the textbook pipeline) is 6× slower.

The shuffle is stateless, keyed by (seed, epoch): the same config gives the same batches,
and each epoch its own order. JAX keeps Keras' NumPy path (a JAX-only install has no tf.data).
"""

from __future__ import annotations

import math

import numpy as np


def batches(x, y, batch_size: int):
    """A dataset of the rows in order, in batches of `batch_size` (the last may be smaller)."""
    import tensorflow as tf

    n, full = x.shape[0], (x.shape[0] // batch_size) * batch_size
    head = (
        tf.reshape(x[:full], [-1, batch_size, x.shape[1]]),
        tf.reshape(y[:full], [-1, batch_size, y.shape[1]]),
    )
    ds = tf.data.Dataset.from_tensor_slices(head)
    if full < n:
        ds = ds.concatenate(tf.data.Dataset.from_tensors((x[full:], y[full:])))
    return ds


def training_epochs(x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int, seed: int):
    """`epochs` shuffled passes over (x, y) as one dataset; fit it with
    `steps_per_epoch=steps(len(x), batch_size)` so that Keras keeps one iterator throughout."""
    import tensorflow as tf

    xt, yt = tf.constant(x), tf.constant(y)
    n = int(x.shape[0])

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), e])
        )
        return batches(tf.gather(xt, order), tf.gather(yt, order), batch_size)

    # Two epochs' batches may wait ready while the model trains: at 10^6 rows the next
    # epoch's gather overlaps this one's steps.
    return tf.data.Dataset.range(epochs).flat_map(epoch).prefetch(2)


def validation_batch(x: np.ndarray, y: np.ndarray):
    """The validation rows as one batch: one step per evaluation. Keras' loss and metrics
    are sample-weighted means either way."""
    return batches(x, y, len(x))


def steps(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
