"""Typed configuration: the schema behind conf/, loading params.yaml, and validation.

conf/ (Hydra) is the source of truth and params.yaml its composed default. Both roads end
in `Config`: the Hydra app merges the composed config into it, the DVC stages load
params.yaml into it. `validate` then checks every value once, before any work is done.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from softmaxlab.core.errors import UserError, first_line
from softmaxlab.core.metrics import DEFAULT_OBJECTIVE, OBJECTIVES

PROJECT_MARKERS = ("dvc.yaml", "conf")

ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu", "selu", "gelu", "silu", "leaky_relu")
INITIALIZERS = (
    "he_uniform",
    "he_normal",
    "glorot_uniform",
    "glorot_normal",
    "lecun_uniform",
    "lecun_normal",
)
OPTIMIZERS = ("adam", "sgd", "rmsprop")
LOSSES = ("categorical_crossentropy", "categorical_focal_crossentropy")
DEVICES = ("auto", "cpu", "gpu")
BACKENDS = ("tensorflow", "jax")  # softmaxlab.model.backend.BACKENDS; here so validation imports no Keras
EARLY_STOPPING_MONITORS = ("val_loss", "val_accuracy", "loss", "accuracy")


@dataclass
class DataConfig:
    name: str = "blobs"
    # list[list[float]] would be exact, but OmegaConf then refuses [[0, 0], ...] (ints in a
    # nested typed list); validate() checks the shape and normalise() makes them floats.
    centers: list[Any] = field(default_factory=lambda: [[15.0, 0.0], [15.0, 15.0], [0.0, 15.0], [30.0, 15.0]])
    cluster_std: float = 1.5
    n_samples: int = 1000
    n_test: int = 250
    seed: int = 42  # make_blobs' random_state; the top-level `seed` never moves the data


@dataclass
class ModelConfig:
    name: str = "seed"
    hidden: list[int] = field(default_factory=lambda: [12, 8])
    activation: str = "relu"
    kernel_initializer: str = "he_uniform"
    dropout: float = 0.0
    batch_norm: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 0.001
    momentum: float = 0.0


@dataclass
class EarlyStoppingConfig:
    """keras.callbacks.EarlyStopping, off by default (the tutorial trains all 30 epochs)."""

    enabled: bool = False
    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    restore_best_weights: bool = True


@dataclass
class TrainConfig:
    backend: str = "tensorflow"
    epochs: int = 30
    batch_size: int = 5
    validation_split: float = 0.2
    loss: str = "categorical_crossentropy"
    label_smoothing: float = 0.0
    device: str = "auto"
    grid_size: int = 150
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class EvaluateConfig:
    n_bins: int = 15
    n_bootstrap: int = 1000
    ci: float = 0.95


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "softmaxlab"
    uri: str = ""
    log_model: bool = True
    # Each run's calibrated model becomes a new version of this registered model.
    registered_model: str = "softmaxlab"


@dataclass
class PathsConfig:
    train_data: str = "data/train.parquet"
    test_data: str = "data/test.parquet"
    model: str = "models/model.keras"
    predictions: str = "predictions"
    train_info: str = "reports/train.json"
    setup: str = "reports/setup.json"
    history: str = "reports/history.csv"
    metrics: str = "reports/metrics.json"
    calibration: str = "reports/calibration"
    figures: str = "reports/figures"
    report: str = "reports/report.html"
    # The check stage's marker: the first stages depend on it, so a bad params.yaml stops
    # `dvc repro` before any output is removed (softmaxlab.stages.check).
    checked: str = "reports/params.ok"


@dataclass
class Config:
    seed: int = 42  # weight initialisation, shuffling, bootstrap resamples: never the data
    objective: str = DEFAULT_OBJECTIVE
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore, where conf/config.yaml's `optional schema`
    default finds it: a bad override then fails at compose time with the key's type."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="schema", name="config", node=Config, package="_global_")


def _one_line(err: OmegaConfBaseException) -> str:
    msg = first_line(getattr(err, "msg", err))
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key else msg


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.hidden": [12, 8], ...}: a nested mapping by dotted key (lists are values)."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def did_you_mean(key: str) -> str:
    """`key` is not in the schema: the nearest key there, or the keys it could have meant."""
    import difflib

    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    *parents, leaf = key.split(".")
    node, known = schema, []
    for p in parents:
        if not isinstance(node, dict) or p not in node:
            break
        node, known = node[p], [*known, p]
    rest = ""
    if len(known) < len(parents):  # a group itself is misspelt: match it, keep the rest
        leaf, rest = parents[len(known)], "." + ".".join([*parents[len(known) + 1 :], leaf])
    if not isinstance(node, dict):
        return f"{'.'.join(known)} has no sub-keys"
    prefix = "".join(f"{k}." for k in known)
    close = difflib.get_close_matches(leaf, list(node), n=1, cutoff=0.6)
    if close:
        return f"did you mean `{prefix}{close[0]}{rest}`?"
    return "known keys: " + ", ".join(f"{prefix}{k}" for k in node)


def unknown_key_error(key: str) -> UserError:
    return UserError(f"{key}: no such key; {did_you_mean(key)}")


def to_config(cfg: DictConfig | dict) -> Config:
    """Merge a composed or loaded config into the schema, then validate it."""
    # (a dict may hold DictConfig nodes: the sweep callback passes the composed config's items)
    raw = OmegaConf.to_container(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))
    known = set(leaves(OmegaConf.to_container(OmegaConf.structured(Config))))
    for key in leaves(raw):
        # Lists (data.centers, model.hidden) are leaves in the schema.
        if key not in known and not any(key.startswith(k + ".") for k in known):
            raise unknown_key_error(key)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(f"bad config: {_one_line(err)}") from err
    validate(obj)
    obj.data.centers = [[float(v) for v in c] for c in obj.data.centers]
    return obj


def load_params(path: str | os.PathLike = "params.yaml") -> Config:
    """Load params.yaml (what DVC tracks and the stages read) into a validated Config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such params file; run `make params` to compose it from conf/")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml errors come in many classes; all mean a broken file
        first = first_line(err)
        raise UserError(f"{path}: not valid YAML ({first})") from err
    if not isinstance(raw, DictConfig):
        raise UserError(f"{path}: expected a mapping of parameters, got {type(raw).__name__}")
    return to_config(raw)


def as_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flatten(cfg: Config) -> dict[str, Any]:
    """`model.hidden` style keys, the form MLflow params and DVC's tables use."""
    return leaves(as_dict(cfg))


def _bad(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"{key}={value!r} is not allowed: {allowed}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise _bad(key, value, "choose one of " + ", ".join(options))


def _number(key: str, value: float, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    ok = math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise _bad(key, value, f"must be in {lb}{lo}, {hi}{rb}")


def fit_size(n_train: int, validation_split: float) -> int:
    """Samples trained on; the rest of the training split validates. Keras's own rule, so
    the split is the tutorial's `validation_split=0.2`."""
    return int(math.floor(n_train * (1.0 - validation_split)))


def validate(cfg: Config) -> None:
    """Every range, enum and cross-field rule, with the key and the allowed values named."""
    d, m, o, t, e = cfg.data, cfg.model, cfg.optimizer, cfg.train, cfg.evaluate
    _number("seed", cfg.seed, 0, 2**32 - 1)
    _number("data.seed", d.seed, 0, 2**32 - 1)

    if len(d.centers) < 2:
        raise _bad("data.centers", d.centers, "give at least 2 centers (one per class)")
    for i, c in enumerate(d.centers):
        numeric = isinstance(c, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in c
        )
        if not numeric or len(c) != 2:
            raise _bad(f"data.centers[{i}]", c, "each center is a point [x1, x2] of two finite numbers")
    if len({tuple(map(float, c)) for c in d.centers}) != len(d.centers):
        raise _bad("data.centers", d.centers, "centers must be distinct")
    _number("data.cluster_std", d.cluster_std, 0, math.inf, lo_open=True, hi_open=True)
    _number("data.n_samples", d.n_samples, 4, 50_000_000)
    _number("data.n_test", d.n_test, 1, d.n_samples - 1)
    _number("train.validation_split", t.validation_split, 0.0, 1.0, lo_open=True, hi_open=True)
    n_train = d.n_samples - d.n_test
    n_fit = fit_size(n_train, t.validation_split)
    if n_fit < 1 or n_train - n_fit < 1:
        raise _bad(
            "data.n_test", d.n_test, f"leaves {n_train} training samples, too few to hold a validation split"
        )

    if not m.hidden:
        raise _bad("model.hidden", m.hidden, "give at least one hidden layer, e.g. [12, 8]")
    for i, units in enumerate(m.hidden):
        _number(f"model.hidden[{i}]", units, 1, 1_000_000)
    _choice("model.activation", m.activation, ACTIVATIONS)
    _choice("model.kernel_initializer", m.kernel_initializer, INITIALIZERS)
    _number("model.dropout", m.dropout, 0.0, 1.0, hi_open=True)

    _choice("optimizer.name", o.name, OPTIMIZERS)
    _number("optimizer.lr", o.lr, 0.0, math.inf, lo_open=True, hi_open=True)
    _number("optimizer.momentum", o.momentum, 0.0, 1.0, hi_open=True)

    _number("train.epochs", t.epochs, 1, 100_000)
    _number("train.batch_size", t.batch_size, 1, math.inf)
    if t.batch_size > n_fit:
        raise _bad("train.batch_size", t.batch_size, f"must be <= the {n_fit} samples trained on")
    _choice("train.loss", t.loss, LOSSES)
    _number("train.label_smoothing", t.label_smoothing, 0.0, 1.0, hi_open=True)
    _choice("train.backend", t.backend, BACKENDS)
    _choice("train.device", t.device, DEVICES)
    _choice("train.early_stopping.monitor", t.early_stopping.monitor, EARLY_STOPPING_MONITORS)
    _number("train.early_stopping.patience", t.early_stopping.patience, 0, 100_000)
    _number("train.early_stopping.min_delta", t.early_stopping.min_delta, 0.0, math.inf, hi_open=True)
    _number("train.grid_size", t.grid_size, 10, 2000)

    _number("evaluate.n_bins", e.n_bins, 1, 1000)
    _number("evaluate.n_bootstrap", e.n_bootstrap, 0, 100_000)
    _number("evaluate.ci", e.ci, 0.0, 1.0, lo_open=True, hi_open=True)

    _choice("objective", cfg.objective, tuple(OBJECTIVES))
    if not cfg.tracking.experiment.strip():
        raise _bad("tracking.experiment", cfg.tracking.experiment, "give a non-empty experiment name")
    # It ends up in `models:/<name>@champion`, where a / or @ would change the URI's meaning.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", cfg.tracking.registered_model):
        raise _bad(
            "tracking.registered_model",
            cfg.tracking.registered_model,
            "1-100 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The directory holding dvc.yaml and conf/, seen from `start` (default: cwd).

    `dvc exp run --queue` runs each experiment in a copy under <root>/.dvc/tmp/exps/; the
    tracking store belongs to the real project, not to that throw-away copy.
    """
    here = Path(start or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for p in (here, *here.parents):
        if all((p / m).exists() for m in PROJECT_MARKERS):
            return p
    return here


def compose(overrides: list[str] | None = None, with_schema: bool = False) -> DictConfig:
    """Compose conf/ as DVC does for `dvc exp run` (no schema: DVC does not import us), or
    as the Hydra app does (with_schema=True)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if with_schema:
        register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(project_root() / "conf"), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides or [])
    OmegaConf.resolve(cfg)
    return cfg


def drift(params: str | os.PathLike) -> list[tuple[str, Any, Any]]:
    """(key, value in params.yaml, value conf/ composes to) for every key where they differ.

    params.yaml is conf/ composed; an experiment (`dvc exp run -S`, `dvc exp apply`) or a
    hand edit makes them differ on purpose, a conf/ edit without `make params` by mistake."""
    have = leaves(OmegaConf.to_container(OmegaConf.load(params)))
    want = leaves(OmegaConf.to_container(compose(with_schema=True)))
    return [
        (k, have.get(k), want.get(k)) for k in sorted(have.keys() | want.keys()) if have.get(k) != want.get(k)
    ]


def write_params(path: str | os.PathLike | None = None) -> Path:
    """(Re)write params.yaml from conf/ — `make params`."""
    from softmaxlab.core.io import write_text

    path = Path(path or project_root() / "params.yaml")
    # Without the schema, as DVC composes it: the same values in the same key order.
    write_text(path, OmegaConf.to_yaml(compose()))
    return path


if __name__ == "__main__":
    print(f"wrote {write_params()}")
