"""Which Keras backend a process trains on, and the start-up tricks that loading it needs.

Keras 3 runs one model on TensorFlow or JAX; the backend is fixed per process by
`KERAS_BACKEND` before `import keras`. Everything that decides or loads it lives here, so
`training.py` reads as training:

- `use(name)` sets the backend for this process, or refuses (one line) when Keras is already
  loaded on another one: a sweep that varies `train.backend` needs a process per job.
- `keras_module(name)` imports Keras on that backend, quietly: TensorFlow's C++ start-up
  chatter ("could not find cuda drivers" on a CPU machine) goes straight to file descriptor
  2 before any log level applies, so it is held back and replayed only if the import fails;
  and Keras imports scikit-learn (and through it SciPy's stats, 1-1.4 s here) only to offer
  SKLearn* wrappers we never use, so sklearn is hidden while Keras loads (`hidden`). `SOFTMAXLAB_DEBUG=1`
  or your own `TF_CPP_MIN_LOG_LEVEL` shows the chatter again.
- `select_device(name, requested)` maps train.device = auto | cpu | gpu to a device scope and
  a human-readable name on either backend.

(The third start-up trick, the train stage's MLflow work in a side process while this import
runs, is `tracking.beside`: it belongs to tracking, not to Keras.)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata as metadata
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from softmaxlab.core.errors import UserError, debug

BACKENDS = ("tensorflow", "jax")
# What each backend needs installed, and how to get it.
_INSTALL = {"tensorflow": "make setup", "jax": "make setup-jax (pip install -e '.[jax]')"}


def loaded_backend() -> str | None:
    """The backend Keras was imported with in this process, or None if it is not loaded."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    return keras.backend.backend()


def use(name: str) -> None:
    """Fix this process's Keras backend to `name` (before Keras is imported)."""
    if name not in BACKENDS:
        raise UserError(f"train.backend={name!r} is not allowed: choose one of {', '.join(BACKENDS)}")
    loaded = loaded_backend()
    if loaded is not None and loaded != name:
        raise UserError(
            f"train.backend={name!r} is not allowed here: this process already runs Keras on "
            f"{loaded!r}, and a process has one backend; run jobs with different backends in "
            "their own processes (hydra/launcher=joblib, or one dvc exp run each)"
        )
    os.environ["KERAS_BACKEND"] = name


@contextlib.contextmanager
def native_stderr_hushed(enabled: bool):
    """Hold back what C++ writes straight to file descriptor 2; replay it if the block fails."""
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
def hidden(*modules: str):
    """While the block runs, `import <module>` fails as if it were not installed; afterwards
    it works again. A module already loaded is not hidden."""
    hiding = [m for m in modules if m not in sys.modules]
    for module in hiding:
        sys.modules[module] = None  # the import system's "known to be missing"
    try:
        yield
    finally:
        for module in hiding:
            if sys.modules.get(module, 0) is None:
                del sys.modules[module]


def optional_imports_of(name: str) -> tuple[str, ...]:
    """What importing Keras on backend `name` would load for features we never use, each
    behind Keras' or TensorFlow's own `except ImportError`: scikit-learn and SciPy's stats
    (Keras' scikit-learn wrappers, ~1.4 s), pyplot (its image-gallery helper, ~0.5 s) and,
    on TensorFlow with the JAX extra installed, JAX (TF Lite's converter, ~1 s)."""
    return ("sklearn", "matplotlib") + (("jax",) if name == "tensorflow" else ())


@functools.cache
def keras_module(name: str):
    """Keras on backend `name`, imported once per process, quietly."""
    use(name)
    # Ours (set below and inherited by child processes, say a stage run from a test or a
    # sweep) or unset: hush; set by the user: their choice.
    ours = os.environ.get("_SOFTMAXLAB_TF_LOG_LEVEL") == os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "3"
    quiet = ("TF_CPP_MIN_LOG_LEVEL" not in os.environ or ours) and not debug()
    if quiet:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ["_SOFTMAXLAB_TF_LOG_LEVEL"] = "3"
    try:
        with native_stderr_hushed(quiet), hidden(*optional_imports_of(name)):
            import keras

            if name == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices("GPU")  # the CUDA probe prints too: do it here
    except ImportError as err:
        raise UserError(
            f"train.backend={name!r} needs {err.name or name}, which is not installed: {_INSTALL[name]}"
        ) from err
    if name == "tensorflow":
        # Retracing warnings are expected: every sweep job builds a new model.
        tf.get_logger().setLevel("ERROR")
    # Keras' progress display is turned on for training on a terminal only (training.fit);
    # everywhere else (MLflow's log_model runs a predict) it stays off. Off a terminal, Keras
    # sends it to absl's logger, which Hydra's INFO level would still print.
    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not debug():
        # JAX's first device probe logs "Unable to initialize backend 'tpu': ... libtpu.so"
        # at INFO, which Hydra's INFO level prints: on a machine with no TPU, nothing to do.
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    return keras


def version(name: str) -> str:
    """The installed version of the backend's main package."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def select_device(name: str, requested: str) -> tuple[Callable[[], Any], str]:
    """(a device scope to train and predict in, a human-readable device name) for
    train.device = auto | cpu | gpu on backend `name`."""
    keras_module(name)
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if requested == "gpu" and not gpus:
            raise UserError(
                "train.device='gpu' but TensorFlow sees no GPU: install the gpu extra "
                "(`make setup-gpu`) on a machine with an NVIDIA GPU, or use train.device=auto|cpu"
            )
        if gpus and requested in ("auto", "gpu"):
            details = tf.config.experimental.get_device_details(gpus[0])
            return (lambda: tf.device("/GPU:0")), "GPU: " + details.get("device_name", gpus[0].name)
        return (lambda: tf.device("/CPU:0")), "CPU"

    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # "Unknown backend: 'gpu' requested, but no platforms that are instances of gpu"
        gpus = []
    if requested == "gpu" and not gpus:
        raise UserError(
            "train.device='gpu' but JAX sees no GPU: install a CUDA build of jaxlib "
            "(pip install 'jax[cuda12]') on a machine with an NVIDIA GPU, or use train.device=auto|cpu"
        )
    if gpus and requested in ("auto", "gpu"):
        return (lambda: jax.default_device(gpus[0])), "GPU: " + gpus[0].device_kind
    cpu = jax.devices("cpu")[0]
    return (lambda: jax.default_device(cpu)), "CPU"


def seed_everything(name: str, seed: int) -> None:
    """Python, NumPy and the backend's seeds, and deterministic kernels: the same config and
    backend give the same weights and metrics on CPU."""
    keras = keras_module(name)
    if name == "jax":
        # set_random_seed also seeds TensorFlow "for tf.data" when it is installed, importing
        # it (seconds, and its CUDA chatter) into a JAX process that never uses it; Keras then
        # remembers TensorFlow as unavailable and feeds fit from NumPy.
        with hidden("tensorflow"):
            keras.utils.set_random_seed(seed)
        return
    keras.utils.set_random_seed(seed)
    if name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def sweep_backends(task_overrides: list[str], sweeper_params: dict | None, default: str) -> set[str]:
    """Every train.backend a sweep's jobs will use: from its command-line overrides
    (`train.backend=tensorflow,jax`) and the sweeper's search space (Optuna's `params`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    found: set[str] = set()
    specs = list(task_overrides) + [f"{k}={v}" for k, v in (sweeper_params or {}).items()]
    for override in parser.parse_overrides(specs):
        if override.key_or_group != "train.backend":
            continue
        if override.is_sweep_override():
            found.update(override.sweep_string_iterator())
        else:
            found.add(str(override.value()))
    return found or {default}


def check_sweep(task_overrides: list[str], sweeper_params: dict | None, default: str) -> None:
    """A sweep's jobs share processes (the basic launcher runs them all in this one; joblib
    and Ray reuse their workers), and a process has one backend: refuse a sweep that mixes
    backends before any job runs, instead of failing job after job."""
    backends = sweep_backends(task_overrides, sweeper_params, default)
    if len(backends) > 1:
        raise UserError(
            f"train.backend={','.join(sorted(backends))} is not allowed in one sweep: its jobs share "
            "processes and a process has one Keras backend; run one sweep per backend"
        )
