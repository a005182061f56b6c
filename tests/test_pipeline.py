"""The four stages in-process (the Hydra path) against a real sqlite MLflow store."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config, tiny_overrides

from softmaxlab.core import metrics as names
from softmaxlab.core.io import n_classes_of, read_predictions
from softmaxlab.model import backend, network, training
from softmaxlab.stages import generate, pipeline


def test_stages_write_every_output(trained):
    cfg, root = trained["cfg"], trained["root"]
    p = cfg.paths
    for rel in [p.train_data, p.test_data, p.model, p.history, p.train_info, p.metrics, p.report]:
        assert (root / rel).is_file(), rel
    for name in ["val", "test", "grid"]:
        assert (root / p.predictions / f"{name}.parquet").is_file()
    for name in ["metrics.json", "reliability.csv", "reliability_ts.csv", "classwise.csv"]:
        assert (root / p.calibration / name).is_file(), name
    for name in ["data.png", "training_curves.png", "reliability.png", "classwise.png", "confusion.png",
                 "landscape.png"]:  # fmt: skip
        assert (root / p.figures / name).is_file(), name


def test_train_writes_what_it_ran_in_dvc_exp_show_order(trained):
    # reports/setup.json: the first columns of `dvc exp show`, in this order; model.hidden as
    # one word, which DVC never wraps over lines.
    setup = json.loads((trained["root"] / trained["cfg"].paths.setup).read_text())
    assert list(setup.items()) == [
        ("model", "seed"), ("hidden", "12-8"), ("optimizer", "adam"), ("lr", 0.001), ("epochs", 2), ("data", "blobs"),
        ("backend", "tensorflow"),
    ]  # fmt: skip
    metrics = json.loads((trained["root"] / trained["cfg"].paths.metrics).read_text())
    assert list(metrics)[:4] == ["accuracy", "nll", "ece", "ece_ts"]


@pytest.mark.parametrize(
    ("stage", "absent"),
    [
        ("generate", {"tensorflow", "mlflow", "matplotlib"}),
        ("evaluate", {"tensorflow", "mlflow", "matplotlib"}),
        ("report", {"tensorflow"}),
    ],
)
def test_stages_do_not_import_what_they_do_not_use(stage, absent):
    # Each `dvc repro` stage is its own process: an import it does not need costs seconds
    # on every run (TensorFlow ~6 s, MLflow ~3 s, matplotlib ~0.5 s on a 2-core machine).
    code = f"import sys, softmaxlab.stages.{stage}; print(sorted({absent!r} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_train_stage_loads_keras_without_sklearn_and_leaves_sklearn_importable():
    # keras would import scikit-learn and SciPy's stats (~1.4 s) for wrappers we never use.
    code = (
        "import sys; from softmaxlab.model import backend; backend.keras_module('tensorflow'); import keras;"
        "hidden = 'sklearn' not in sys.modules and 'scipy.stats' not in sys.modules;"
        "from sklearn.datasets import make_blobs; make_blobs(n_samples=4, random_state=0);"
        "print(hidden, keras.layers.Dense(2)(keras.ops.ones((1, 3))).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True (1, 2)"


def test_metrics_json_is_the_headline_and_agrees_with_predictions(trained):
    # What DVC shows (`dvc exp show`, `dvc metrics show`): a few numbers, no interval bounds.
    cfg, root = trained["cfg"], trained["root"]
    metrics = json.loads((root / cfg.paths.metrics).read_text())
    assert set(metrics) == {"accuracy", "nll", "ece", "ece_ts", "temperature", "val_nll"}
    _, probs, labels = read_predictions(root / cfg.paths.predictions / "test.parquet")
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels), rel=1e-3)  # 4 digits
    assert len(labels) == cfg.data.n_test
    full = json.loads((root / cfg.paths.calibration / "metrics.json").read_text())
    assert set(full) == set(names.evaluate_names())
    for metric in names.CALIBRATION:  # every metric has its interval, before and after scaling
        for scaled in (False, True):
            lo, hi = (full[names.test_ci(metric, end, scaled)] for end in names.CI_ENDS)
            assert np.isfinite([lo, hi]).all() and lo <= hi, (metric, scaled)
            # Means of per-sample terms sit inside their percentile interval. The binned ECE
            # family is biased upwards under resampling, so its interval may lie above the
            # point estimate (seen here: adaptive ECE 0.2414 outside [0.2442, ...]).
            if metric in ("accuracy", "nll", "brier"):
                assert lo <= full[names.test(metric, scaled)] <= hi, (metric, scaled)


def test_predictions_hold_probabilities_logits_and_labels(trained):
    cfg, root = trained["cfg"], trained["root"]
    logits, probs, labels = read_predictions(root / cfg.paths.predictions / "val.parquet")
    k = len(cfg.data.centers)
    assert probs.shape == logits.shape and probs.shape[1] == k
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))


def test_the_validation_split_is_the_last_fifth_of_the_training_data(trained):
    # 400 samples, 100 for test: of the 300 training rows the last 60 (validation_split 0.2,
    # as Keras's fit takes them, before any shuffling) are the validation split.
    cfg, root = trained["cfg"], trained["root"]
    assert (cfg.data.n_samples, cfg.data.n_test, cfg.train.validation_split) == (400, 100, 0.2)
    logits, _, labels = read_predictions(root / cfg.paths.predictions / "val.parquet")
    data = pd.read_parquet(root / cfg.paths.train_data)
    assert len(labels) == 60
    np.testing.assert_array_equal(labels, data["label"].to_numpy()[-60:])
    # The saved model, run on those rows, gives the saved validation predictions.
    model = network.load_model(root / cfg.paths.model)
    probs = np.asarray(model(data[["x1", "x2"]].to_numpy(np.float32)[-60:]))
    np.testing.assert_allclose(probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-5)


def test_history_has_one_row_per_epoch(trained):
    cfg, root = trained["cfg"], trained["root"]
    history = pd.read_csv(root / cfg.paths.history)
    assert list(history.columns) == ["epoch", *names.CURVES]
    assert history["epoch"].tolist() == list(range(1, cfg.train.epochs + 1))


def test_mlflow_run_holds_params_curves_metrics_artifacts_model_and_provenance(trained):
    tracker, run_id, cfg = trained["tracker"], trained["run_id"], trained["cfg"]
    client = tracker.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden"] == "[12, 8]"
    assert run.data.params["optimizer.lr"] == "0.001"
    assert set(names.evaluate_names()) <= set(run.data.metrics)
    for curve in names.CURVES.values():
        steps = [m.step for m in client.get_metric_history(run_id, curve)]
        assert steps == list(range(1, cfg.train.epochs + 1)), curve
    info = json.loads((trained["root"] / cfg.paths.train_info).read_text())
    assert run.data.metrics[names.TRAIN_SECONDS] == pytest.approx(info["train_seconds"], abs=1e-4)
    assert info["train_seconds"] > 0
    tags = run.data.tags
    # The device Keras trained on: "CPU", or "GPU: <name>" on a GPU machine.
    assert tags["device"] == backend.select_device(cfg.train.backend, cfg.train.device)[1] == info["device"]
    assert tags["backend"] == "tensorflow" and tags["backend_version"].startswith("2.")
    assert len(tags["data_md5"]) == 32
    assert "git_commit" in tags and "versions.tensorflow" in tags
    assert tags["git_dirty"] in ("true", "false")
    assert tags["mlflow.note.content"].startswith("model seed [12, 8], adam lr 0.001")
    assert f"test accuracy {run.data.metrics['test/accuracy']:.4f}" in tags["mlflow.note.content"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"calibration", "figures", "report.html"} <= artifacts
    figures = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "figures")}
    assert {"landscape.png", "confusion.png", "training_curves.png", "data.png", "reliability.png",
            "classwise.png"} <= figures  # fmt: skip
    calibration = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "calibration")}
    assert {"metrics.json", "reliability.csv", "reliability_ts.csv", "classwise.csv"} <= calibration


def test_only_data_seed_moves_the_data():
    # (Same config, same bytes: test_faults.py's two fresh projects, data to predictions.)
    cfg = compose_config(*tiny_overrides())
    a_train, a_test = generate.generate(cfg.data)
    # The training seed leaves the data alone: a sweep over seeds shares one test set.
    other_seed = compose_config(*tiny_overrides("seed=7"))
    assert other_seed.seed != cfg.seed and other_seed.data == cfg.data
    c_train, c_test = generate.generate(compose_config(*tiny_overrides("data.seed=7")).data)
    assert not c_train.equals(a_train) and not c_test.equals(a_test)


@pytest.mark.slow
def test_seed_config_reaches_the_tutorials_accuracy_through_keras_fit():
    """The tutorial's exact defaults (30 epochs, batch 5, Adam 1e-3) through keras.Model.fit."""
    cfg = compose_config()
    train_df, test_df = pipeline.data_for(cfg.data)
    result = training.train(cfg, train_df, test_df)
    _, probs, labels = read_predictions_frame(result.predictions["test"])
    assert np.mean(probs.argmax(1) == labels) >= 0.99
    assert len(result.history) == 30


def read_predictions_frame(df):
    k = n_classes_of(df)
    return None, df[[f"p{j}" for j in range(k)]].to_numpy(), df["label"].to_numpy()


def test_a_sweep_generates_each_data_set_once():
    # A data seed no other test uses, so the cache starts without it whatever ran before.
    cfg = compose_config(*tiny_overrides("data.seed=987654"))
    before = len(pipeline._DATA_CACHE)
    first = pipeline.data_for(cfg.data)
    again = pipeline.data_for(cfg.data)
    assert again[0] is first[0] and len(pipeline._DATA_CACHE) == before + 1
    same = compose_config(*tiny_overrides("data.seed=987654", "seed=3"))
    assert pipeline.data_for(same.data)[0] is first[0]  # another training seed, the same data
    other = compose_config(*tiny_overrides("data.seed=987654", "data.cluster_std=2.0"))
    assert pipeline.data_for(other.data)[0] is not first[0]


def test_tensorflow_start_up_noise_is_held_back_but_replayed_when_it_fails(capfd):
    import os

    with backend.native_stderr_hushed(True):
        os.write(2, b"could not find cuda drivers\n")
    assert "cuda" not in capfd.readouterr().err
    with pytest.raises(ImportError), backend.native_stderr_hushed(True):
        os.write(2, b"libcudnn.so: cannot open shared object file\n")
        raise ImportError("tensorflow")
    assert "libcudnn.so" in capfd.readouterr().err


def test_git_dirty_tag_says_whether_tracked_files_changed(tmp_path):
    from softmaxlab.tracking.provenance import git_state

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "init")
    clean = git_state(tmp_path)
    assert clean["git_dirty"] == "false" and len(clean["git_commit"]) == 40
    (tmp_path / "f.txt").write_text("b")
    assert git_state(tmp_path)["git_dirty"] == "true"


def test_nothing_from_the_environment_reaches_the_run(tmp_path, tracking_uri, monkeypatch):
    # Secrets planted in the environment, and credentials MLflow itself reads, must appear in
    # no tag, param, metric name or artifact of a run.
    import mlflow

    from softmaxlab.tracking.tracker import connect

    secrets = {"SOFTMAXLAB_TEST_TOKEN": "tok-4f1b9c2e7d", "MLFLOW_TRACKING_PASSWORD": "pw-8e3a1c55b0",
               "AWS_SECRET_ACCESS_KEY": "aws-77c0d9e1f2"}  # fmt: skip
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    cfg = compose_config(*tiny_overrides(f"tracking.uri={tracking_uri}", "tracking.log_model=true"))
    tracker = connect(cfg)
    run_id = pipeline.run(cfg, tmp_path / "run", tracker, run_name="secrets")["run_id"]
    run = tracker.client.get_run(run_id)
    data = run.data
    logged = " ".join([*data.tags, *data.tags.values(), *data.params, *data.params.values(), *data.metrics])
    files = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "artifacts"))
    blobs = [p.read_bytes() for p in Path(files).rglob("*") if p.is_file()]
    assert len(blobs) > 10  # report, figures, tables, the model's files
    for name, value in secrets.items():
        assert value not in logged, name
        assert not any(value.encode() in b for b in blobs), name
    assert "PATH" not in run.data.tags and "HOME" not in run.data.tags


@contextlib.contextmanager
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (test_tracking_server's), stopped by PID on the way
    out: (port, start, stop), where start() runs it again on the same port and database."""
    from test_tracking_server import free_port, start_mlflow_server

    port, proc = free_port(), {}

    def start():
        proc["server"] = start_mlflow_server(port, tmp_path)

    def stop():
        proc["server"].terminate()
        proc["server"].wait(timeout=60)

    start()
    try:
        yield port, start, stop
    finally:
        stop()


@pytest.mark.slow
def test_a_store_failing_at_a_runs_end_queues_the_end_and_keeps_the_blocks_own_error(tmp_path, monkeypatch):
    """Tracker.run's end, against a real server stopped by PID inside the block: the run (its
    pending tags or its error) is queued and ended once the server is back, and an error of
    the block itself is what comes out, not the store's."""
    from mlflow.tracking import MlflowClient

    from softmaxlab.tracking.server import is_tracking_error
    from softmaxlab.tracking.tracker import PENDING_TAG, connect, end_stranded, stranded_runs

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the stopped server is not waited on
    with mlflow_server(tmp_path) as (port, start, stop):
        uri = f"http://127.0.0.1:{port}"
        cfg = compose_config(*tiny_overrides(f"tracking.uri={uri}"))
        tracker = connect(cfg)
        # 1. The block succeeds, later stages still to run: tagging it pending fails.
        pending = tracker.run(cfg, run_name="pending", later_stages=("evaluate", "report"))
        with pytest.raises(Exception) as store_error, pending as pending_id:
            stop()
        assert is_tracking_error(store_error.value), store_error.value
        assert pending_id in stranded_runs()
        # 2. The block fails; the server is gone: the block's error, not the store's.
        start()
        with (
            pytest.raises(ValueError, match="the block's own error"),
            tracker.run(cfg, run_name="fails") as failed_id,
        ):
            stop()
            raise ValueError("the block's own error")
        assert failed_id in stranded_runs()
        # Back: both are ended, with what they could not be told at the time.
        start()
        assert end_stranded() == []
        server = MlflowClient(uri)
        ended, failed = server.get_run(pending_id), server.get_run(failed_id)
        assert ended.info.status == "FAILED" and ended.data.tags[PENDING_TAG] == "evaluate, report"
        assert failed.info.status == "FAILED" and failed.data.tags["error"] == "the block's own error"


@pytest.mark.slow
def test_a_later_stages_error_is_recorded_on_the_run_without_credentials(tmp_path, monkeypatch):
    """evaluate or report failing under `dvc repro` records its error on the run train opened
    (failure_recorded): an error that quotes the tracking URI loses the credentials in it."""
    from mlflow.tracking import MlflowClient

    from softmaxlab.core.io import write_json
    from softmaxlab.tracking.server import redact
    from softmaxlab.tracking.tracker import connect, failure_recorded, maybe_run

    with mlflow_server(tmp_path) as (port, _, _):
        uri = f"http://someone:pw-5c1e9a77d3@127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # credentials in the URI, from the environment
        cfg = compose_config(*tiny_overrides())
        monkeypatch.chdir(tmp_path)  # the stage's workspace, where train.json is
        tracker = connect(cfg)
        with maybe_run(tracker, cfg) as run_id:  # train: the run stays pending
            pass
        info = {"run_id": run_id, "experiment_id": tracker.experiment_id, "tracking_uri": redact(uri)}
        write_json(tmp_path / cfg.paths.train_info, info)
        with pytest.raises(RuntimeError), failure_recorded(cfg, "report"):
            raise RuntimeError(f"API request to {uri}/api/2.0/mlflow/runs/get failed")
        run = MlflowClient(f"http://127.0.0.1:{port}").get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["pipeline.failed_stage"] == "report"
    assert run.data.tags["error"].startswith("report: API request to http://***@127.0.0.1")
    written = " ".join([*run.data.tags.values(), *run.data.params.values()])
    assert "pw-5c1e9a77d3" not in written


@pytest.mark.slow
def test_with_early_stopping_the_kept_weights_are_what_is_recorded_warned_on_and_ranked_on(tmp_path):
    """restore_best_weights keeps an earlier epoch's weights: the saved model's validation
    accuracy is its own metric (the curves stay each epoch's, as trained), the shortfall
    warning and train.json describe the saved model, and promote ranks on it."""
    from softmaxlab.serving import promote
    from softmaxlab.tracking.tracker import connect

    # No epoch after the first improves val_loss by 100: the first epoch's weights are kept,
    # well below what the data allows, while the last epoch's are close to it.
    cfg = compose_config(*tiny_overrides(
        "train.epochs=12", "train.early_stopping.enabled=true", "train.early_stopping.min_delta=100",
        "train.early_stopping.patience=20", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.log_model=true",
    ))  # fmt: skip
    root = tmp_path / "run"
    tracker = connect(cfg)
    metrics = pipeline.run(cfg, root, tracker, run_name="kept")
    history = pd.read_csv(root / cfg.paths.history)
    info = json.loads((root / cfg.paths.train_info).read_text())
    _, probs, labels = read_predictions(root / cfg.paths.predictions / "val.parquet")
    saved = float(np.mean(probs.argmax(1) == labels))
    last = float(history["val_accuracy"].iloc[-1])
    assert saved == pytest.approx(history["val_accuracy"].iloc[0])  # the first epoch's weights
    assert last >= info["val_accuracy_reference"] - training.SHORTFALL_WARNING > saved  # the case in point

    run = tracker.client.get_run(metrics["run_id"])
    assert run.data.metrics[names.VAL_ACCURACY] == pytest.approx(saved)
    curve = tracker.client.get_metric_history(metrics["run_id"], names.CURVES["val_accuracy"])
    assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx(
        list(history["val_accuracy"])
    )
    assert info["val_accuracy"] == pytest.approx(saved)
    assert info["warning"].startswith(f"validation accuracy {saved:.3f} is far below")
    (candidate,) = promote.candidates(tracker.client, cfg.tracking.registered_model)
    assert candidate.metrics[promote.VAL_ACCURACY] == pytest.approx(saved)
    assert promote.RULE.startswith(f"highest {names.VAL_ACCURACY}")
