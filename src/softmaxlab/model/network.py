"""The softmax net, its optimizer and its loss, built from the config; and loading a saved one.

The net is the tutorial's list-form `keras.Sequential` of Dense layers, with its logits and
its softmax as separate layers (`logits`, `softmax`): training reads the logits (see
training.py) and the saved model still ends in the softmax. Keras is imported inside each
function, after `keras_for` (or backend.keras_module) has fixed the process's backend.
"""

from __future__ import annotations

import os

from softmaxlab.core.config import Config, ModelConfig, OptimizerConfig
from softmaxlab.model import backend


def keras_for(cfg: Config):
    """Keras on the config's backend (fixed for the process on first use)."""
    return backend.keras_module(cfg.train.backend)


def build_model(cfg: ModelConfig, n_features: int, n_classes: int):
    """Dense layers as in the tutorial, then logits and softmax as separate layers so the
    logits can be read out for training and temperature scaling (the maths is Dense(k, softmax))."""
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


def logits_model(model):
    """The model up to its logits layer, sharing its weights."""
    import keras

    return keras.Model(model.inputs[0], model.get_layer("logits").output)


def build_optimizer(cfg: OptimizerConfig):
    import keras

    if cfg.name == "adam":
        return keras.optimizers.Adam(learning_rate=cfg.lr)
    if cfg.name == "sgd":
        return keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum)
    return keras.optimizers.RMSprop(learning_rate=cfg.lr, momentum=cfg.momentum)


def build_loss(name: str, label_smoothing: float, from_logits: bool = True):
    import keras

    if name == "categorical_focal_crossentropy":
        return keras.losses.CategoricalFocalCrossentropy(
            label_smoothing=label_smoothing, from_logits=from_logits
        )
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, from_logits=from_logits)


def load_model(path: str | os.PathLike):
    """Load a saved model in Keras safe mode, on whatever backend this process runs: a .keras
    file that carries code (a Lambda layer's pickled function) is refused rather than executed."""
    import keras

    return keras.saving.load_model(path, safe_mode=True)
