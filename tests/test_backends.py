"""Keras backends: TensorFlow and JAX through the same `keras.Model.fit`, a model that crosses
backends, one backend per process, and Keras' own progress display on a terminal only.

A process has one Keras backend, so everything that needs the other one runs in a
subprocess (pytest's own process trains on TensorFlow). The tests marked `jax` need the jax
extra (make setup-jax); the others run on TensorFlow alone.
"""

from __future__ import annotations

import json
import os
import pty
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_config, env_with_venv, make_project, run_cmd, tiny_overrides

from softmaxlab.core.config import fit_size
from softmaxlab.model import training
from softmaxlab.stages import pipeline


def python(code: str, backend: str, cwd: Path = ROOT, **env: str) -> str:
    out = run_cmd([sys.executable, "-c", code], cwd, env_with_venv(KERAS_BACKEND=backend, **env))
    return out.stdout


@pytest.mark.jax
def test_jax_device_probe_says_nothing_under_an_info_logger():
    # Hydra's app logs at INFO; JAX's probe for a TPU used to print an "Unable to initialize
    # backend 'tpu'" line there on every run.
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from softmaxlab.model import backend; print(backend.select_device('jax', 'auto')[1])"
    )
    proc = run_cmd([sys.executable, "-c", code], ROOT, env_with_venv(KERAS_BACKEND="jax"))
    assert proc.stdout.strip() == "CPU" and "xla_bridge" not in proc.stderr, proc.stderr


TRAIN_AND_SAVE = """
import json, sys
import numpy as np
from softmaxlab.core.config import compose, to_config
from softmaxlab.stages import pipeline
from softmaxlab.model import training
from softmaxlab.core.io import logit_columns
cfg = to_config(compose({overrides!r}, with_schema=True))
tr, te = pipeline.data_for(cfg.data)
result = training.train(cfg, tr, te)
result.model.save({path!r})
x = te[["x1", "x2"]].to_numpy(np.float32)[:20]
print(json.dumps({{"device": result.device, "backend": result.backend,
                  "history": result.history.to_dict("list"),
                  "logits": result.predictions["test"][logit_columns(4)].to_numpy()[:20].tolist(),
                  "probs": np.asarray(result.model(x)).tolist()}}))
"""

LOAD = """
import json, sys
import numpy as np
from softmaxlab.model import backend, network
keras = backend.keras_module({backend!r})
from softmaxlab.core.config import compose, to_config
from softmaxlab.stages import pipeline
cfg = to_config(compose({overrides!r}, with_schema=True))
_, te = pipeline.data_for(cfg.data)
model = network.load_model({path!r})
x = te[["x1", "x2"]].to_numpy(np.float32)[:20]
logits = keras.ops.convert_to_numpy(network.logits_model(model)(x))
probs = keras.ops.convert_to_numpy(model(x))
print(json.dumps({{"backend": keras.backend.backend(), "logits": logits.tolist(), "probs": probs.tolist()}}))
"""


def train_in(backend: str, path: Path, *extra: str) -> dict:
    overrides = tiny_overrides(f"train.backend={backend}", "tracking.enabled=false", *extra)
    return json.loads(
        python(TRAIN_AND_SAVE.format(overrides=overrides, path=str(path)), backend).splitlines()[-1]
    )


@pytest.mark.slow
@pytest.mark.jax
@pytest.mark.parametrize(("saved_on", "loaded_on"), [("tensorflow", "jax"), ("jax", "tensorflow")])
def test_a_keras_file_saved_on_one_backend_loads_and_predicts_the_same_on_the_other(
    tmp_path, saved_on, loaded_on
):
    path = tmp_path / "model.keras"
    trained = train_in(saved_on, path)
    assert trained["backend"] == saved_on
    overrides = tiny_overrides()
    loaded = json.loads(
        python(LOAD.format(backend=loaded_on, overrides=overrides, path=str(path)), loaded_on)
    )
    assert loaded["backend"] == loaded_on
    # float32 maths on two backends: equal to rounding
    np.testing.assert_allclose(loaded["probs"], trained["probs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded["logits"], trained["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.jax
def test_jax_training_is_deterministic_and_learns_the_blobs(tmp_path):
    a = train_in("jax", tmp_path / "a.keras", "train.epochs=8", "train.batch_size=5")
    b = train_in("jax", tmp_path / "b.keras", "train.epochs=8", "train.batch_size=5")
    assert a["backend"] == "jax" and a["device"] == "CPU"
    assert a["history"] == b["history"] and a["logits"] == b["logits"]
    # Trained from logits: on JAX a saturated softmax would stall near chance (see train.py).
    assert a["history"]["val_accuracy"][-1] >= 0.95
    assert len(a["history"]["epoch"]) == 8


@pytest.mark.slow
@pytest.mark.jax
def test_dvc_repro_on_jax_records_its_backend(tmp_path):
    # The whole pipeline as `dvc repro` runs it, with train.backend=jax in params.yaml.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    project = make_project(tmp_path / "p", *tiny_overrides("train.backend=jax", f"tracking.uri={uri}"))
    out = run_cmd(["dvc", "repro"], project)
    assert "(jax)" in out.stdout
    info = json.loads((project / "reports/train.json").read_text())
    assert info["backend"] == "jax" and info["backend_version"].count(".") == 2
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(info["run_id"])
    assert run.data.tags["backend"] == "jax"
    assert run.data.tags["backend_version"] == info["backend_version"]
    assert run.info.status == "FINISHED"


@pytest.mark.jax
def test_a_process_refuses_a_second_backend_in_one_line():
    code = (
        "from softmaxlab.model import backend; from softmaxlab.core.errors import UserError\n"
        "backend.keras_module('jax')\n"
        "try:\n    backend.use('tensorflow')\nexcept UserError as e:\n    print(e)\n"
    )
    out = python(code, "jax").strip()
    assert out.count("\n") == 0
    assert "train.backend='tensorflow'" in out and "already runs Keras on 'jax'" in out


@pytest.mark.jax
def test_jax_process_does_not_import_tensorflow():
    # Keras' set_random_seed would import TensorFlow "for tf.data" (seconds, CUDA chatter).
    code = (
        "import sys\nfrom softmaxlab.core.config import compose, to_config\nfrom softmaxlab.stages import pipeline\nfrom softmaxlab.model import training\n"
        f"cfg = to_config(compose({tiny_overrides('train.backend=jax', 'train.epochs=1')!r}, with_schema=True))\n"
        "training.train(cfg, *pipeline.data_for(cfg.data))\n"
        "print('tensorflow' in sys.modules)\n"
    )
    assert python(code, "jax").strip().splitlines()[-1] == "False"


def test_validation_rows_are_the_last_fraction_as_keras_validation_split_takes_them():
    from keras.src.trainers.data_adapters.array_slicing import train_validation_split

    x = np.arange(750, dtype=np.float32).reshape(-1, 1)
    kept, held = train_validation_split((x,), validation_split=0.2)
    n_fit = fit_size(len(x), 0.2)
    assert len(kept[0]) == n_fit and np.array_equal(held[0], x[n_fit:])


def test_early_stopping_from_config_stops_before_the_last_epoch():
    cfg = compose_config(
        *tiny_overrides(
            "train.epochs=40", "train.early_stopping.enabled=true",
            "train.early_stopping.monitor=val_accuracy", "train.early_stopping.patience=1",
        )
    )  # fmt: skip
    result = training.train(cfg, *pipeline.data_for(cfg.data))
    assert 2 <= len(result.history) < 40
    assert list(result.history["epoch"]) == list(range(1, len(result.history) + 1))


@pytest.mark.slow
def test_a_run_far_below_what_the_data_allows_says_so(tmp_path):
    # SGD with momentum at lr 0.01 kills the ReLUs on the blobs' unscaled inputs (seen on
    # the README's old example): validation accuracy stays near 0.5 where 1.0 is possible.
    cfg = compose_config(*tiny_overrides("optimizer=sgd", "optimizer.lr=0.05", "train.epochs=3"))
    result = training.train(cfg, *pipeline.data_for(cfg.data))
    warning = training.shortfall(result)
    assert warning and "far below" in warning and "this data allows" in warning
    # ... in the Hydra app's summary and in the report too.
    out = run_cmd(
        [sys.executable, "-m", "softmaxlab", *tiny_overrides("optimizer=sgd", "optimizer.lr=0.05", "train.epochs=3"),
         "tracking.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"], ROOT,
    )  # fmt: skip
    assert "softmaxlab: warning: validation accuracy" in out.stderr and "far below" in out.stderr
    page = (tmp_path / "run" / "reports" / "report.html").read_text()
    assert "Training failed." in page and "this data allows" in page
    good = compose_config(*tiny_overrides("train.epochs=12"))
    assert training.shortfall(training.train(good, *pipeline.data_for(good.data))) is None


PROGRESS = f"""
from softmaxlab.core.config import compose, to_config
from softmaxlab.stages import pipeline
from softmaxlab.model import training
cfg = to_config(compose({tiny_overrides("tracking.enabled=false")!r}, with_schema=True))
training.train(cfg, *pipeline.data_for(cfg.data), progress=training.show_progress())
print("done")
"""


@pytest.mark.slow
def test_keras_progress_shows_on_a_terminal_and_stays_out_of_captured_output():
    captured = python(PROGRESS, "tensorflow")
    assert "Epoch" not in captured and captured.strip().endswith("done")

    env = env_with_venv(KERAS_BACKEND="tensorflow")
    env.pop("CI", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child runs on a pseudo-terminal, as in a person's shell
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-c", PROGRESS], env)
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    screen = b"".join(chunks).decode(errors="replace")
    assert "Epoch 1/2" in screen and "Epoch 2/2" in screen, screen[-2000:]
    assert "val_accuracy" in screen and "loss" in screen


def test_ci_logs_get_no_progress_bar_even_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("CI", "true")
    assert training.show_progress() is False
    monkeypatch.delenv("CI")
    assert training.show_progress() is True


def test_a_sweep_that_mixes_backends_fails_once_before_any_job(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "softmaxlab", "-m", "train.backend=tensorflow,jax", *tiny_overrides(),
            f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    out = run_cmd(args, ROOT, check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.backend=jax,tensorflow is not allowed in one sweep" in lines[0]
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.jax
def test_the_hydra_app_trains_on_jax_and_records_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "softmaxlab", "train.backend=jax", *tiny_overrides(),
            f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    run_cmd(args, ROOT)
    info = json.loads((tmp_path / "run" / "reports" / "train.json").read_text())
    assert info["backend"] == "jax"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(info["run_id"])
    assert run.data.tags["backend"] == "jax" and run.info.status == "FINISHED"
