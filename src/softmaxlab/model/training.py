"""Training: the net from network.py fitted by Keras' own `model.fit`, and its predictions.

Training is Keras' own `model.fit(epochs=30, batch_size=5, validation_data=<the last fifth>)`,
on the backend `train.backend` names (TensorFlow or JAX; see backend.py). Two choices, both
for the same maths as the tutorial's:

- The net is trained on its logits with `from_logits=True` losses, and the saved model ends in
  a separate softmax layer. TensorFlow quietly does the same for a softmax output (it reads
  the logits back from the softmax op); JAX cannot, and on the blobs' unscaled inputs a
  saturated softmax clipped at 1e-7 has zero gradient: measured here, Keras' tutorial model
  on JAX ended at 0.26-0.78 test accuracy for 4 of 5 seeds, against 1.0 from logits.
- One epoch is one execution (`steps_per_execution` = steps per epoch): on TensorFlow the
  120 steps of an epoch run as one compiled loop instead of 120 rounds of Python, fed by
  whole-epoch tf.data pipelines (inputs.py) rather than Keras' per-batch slicing of NumPy
  arrays, and the validation rows are one batch evaluated in one step. Together ~2× faster
  `fit` at the seed config (bench/fit.py).

`train()` is pure: frames in, model + history + predictions out. The train stage
(stages/train.py) reads and writes the files and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from softmaxlab.core import calibration
from softmaxlab.core.config import Config, TrainConfig, fit_size
from softmaxlab.core.errors import UserError
from softmaxlab.core.io import FEATURES, n_classes_of, predictions_frame, prob_columns
from softmaxlab.core.metrics import HISTORY_COLUMNS
from softmaxlab.model import backend, inputs
from softmaxlab.model.network import build_loss, build_model, build_optimizer, keras_for, logits_model

# A run whose validation accuracy ends this far below what the data allows (the nearest-
# center rule, optimal for make_blobs' equal-variance blobs) is flagged: training failed.
SHORTFALL_WARNING = 0.1


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the config (usually the learning rate) is at fault."""


@dataclass
class TrainResult:
    model: Any
    history: pd.DataFrame
    predictions: dict[str, pd.DataFrame]  # "val", "test": logits, probs, label; "grid": x1, x2, probs
    train_seconds: float
    device: str
    backend: str = "tensorflow"
    info: dict[str, Any] = field(default_factory=dict)


def callbacks_for(cfg: TrainConfig) -> list:
    """Keras callbacks from the config: divergence always, early stopping when enabled."""
    import keras

    class StopOnDivergence(keras.callbacks.Callback):
        # Keras' TerminateOnNaN stops quietly; a diverged run must fail with the reason.
        def on_epoch_end(self, epoch, logs=None):
            loss, val_loss = (float((logs or {}).get(k, math.nan)) for k in ("loss", "val_loss"))
            if not (math.isfinite(loss) and math.isfinite(val_loss)):
                raise TrainingDiverged(
                    f"training diverged: loss={loss} val_loss={val_loss} at epoch {epoch + 1}; "
                    "lower optimizer.lr (must give finite losses)"
                )

    out = [StopOnDivergence()]
    es = cfg.early_stopping
    if es.enabled:
        out.append(
            keras.callbacks.EarlyStopping(
                monitor=es.monitor, patience=es.patience, min_delta=es.min_delta,
                restore_best_weights=es.restore_best_weights,
                mode="max" if es.monitor.endswith("accuracy") else "min",
            )
        )  # fmt: skip
    return out


def show_progress() -> bool:
    """Keras' progress bar on a terminal; in CI logs and captured output, only the stage's
    summary line."""
    return sys.stdout.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")


def fit(
    model, cfg: TrainConfig, x_fit, y_fit, x_val, y_val, optimizer, progress: bool = False, seed: int = 0
) -> pd.DataFrame:
    """`keras.Model.fit` on the logits, validating after every epoch; the history frame.

    Each epoch shuffles and takes ceil(n / batch_size) steps (the last batch may be
    smaller); loss and accuracy are Keras' sample-weighted means over the epoch.
    """
    import keras

    steps = inputs.steps(len(x_fit), cfg.batch_size)
    net = logits_model(model)
    net.compile(
        optimizer=optimizer,
        loss=build_loss(cfg.loss, cfg.label_smoothing, from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],  # argmax: logits or probs alike
        steps_per_execution=steps,
    )
    if keras.backend.backend() == "tensorflow":
        data = {
            "x": inputs.training_epochs(x_fit, y_fit, cfg.batch_size, cfg.epochs, seed),
            "steps_per_epoch": steps,
            "shuffle": False,
        }  # shuffled already, per epoch
        validation, extra = inputs.validation_batch(x_val, y_val), [validation_step_callback()]
    else:
        data = {"x": x_fit, "y": y_fit, "batch_size": cfg.batch_size, "shuffle": True}
        validation, extra = (x_val, y_val), []
    if progress:
        keras.config.enable_interactive_logging()
    try:
        with _ctrl_c_between_steps() as stop:
            history = net.fit(
                **data, validation_data=validation, epochs=cfg.epochs, verbose=1 if progress else 0,
                callbacks=[*callbacks_for(cfg), *extra, stop],
            )  # fmt: skip
    finally:
        keras.config.disable_interactive_logging()
    h = history.history
    frame = pd.DataFrame({c: h[c] for c in HISTORY_COLUMNS[1:]}, dtype=float)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame


def validation_step_callback():
    import keras

    class ValidationInOneStep(keras.callbacks.Callback):
        """Validation is one batch (inputs.validation_batch), so Keras' evaluation needs no
        loop of `steps_per_execution` steps around it: compiling that loop cost ~0.5 s and each
        epoch's evaluation ~15 ms more. Keras reads `steps_per_execution` when it first traces
        the evaluation, which happens right after this hook; training's loop is traced already."""

        def on_test_begin(self, logs=None):
            self.saved, self.model.steps_per_execution = self.model.steps_per_execution, 1

        def on_test_end(self, logs=None):
            self.model.steps_per_execution = self.saved

    return ValidationInOneStep()


@contextlib.contextmanager
def _ctrl_c_between_steps():
    """Ctrl-C during `fit` stops training at the next step. On TensorFlow a KeyboardInterrupt
    raised by Python's own handler can land inside tf.data's iterator and be lost (seen:
    training went on for minutes after SIGINT). So while fit runs, SIGINT only sets a flag,
    and a callback raises KeyboardInterrupt from Keras' loop between executions."""
    import keras

    interrupted = threading.Event()

    class RaiseOnInterrupt(keras.callbacks.Callback):
        def _check(self, *args, **kwargs):
            if interrupted.is_set():
                raise KeyboardInterrupt

        on_train_batch_end = on_test_batch_end = on_epoch_end = _check

    ours = threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if ours:
        signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        yield RaiseOnInterrupt()
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def reference_accuracy(cfg: Config, features: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the nearest-center rule on these rows: what the data allows. For
    make_blobs' equal-variance blobs with equal class sizes it is the Bayes-optimal rule."""
    centers = np.asarray(cfg.data.centers, np.float64)
    d = ((features[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    return float(np.mean(d.argmin(1) == labels))


def grid_points(train_df: pd.DataFrame, size: int) -> np.ndarray:
    """A size x size grid over the training data's bounding box plus a 10% margin (sized
    from training data only: nothing but final reporting reads the test split)."""
    x = train_df[list(FEATURES)].to_numpy()
    lo, hi = x.min(axis=0), x.max(axis=0)
    pad = 0.1 * (hi - lo)
    g1 = np.linspace(lo[0] - pad[0], hi[0] + pad[0], size)
    g2 = np.linspace(lo[1] - pad[1], hi[1] + pad[1], size)
    a, b = np.meshgrid(g1, g2)
    return np.column_stack([a.ravel(), b.ravel()])


def train(cfg: Config, train_df: pd.DataFrame, test_df: pd.DataFrame, progress: bool = False) -> TrainResult:
    """Pure training: frames in, model + history + predictions out. No files, no MLflow."""
    keras = keras_for(cfg)
    name = cfg.train.backend
    n_classes = len(cfg.data.centers)
    device_scope, device_name = backend.select_device(name, cfg.train.device)
    backend.seed_everything(name, cfg.seed)

    n_fit = fit_size(len(train_df), cfg.train.validation_split)
    x = train_df[list(FEATURES)].to_numpy(np.float32)
    labels = train_df["label"].to_numpy()
    y = keras.utils.to_categorical(labels, n_classes)
    splits = {
        "val": (x[n_fit:], labels[n_fit:]),
        "test": (test_df[list(FEATURES)].to_numpy(np.float32), test_df["label"].to_numpy()),
    }

    start = time.perf_counter()
    with device_scope():
        model = build_model(cfg.model, x.shape[1], n_classes)
        optimizer = build_optimizer(cfg.optimizer)
        history = fit(
            model, cfg.train, x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:], optimizer, progress, cfg.seed
        )
        train_seconds = time.perf_counter() - start
        # Compiled on probabilities, so that the saved model evaluates as the tutorial's did.
        model.compile(
            optimizer=optimizer,
            loss=build_loss(cfg.train.loss, cfg.train.label_smoothing, from_logits=False),
            metrics=["accuracy"],
        )
        net = logits_model(model)

        def logits_of(features: np.ndarray) -> np.ndarray:
            return np.asarray(keras.ops.convert_to_numpy(net(features, training=False)), np.float64)

        predictions = {}
        for split, (features, split_labels) in splits.items():
            logits = logits_of(features)
            predictions[split] = predictions_frame(logits, calibration.softmax(logits), split_labels)
        grid = grid_points(train_df, cfg.train.grid_size)
        grid_df = pd.DataFrame(grid, columns=list(FEATURES))
        grid_df[prob_columns(n_classes)] = calibration.softmax(logits_of(grid.astype(np.float32)))
        predictions["grid"] = grid_df

    result = TrainResult(model, history, predictions, train_seconds, device_name, name)
    result.info["val_accuracy_reference"] = reference_accuracy(
        cfg, x[n_fit:].astype(np.float64), labels[n_fit:]
    )
    return result


def val_accuracy(result: TrainResult) -> float:
    """The saved model's validation accuracy: with early stopping's restore_best_weights that
    of the kept weights, which the last epoch's (the history's last row) need not be."""
    val = result.predictions["val"]
    return calibration.accuracy(val[prob_columns(n_classes_of(val))].to_numpy(), val["label"].to_numpy())


def shortfall(result: TrainResult) -> str | None:
    """A warning when the saved model is far below what the data allows, else None."""
    val_acc = val_accuracy(result)
    ref = result.info.get("val_accuracy_reference")
    if ref is None or val_acc >= ref - SHORTFALL_WARNING:
        return None
    return (
        f"validation accuracy {val_acc:.3f} is far below the {ref:.3f} this data allows "
        "(nearest true center): training failed; try another optimizer.lr, more train.epochs "
        "or optimizer=adam"
    )
