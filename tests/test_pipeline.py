"""The four stages in-process (the Hydra path) against a real sqlite MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config, tiny_overrides

from softmaxlab import generate, pipeline, train
from softmaxlab.io import n_classes_of, read_predictions

CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")


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
    code = f"import sys, softmaxlab.{stage}; print(sorted({absent!r} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_train_stage_loads_keras_without_sklearn_and_leaves_sklearn_importable():
    # keras would import scikit-learn and SciPy's stats (~1.4 s) for wrappers we never use.
    code = (
        "import sys; from softmaxlab import train; train._tf(); import keras;"
        "hidden = 'sklearn' not in sys.modules and 'scipy.stats' not in sys.modules;"
        "from sklearn.datasets import make_blobs; make_blobs(n_samples=4, random_state=0);"
        "print(hidden, keras.layers.Dense(2)(keras.ops.ones((1, 3))).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True (1, 2)"


def test_metrics_json_has_the_dvc_keys_and_agrees_with_predictions(trained):
    cfg, root = trained["cfg"], trained["root"]
    metrics = json.loads((root / cfg.paths.metrics).read_text())
    for key in ["accuracy", "loss", "ece", "brier", "temperature", "ece_ts", "ece_ci_low", "ece_ci_high"]:
        assert key in metrics
    _, probs, labels = read_predictions(root / cfg.paths.predictions / "test.parquet")
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels), abs=1e-6)
    assert len(labels) == cfg.data.n_test
    assert metrics["ece_ci_low"] <= metrics["ece"] <= metrics["ece_ci_high"]


def test_predictions_hold_probabilities_logits_and_labels(trained):
    cfg, root = trained["cfg"], trained["root"]
    logits, probs, labels = read_predictions(root / cfg.paths.predictions / "val.parquet")
    k = len(cfg.data.centers)
    assert probs.shape == logits.shape and probs.shape[1] == k
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))
    n_train = cfg.data.n_samples - cfg.data.n_test
    assert len(labels) == n_train - int(n_train * (1 - cfg.train.validation_split))


def test_history_has_one_row_per_epoch(trained):
    cfg, root = trained["cfg"], trained["root"]
    history = pd.read_csv(root / cfg.paths.history)
    assert list(history.columns) == ["epoch", *CURVES]
    assert history["epoch"].tolist() == list(range(1, cfg.train.epochs + 1))


def test_mlflow_run_holds_params_curves_metrics_artifacts_model_and_provenance(trained):
    tracker, run_id, cfg = trained["tracker"], trained["run_id"], trained["cfg"]
    client = tracker.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden"] == "[12, 8]"
    assert run.data.params["optimizer.lr"] == "0.001"
    for key in ["test_accuracy", "test_loss", "test_ece", "test_brier", "temperature", "test_ece_ts",
                "test_ece_ci_low", "test_nll_ts_ci_high", "test_ece_adaptive", "test_ece_classwise"]:  # fmt: skip
        assert key in run.data.metrics, key
    for curve in CURVES:
        steps = [m.step for m in client.get_metric_history(run_id, curve)]
        assert steps == list(range(1, cfg.train.epochs + 1)), curve
    tags = run.data.tags
    assert tags["device"] == "CPU"
    assert len(tags["data_md5"]) == 32
    assert "git_commit" in tags and "versions.tensorflow" in tags
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"calibration", "figures", "report.html"} <= artifacts
    figures = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "figures")}
    assert {"landscape.png", "confusion.png", "training_curves.png", "data.png", "reliability.png",
            "classwise.png"} <= figures  # fmt: skip
    calibration = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "calibration")}
    assert {"metrics.json", "reliability.csv", "reliability_ts.csv", "classwise.csv"} <= calibration


def test_logged_model_loads_and_predicts_the_saved_probabilities(trained):
    import mlflow

    tracker, run_id, cfg, root = trained["tracker"], trained["run_id"], trained["cfg"], trained["root"]
    models = mlflow.search_logged_models(
        experiment_ids=[tracker.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    assert len(models) == 1
    info = mlflow.models.get_model_info(models[0].model_uri)
    assert info.signature is not None and info.saved_input_example_info is not None
    test = pd.read_parquet(root / cfg.paths.test_data)
    loaded = mlflow.pyfunc.load_model(models[0].model_uri)
    out = np.asarray(loaded.predict(test[["x1", "x2"]].to_numpy(np.float32)))
    _, probs, _ = read_predictions(root / cfg.paths.predictions / "test.parquet")
    np.testing.assert_allclose(out, probs, atol=1e-5)


def test_same_config_gives_bit_identical_data():
    cfg = compose_config(*tiny_overrides())
    a_train, a_test = generate.generate(cfg.data, cfg.seed)
    b_train, b_test = generate.generate(cfg.data, cfg.seed)
    pd.testing.assert_frame_equal(a_train, b_train, check_exact=True)
    c_train, _ = generate.generate(cfg.data, cfg.seed + 1)
    assert not c_train.equals(a_train)


def test_same_config_gives_identical_training_on_cpu():
    cfg = compose_config(*tiny_overrides())
    train_df, test_df = pipeline.data_for(cfg.data, cfg.seed)
    a = train.train(cfg, train_df, test_df)
    b = train.train(cfg, train_df, test_df)
    pd.testing.assert_frame_equal(a.history, b.history, check_exact=True)
    pd.testing.assert_frame_equal(a.predictions["test"], b.predictions["test"], check_exact=True)


def test_seed_config_reaches_the_tutorials_accuracy_with_its_own_training_loop():
    """The tutorial's exact defaults (30 epochs, batch 5, Adam 1e-3) through our loop."""
    cfg = compose_config()
    train_df, test_df = pipeline.data_for(cfg.data, cfg.seed)
    result = train.train(cfg, train_df, test_df)
    _, probs, labels = read_predictions_frame(result.predictions["test"])
    assert np.mean(probs.argmax(1) == labels) >= 0.99
    assert len(result.history) == 30


def read_predictions_frame(df):
    k = n_classes_of(df)
    return None, df[[f"p{j}" for j in range(k)]].to_numpy(), df["label"].to_numpy()


def test_a_sweep_generates_each_data_set_once():
    # A seed no other test uses, so the cache starts without it whatever ran before.
    cfg = compose_config(*tiny_overrides("seed=987654"))
    before = len(pipeline._DATA_CACHE)
    first = pipeline.data_for(cfg.data, cfg.seed)
    again = pipeline.data_for(cfg.data, cfg.seed)
    assert again[0] is first[0] and len(pipeline._DATA_CACHE) == before + 1
    other = compose_config(*tiny_overrides("seed=987654", "data.cluster_std=2.0"))
    assert pipeline.data_for(other.data, other.seed)[0] is not first[0]


def test_tensorflow_start_up_noise_is_held_back_but_replayed_when_it_fails(capfd):
    import os

    with train._native_stderr_hushed(True):
        os.write(2, b"could not find cuda drivers\n")
    assert "cuda" not in capfd.readouterr().err
    with pytest.raises(ImportError), train._native_stderr_hushed(True):
        os.write(2, b"libcudnn.so: cannot open shared object file\n")
        raise ImportError("tensorflow")
    assert "libcudnn.so" in capfd.readouterr().err
