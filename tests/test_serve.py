"""The calibrated model each run registers, `softmaxlab promote`, and the served champion.

Servers are real `softmaxlab serve` processes (MLflow's scoring server) on 127.0.0.1, each in
its own process group, stopped by PID in the fixture's teardown.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config, env_with_venv, make_project, run_cmd, tiny_overrides

from softmaxlab.core import calibration
from softmaxlab.core import metrics as names
from softmaxlab.core.io import prob_columns, read_predictions
from softmaxlab.core.processes import free_port, stop_group
from softmaxlab.serving import promote

ROWS = [[15.0, 0.0], [0.0, 15.0]]


# -- the logged model -----------------------------------------------------------------------
def calibrated_model(trained) -> str:
    """The run's calibrated model; the raw Keras model is not logged beside it."""
    import mlflow

    client, run_id = trained["tracker"].client, trained["run_id"]
    models = mlflow.search_logged_models(
        experiment_ids=[trained["tracker"].experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert len(models) == 0 and "calibrated" in {a.path for a in client.list_artifacts(run_id)}
    return f"runs:/{run_id}/calibrated"


def expected_probs(root, cfg, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """softmax(logits / T) of the test split, from the train stage's saved logits."""
    logits, _, _ = read_predictions(root / cfg.paths.predictions / "test.parquet")
    probs = calibration.softmax(logits, temperature)
    return probs, probs.argmax(1)


def test_run_logs_and_registers_the_calibrated_model(trained):
    import mlflow

    cfg, root, metrics = trained["cfg"], trained["root"], trained["metrics"]
    uri = calibrated_model(trained)
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_names() == ["x1", "x2"]
    assert info.signature.outputs.input_names() == [*prob_columns(4), "predicted_class"]
    config = info.flavors["python_function"]["config"]
    assert config["temperature"] == metrics[names.TEMPERATURE] and config["features"] == ["x1", "x2"]
    example = mlflow.models.Model.load(uri).load_input_example(mlflow.artifacts.download_artifacts(uri))
    test = pd.read_parquet(root / cfg.paths.test_data)
    assert example.to_numpy().tolist() == test[["x1", "x2"]].iloc[:1].to_numpy().tolist()

    client = trained["tracker"].client
    (version,) = [
        v
        for v in client.search_model_versions(f"name = '{cfg.tracking.registered_model}'")
        if v.run_id == trained["run_id"]
    ]
    assert version.source.endswith(f"{trained['run_id']}/artifacts/calibrated")


def test_calibrated_model_predicts_softmax_of_logits_over_t(trained):
    import mlflow

    cfg, root, metrics = trained["cfg"], trained["root"], trained["metrics"]
    loaded = mlflow.pyfunc.load_model(calibrated_model(trained))
    test = pd.read_parquet(root / cfg.paths.test_data)
    out = loaded.predict(test[["x1", "x2"]])
    probs, classes = expected_probs(root, cfg, metrics[names.TEMPERATURE])
    np.testing.assert_allclose(out[prob_columns(4)].to_numpy(), probs, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(out["predicted_class"].to_numpy(), classes)
    # The temperature matters: at T it differs from the raw softmax the run reports as "before".
    _, raw, _ = read_predictions(root / cfg.paths.predictions / "test.parquet")
    assert metrics[names.TEMPERATURE] != pytest.approx(1.0) and not np.allclose(
        out[prob_columns(4)], raw, atol=1e-6
    )


def test_calibrated_model_ignores_a_column_beyond_its_features_as_mlflow_does(trained):
    # MLflow's schema enforcement drops undeclared columns before predict (and logs a
    # warning); the answer is the one for x1 and x2 alone. Refusing them would mean serving
    # without an input schema and redoing MLflow's checks by hand (docs/serving.md, Serve).
    import mlflow

    cfg, root = trained["cfg"], trained["root"]
    loaded = mlflow.pyfunc.load_model(calibrated_model(trained))
    test = pd.read_parquet(root / cfg.paths.test_data)[["x1", "x2"]].iloc[:5]
    with_extra = test.assign(x3=1e6, id=range(5))
    pd.testing.assert_frame_equal(loaded.predict(with_extra), loaded.predict(test))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            pd.DataFrame({"x1": [1.0, np.nan], "x2": [2.0, 3.0]}),
            "x1 must be a finite number, got nan in row 1",
        ),
        (pd.DataFrame({"x1": [1.0], "x2": [np.inf]}), "x2 must be a finite number, got inf in row 0"),
        (pd.DataFrame({"x1": [], "x2": []}, dtype=float), "no rows"),
    ],
)
def test_calibrated_model_refuses_what_schema_enforcement_lets_through(trained, frame, message):
    import mlflow
    from mlflow.exceptions import MlflowException

    loaded = mlflow.pyfunc.load_model(calibrated_model(trained))
    with pytest.raises(MlflowException, match=message) as err:
        loaded.predict(frame)
    assert err.value.get_http_status_code() == 400


# -- promote --------------------------------------------------------------------------------
@pytest.fixture
def registry(tmp_path):
    """A real sqlite store and registry; versions point at runs with chosen metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("promote", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("m")

    def add(status: str = "FINISHED", **metrics: float) -> str:
        run = client.create_run(exp)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status)
        return client.create_model_version(
            "m", f"runs:/{run.info.run_id}/calibrated", run.info.run_id
        ).version

    return client, add


def good(
    val_accuracy: float, val_nll: float, at_bound=0.0, test_accuracy=0.9, test_nll=0.3
) -> dict[str, float]:
    return {promote.VAL_ACCURACY: val_accuracy, promote.VAL_NLL: val_nll, promote.AT_BOUND: at_bound,
            names.TEMPERATURE: 1.3, names.test("accuracy"): test_accuracy, names.test("nll"): test_nll}  # fmt: skip


def test_promote_ranks_by_validation_only_and_moves_the_alias(registry):
    client, add = registry
    add(**good(0.95, 0.20))  # v1
    add("FAILED", **good(1.00, 0.01))  # v2: best numbers, but its run failed
    add(**good(1.00, 0.02, at_bound=1.0))  # v3: degenerate temperature fit
    add(**good(0.97, 0.30))  # v4: ties v5 on accuracy, worse NLL
    v5 = add(**good(0.97, 0.10))
    add(**good(0.96, 0.05, test_accuracy=1.0, test_nll=0.01))  # v6: best on test, which is not used

    text, best = promote.promote(client, "m", dry_run=True)
    assert best.version == int(v5) and "would point champion at version 5" in text
    with pytest.raises(Exception, match="alias"):
        client.get_model_version_by_alias("m", "champion")  # a dry run moves nothing
    rows = {int(line.split()[1]): line for line in text.splitlines()[2:-1]}  # version -> table row
    assert {v: row.split()[0] for v, row in rows.items()} == {5: "1", 4: "2", 6: "3", 1: "4", 2: "-", 3: "-"}
    assert "excluded: run FAILED" in rows[2] and "excluded: temperature at its search bound" in rows[3]

    text, best = promote.promote(client, "m")
    assert client.get_model_version_by_alias("m", "champion").version == v5
    tags = client.get_model_version("m", v5).tags
    assert tags["champion.rule"] == promote.RULE and tags["champion.previous_version"] == "none"
    assert float(tags["champion.val_nll"]) == 0.10

    v7 = add(**good(0.99, 0.5))  # a better run arrives: promote moves the alias to it
    text, best = promote.promote(client, "m")
    assert client.get_model_version_by_alias("m", "champion").version == v7
    assert client.get_model_version("m", v7).tags["champion.previous_version"] == str(v5)
    text, _ = promote.promote(client, "m")
    assert "already version 7; unchanged" in text


def test_promote_says_so_when_nothing_qualifies_and_moves_nothing(tmp_path):
    """Through the CLI: one line, exit code 2, the alias where it was."""
    from mlflow.tracking import MlflowClient

    project = make_project(tmp_path / "proj", *tiny_overrides("tracking.registered_model=m"))
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("m")
    for status, at_bound in (("FAILED", 0.0), ("FINISHED", 1.0)):
        run = client.create_run(exp)
        for key, value in good(0.9, 0.1, at_bound=at_bound).items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status)
        client.create_model_version("m", "runs:/x/calibrated", run.info.run_id)
    client.set_registered_model_alias("m", "champion", "1")

    proc = run_cmd([sys.executable, "-m", "softmaxlab", "promote"], project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "softmaxlab: error: no version of 'm' qualifies (see the notes above); the champion alias is unchanged "
        "(to serve one anyway: `softmaxlab serve --version N`)"
    ]
    assert (
        "excluded: run FAILED" in proc.stdout and "excluded: temperature at its search bound" in proc.stdout
    )
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"


@pytest.mark.slow
def test_promote_and_serve_refuse_a_missing_store_or_registered_model(tmp_path):
    from mlflow.tracking import MlflowClient

    project = make_project(tmp_path / "proj", *tiny_overrides("tracking.registered_model=nobody"))
    for cmd in ("promote", "serve"):
        proc = run_cmd([sys.executable, "-m", "softmaxlab", cmd], project, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("softmaxlab: error: no MLflow tracking store")
        assert not (project / "mlflow.db").exists()  # not created empty
    MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_experiments()  # an empty store
    for cmd, expected in (("promote", "no registered model 'nobody'"), ("serve", "has no champion")):
        proc = run_cmd([sys.executable, "-m", "softmaxlab", cmd], project, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert expected in proc.stderr


@pytest.mark.parametrize("name", ["", "a/b", "m@champion", "-x", "x" * 101])
def test_registered_model_name_is_validated(name):
    from softmaxlab.core.errors import UserError

    with pytest.raises(UserError, match="tracking.registered_model"):
        compose_config(f"tracking.registered_model='{name}'")


# -- serving --------------------------------------------------------------------------------
def post(port: int, payload: str | dict) -> tuple[int, dict]:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Server:
    """`softmaxlab serve` in its own process group, from a shell PATH without the venv."""

    def __init__(self, project, *args: str):
        self.port = free_port()
        env = env_with_venv(PATH="/usr/bin:/bin")  # MLflow must still find uvicorn
        self.log = project / f"serve-{self.port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "softmaxlab", "serve", "--port", str(self.port), *args],
                cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 300  # not a speed check: a guard against a hung start
        while time.monotonic() < deadline and self.proc.poll() is None:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_group(self.proc)


SERVED = tiny_overrides("data=overlap", "train.epochs=5", "tracking.registered_model=served")


def served_run(project, uri: str, seed: int) -> dict:
    """A tiny run registered as the next version of `served`, on overlapping classes: there
    the temperature is fitted inside its bounds."""
    from softmaxlab.stages import pipeline
    from softmaxlab.tracking.tracker import connect

    cfg = compose_config(*SERVED, f"seed={seed}", f"tracking.uri={uri}")
    root = project / f"run{seed}"
    metrics = pipeline.run(cfg, root, connect(cfg), run_name=f"seed{seed}")
    test = pd.read_parquet(root / cfg.paths.test_data)[["x1", "x2"]]
    return {"cfg": cfg, "root": root, "metrics": metrics, "test": test}


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """A project with one tiny run (seed 0), version 1 of `served`."""
    project = make_project(tmp_path_factory.mktemp("serve") / "proj", *SERVED)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return project, uri, [served_run(project, uri, 0)]


@pytest.fixture(scope="module")
def two_runs(one_run):
    """The same project with a second run (seed 1), version 2 of `served`."""
    project, uri, runs = one_run
    if len(runs) == 1:
        runs.append(served_run(project, uri, 1))
    return project, uri, runs


@pytest.fixture
def servers():
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


def served_probs(port: int, test: pd.DataFrame) -> pd.DataFrame:
    status, body = post(
        port, {"dataframe_split": {"columns": ["x1", "x2"], "data": test.to_numpy().tolist()}}
    )
    assert status == 200, body
    return pd.DataFrame(body["predictions"])


def test_served_champion_answers_softmax_of_logits_over_t_and_refuses_bad_input(one_run, servers):
    from mlflow.tracking import MlflowClient

    project, uri, runs = one_run
    MlflowClient(uri).set_registered_model_alias("served", "champion", "1")
    server = Server(project)
    servers.append(server)
    assert "serving models:/served@champion (version 1" in server.log.read_text()
    assert "curl -s http://127.0.0.1:" in server.log.read_text()

    run = runs[0]
    out = served_probs(server.port, run["test"])
    probs, classes = expected_probs(run["root"], run["cfg"], run["metrics"][names.TEMPERATURE])
    assert list(out.columns) == [*prob_columns(4), "predicted_class"]
    np.testing.assert_allclose(out[prob_columns(4)].to_numpy(), probs, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(out["predicted_class"].to_numpy(), classes)

    bad = {
        "missing column": (
            {"dataframe_split": {"columns": ["x1"], "data": [[1.0]]}},
            "missing inputs ['x2']",
        ),
        "unknown column": (
            {"dataframe_split": {"columns": ["x1", "x3"], "data": [[1.0, 2.0]]}},
            "extra inputs: ['x3']",
        ),
        "non-numeric": ({"dataframe_split": {"columns": ["x1", "x2"], "data": [["a", 2.0]]}}, "x1"),
        "NaN": (
            '{"dataframe_split": {"columns": ["x1", "x2"], "data": [[1.0, NaN]]}}',
            "x2 must be a finite",
        ),
        "null": (
            {"dataframe_split": {"columns": ["x1", "x2"], "data": [[None, 2.0]]}},
            "x1 must be a finite",
        ),
        "infinity": ('{"dataframe_records": [{"x1": -Infinity, "x2": 2.0}]}', "x1 must be a finite"),
        "no rows": ({"dataframe_split": {"columns": ["x1", "x2"], "data": []}}, "no rows"),
    }
    for case, (payload, message) in bad.items():
        status, body = post(server.port, payload)
        assert status == 400 and message in body["message"], (case, body)
        status, body = post(server.port, {"dataframe_records": [{"x1": 15.0, "x2": 0.0}]})
        assert status == 200 and len(body["predictions"]) == 1, case  # still serving

    # A column beyond x1 and x2 is dropped (MLflow's schema enforcement), named in the log.
    rows = run["test"].iloc[:3]
    extra = {
        "dataframe_split": {"columns": ["x1", "x2", "x3"], "data": rows.assign(x3=7.0).to_numpy().tolist()}
    }
    status, body = post(server.port, extra)
    assert status == 200 and pd.DataFrame(body["predictions"]).equals(served_probs(server.port, rows))
    assert "['x3']" in server.log.read_text() and "will be ignored" in server.log.read_text()


@pytest.mark.slow
def test_a_new_server_after_promote_serves_the_new_champion(two_runs, servers):
    from mlflow.tracking import MlflowClient

    project, uri, runs = two_runs
    client = MlflowClient(uri)
    _, best = promote.promote(client, "served", dry_run=True)
    assert best is not None  # both runs qualify: FINISHED, temperature inside its bounds
    other = 3 - best.version
    client.set_registered_model_alias("served", "champion", str(other))
    old = Server(project)
    servers.append(old)
    out = run_cmd([sys.executable, "-m", "softmaxlab", "promote"], project)
    assert f"champion: served version {best.version} " in out.stdout and f"was {other}" in out.stdout
    new = Server(project)
    servers.append(new)

    def assert_serves(server: Server, version: int) -> None:
        run = runs[version - 1]
        probs, _ = expected_probs(run["root"], run["cfg"], run["metrics"][names.TEMPERATURE])
        served = served_probs(server.port, run["test"])[prob_columns(4)]
        np.testing.assert_allclose(served, probs, atol=1e-6, rtol=0)

    assert_serves(new, best.version)
    assert_serves(old, other)  # the old server resolved the alias when it started
    pinned = Server(project, "--version", str(other))  # a specific version, whatever the alias says
    servers.append(pinned)
    assert_serves(pinned, other)
