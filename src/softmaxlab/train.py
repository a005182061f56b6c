"""Stage `train`: build the Keras model from the config, train it, save it and its predictions.

The training loop is the tutorial's `model.fit(epochs=30, batch_size=5, validation_split=0.2)`
done in fewer framework calls: one compiled TensorFlow graph runs a whole epoch (shuffle,
then every mini-batch step of the same loss and optimizer), and Python only sees the epoch's
numbers. Same maths, same batch size, validation after every epoch — 3,600 tiny steps cost
what the maths costs instead of 3,600 rounds of Python and Keras callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from softmaxlab import calibration
from softmaxlab.config import Config, ModelConfig, OptimizerConfig, fit_size, load_params
from softmaxlab.errors import UserError, debug, entry_point
from softmaxlab.io import (
    FEATURES,
    atomic_path,
    file_md5,
    predictions_frame,
    prob_columns,
    read_split,
    write_json,
    write_table,
)
from softmaxlab.tracking import redact

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the config (usually the learning rate) is at fault."""


@dataclass
class TrainResult:
    model: Any
    history: pd.DataFrame
    predictions: dict[str, pd.DataFrame]  # "val", "test": logits, probs, label; "grid": x1, x2, probs
    train_seconds: float
    device: str
    info: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _native_stderr_hushed(enabled: bool):
    """Hold back what C++ writes straight to file descriptor 2 (TensorFlow's CUDA probing on a
    CPU machine prints before its own log level applies); replay it if the block fails."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


@contextlib.contextmanager
def _sklearn_hidden():
    """keras imports scikit-learn, and through it SciPy's stats, only to offer its SKLearn*
    wrappers, which this project does not use: 1-1.4 s of the train stage's start-up here.
    keras supports running without scikit-learn (it guards that import), so while keras
    loads, `import sklearn` fails as if it were not installed; afterwards it works again.
    Where scikit-learn is already loaded (the Hydra app generates the data first), nothing
    is hidden."""
    if "sklearn" in sys.modules:
        yield
        return
    sys.modules["sklearn"] = None  # the import system's "known to be missing"
    try:
        yield
    finally:
        if sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]


@functools.cache
def _tf():
    # TensorFlow's start-up chatter ("could not find cuda drivers", "failed call to cuInit"
    # on CPU machines) is noise for users; setting TF_CPP_MIN_LOG_LEVEL yourself, or
    # SOFTMAXLAB_DEBUG=1, shows it again.
    quiet = "TF_CPP_MIN_LOG_LEVEL" not in os.environ and not debug()
    if quiet:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with _native_stderr_hushed(quiet), _sklearn_hidden():
        import keras
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe prints too: do it here, once

    # Retracing warnings are expected: every sweep job builds a new model.
    tf.get_logger().setLevel("ERROR")
    # No progress bars from Keras (MLflow's log_model runs a predict on the input example):
    # off the terminal, they go to absl's logger, which Hydra's INFO level would still print.
    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)
    return tf


def select_device(requested: str) -> tuple[str, str]:
    """(TensorFlow device string, human-readable name) for train.device = auto | cpu | gpu."""
    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "gpu" and not gpus:
        raise UserError(
            "train.device='gpu' but TensorFlow sees no GPU: install the gpu extra "
            "(`make setup-gpu`) on a machine with an NVIDIA GPU, or use train.device=auto|cpu"
        )
    if gpus and requested in ("auto", "gpu"):
        details = tf.config.experimental.get_device_details(gpus[0])
        return "/GPU:0", "GPU: " + details.get("device_name", gpus[0].name)
    return "/CPU:0", "CPU"


def seed_everything(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds, and deterministic kernels: the same config gives
    the same weights and metrics on CPU."""
    import keras

    tf = _tf()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def build_model(cfg: ModelConfig, n_features: int, n_classes: int):
    """Dense layers as in the tutorial, then logits and softmax as separate layers so the
    logits can be read out for temperature scaling (the maths is Dense(k, softmax))."""
    import keras
    from keras import layers

    hidden = []
    for units in cfg.hidden:
        if cfg.batch_norm:
            hidden += [
                layers.Dense(units, use_bias=False, kernel_initializer=cfg.kernel_initializer),
                layers.BatchNormalization(),
                layers.Activation(cfg.activation),
            ]
        else:
            hidden.append(
                layers.Dense(units, activation=cfg.activation, kernel_initializer=cfg.kernel_initializer)
            )
        if cfg.dropout > 0:
            hidden.append(layers.Dropout(cfg.dropout))
    return keras.Sequential(
        [
            keras.Input(shape=(n_features,)),
            *hidden,
            layers.Dense(n_classes, name="logits"),
            layers.Activation("softmax", name="softmax"),
        ],
        name=f"softmax_{cfg.name}",
    )


def build_optimizer(cfg: OptimizerConfig):
    import keras

    if cfg.name == "adam":
        return keras.optimizers.Adam(learning_rate=cfg.lr)
    if cfg.name == "sgd":
        return keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum)
    return keras.optimizers.RMSprop(learning_rate=cfg.lr, momentum=cfg.momentum)


def build_loss(name: str, label_smoothing: float):
    import keras

    if name == "categorical_focal_crossentropy":
        return keras.losses.CategoricalFocalCrossentropy(label_smoothing=label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def fit(model, optimizer, loss_fn, x_fit, y_fit, x_val, y_val, epochs: int, batch_size: int):
    """Mini-batch training with per-epoch validation; returns the history frame.

    Each epoch reshuffles and takes ceil(n / batch_size) steps (the last batch may be
    smaller), exactly like Keras `fit`. Reported loss/accuracy are sample-weighted means over
    the epoch's batches, as Keras reports them.
    """
    tf = _tf()
    n = len(x_fit)
    steps = math.ceil(n / batch_size)
    variables = model.trainable_variables
    optimizer.build(variables)
    xt, yt = tf.constant(x_fit, tf.float32), tf.constant(y_fit, tf.float32)
    xv, yv = tf.constant(x_val, tf.float32), tf.constant(y_val, tf.float32)

    def correct(y, p):
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(p, 1), tf.argmax(y, 1)), tf.float32))

    def epoch():
        order = tf.random.shuffle(tf.range(n))

        def step(s, loss_sum, hits):
            idx = order[s * batch_size : (s + 1) * batch_size]
            xb, yb = tf.gather(xt, idx), tf.gather(yt, idx)
            with tf.GradientTape() as tape:
                p = model(xb, training=True)
                loss = loss_fn(yb, p)
            optimizer.apply(tape.gradient(loss, variables), variables)
            nb = tf.cast(tf.shape(idx)[0], tf.float32)
            return s + 1, loss_sum + loss * nb, hits + correct(yb, p)

        zero = tf.constant(0.0)
        _, loss_sum, hits = tf.while_loop(lambda s, *_: s < steps, step, (tf.constant(0), zero, zero))
        pv = model(xv, training=False)
        return tf.stack([loss_sum / n, hits / n, loss_fn(yv, pv), correct(yv, pv) / len(x_val)])

    # autograph=False: the loop is written as a tf.while_loop already, and skipping
    # AutoGraph's source conversion saves over a second of tracing.
    run_epoch = tf.function(epoch, autograph=False)
    rows = []
    for e in range(1, epochs + 1):
        loss, acc, val_loss, val_acc = (float(v) for v in run_epoch().numpy())
        if not (math.isfinite(loss) and math.isfinite(val_loss)):
            raise TrainingDiverged(
                f"training diverged: loss={loss} val_loss={val_loss} at epoch {e}; "
                "lower optimizer.lr (must give finite losses)"
            )
        rows.append((e, loss, acc, val_loss, val_acc))
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def grid_points(frames: list[pd.DataFrame], size: int) -> np.ndarray:
    """A size x size grid over the data's bounding box plus a 10% margin."""
    x = np.concatenate([f[list(FEATURES)].to_numpy() for f in frames])
    lo, hi = x.min(axis=0), x.max(axis=0)
    pad = 0.1 * (hi - lo)
    g1 = np.linspace(lo[0] - pad[0], hi[0] + pad[0], size)
    g2 = np.linspace(lo[1] - pad[1], hi[1] + pad[1], size)
    a, b = np.meshgrid(g1, g2)
    return np.column_stack([a.ravel(), b.ravel()])


def train(cfg: Config, train_df: pd.DataFrame, test_df: pd.DataFrame) -> TrainResult:
    """Pure training: frames in, model + history + predictions out. No files, no MLflow."""
    tf = _tf()
    import keras

    n_classes = len(cfg.data.centers)
    device, device_name = select_device(cfg.train.device)
    seed_everything(cfg.seed)

    n_fit = fit_size(len(train_df), cfg.train.validation_split)
    x = train_df[list(FEATURES)].to_numpy(np.float32)
    y = keras.utils.to_categorical(train_df["label"].to_numpy(), n_classes)
    splits = {
        "val": (x[n_fit:], train_df["label"].to_numpy()[n_fit:]),
        "test": (test_df[list(FEATURES)].to_numpy(np.float32), test_df["label"].to_numpy()),
    }

    start = time.perf_counter()
    with tf.device(device):
        model = build_model(cfg.model, x.shape[1], n_classes)
        optimizer = build_optimizer(cfg.optimizer)
        loss_fn = build_loss(cfg.train.loss, cfg.train.label_smoothing)
        history = fit(
            model, optimizer, loss_fn, x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:],
            cfg.train.epochs, cfg.train.batch_size,
        )  # fmt: skip
        train_seconds = time.perf_counter() - start
        # Compiled so that the saved model evaluates as the tutorial's did.
        model.compile(optimizer=optimizer, loss=loss_fn, metrics=["accuracy"])

        logit_model = keras.Model(model.inputs, model.get_layer("logits").output)

        def logits_of(features: np.ndarray) -> np.ndarray:
            return np.asarray(logit_model(tf.constant(features, tf.float32), training=False), np.float64)

        predictions = {}
        for name, (features, labels) in splits.items():
            logits = logits_of(features)
            predictions[name] = predictions_frame(logits, calibration.softmax(logits), labels)
        grid = grid_points([train_df, test_df], cfg.train.grid_size)
        grid_df = pd.DataFrame(grid, columns=list(FEATURES))
        grid_df[prob_columns(n_classes)] = calibration.softmax(logits_of(grid.astype(np.float32)))
        predictions["grid"] = grid_df

    return TrainResult(model, history, predictions, train_seconds, device_name)


def save(cfg: Config, result: TrainResult, root: Path) -> None:
    with atomic_path(root / cfg.paths.model, suffix=".keras") as tmp:
        result.model.save(tmp)
    pred_dir = root / cfg.paths.predictions
    for name, df in result.predictions.items():
        write_table(pred_dir / f"{name}.parquet", df)
    write_table(root / cfg.paths.history, result.history)


def load_data(cfg: Config, root: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The validated train and test splits under `root`, and their md5."""
    k = len(cfg.data.centers)
    train_path, test_path = root / cfg.paths.train_data, root / cfg.paths.test_data
    train_df, test_df = read_split(train_path, k), read_split(test_path, k)
    n_fit = fit_size(len(train_df), cfg.train.validation_split)
    if n_fit < 1 or n_fit == len(train_df):
        raise UserError(
            f"{train_path}: {len(train_df)} rows cannot be split by train.validation_split="
            f"{cfg.train.validation_split} into non-empty training and validation parts"
        )
    if cfg.train.batch_size > n_fit:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is not allowed: must be <= the {n_fit} samples trained on"
        )
    return train_df, test_df, file_md5(train_path, test_path)


def load_model(path: str | os.PathLike):
    """Load a saved model in Keras safe mode: a .keras file that carries code (a Lambda
    layer's pickled function) is refused rather than executed."""
    import keras

    return keras.saving.load_model(path, safe_mode=True)


def run(cfg: Config, root: Path, tracker=None, run_id: str | None = None, data=None) -> TrainResult:
    """Read the data under `root` (or take `data` from load_data), train, write the model,
    predictions and history; log to the tracker's run. Shared by `dvc repro` and the Hydra app."""
    train_df, test_df, data_md5 = data or load_data(cfg, root)
    if tracker:
        tracker.set_tags(run_id, {"data_md5": data_md5, "data.name": cfg.data.name})
    result = train(cfg, train_df, test_df)
    save(cfg, result, root)
    last = result.history.iloc[-1]
    result.info = {
        "run_id": run_id,
        "experiment_id": tracker.experiment_id if tracker else None,
        "tracking_uri": redact(tracker.uri) if tracker else None,
        "device": result.device,
        "train_seconds": round(result.train_seconds, 4),
        "epochs": int(last["epoch"]),
        "final_loss": float(last["loss"]),
        "final_val_accuracy": float(last["val_accuracy"]),
        "data_md5": data_md5,
    }
    if tracker:
        tracker.log_training(run_id, result, cfg)
    write_json(root / cfg.paths.train_info, result.info)
    return result


@entry_point
def main() -> None:
    from softmaxlab import tracking

    cfg = load_params()
    data = load_data(cfg, Path("."))  # bad data is refused before any MLflow run exists
    preparing = tracking.prepare_store(cfg)
    _tf()
    if preparing:
        preparing.wait()
    tracker = tracking.connect(cfg)
    with tracking.maybe_run(tracker, cfg) as run_id:
        result = run(cfg, Path("."), tracker, run_id, data)
    last = result.history.iloc[-1]
    print(
        f"train: {len(result.history)} epochs in {result.train_seconds:.2f} s on {result.device}; "
        f"loss {last['loss']:.4f}, val_accuracy {last['val_accuracy']:.4f}"
        + (f"; MLflow run {run_id}" if run_id else "")
    )


if __name__ == "__main__":
    main()
