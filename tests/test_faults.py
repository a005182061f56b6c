"""Bad input and faults: a clear one-line error, a non-zero exit, no traceback, no run left
RUNNING, and the previous outputs intact — through the commands users actually type.

Each bad value of params.yaml is checked once: what it says in test_config.py (BAD_VALUES,
in-process), what a command does with one here (a representative of each path)."""

from __future__ import annotations

import hashlib
import os
import pty
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from conftest import Lines, ctrl_c_reaches_it, env_with_venv, make_project, run_cmd, tiny_overrides

OUTPUT_DIRS = ["data", "models", "predictions", "reports"]


@pytest.fixture
def good_project(ran_project):
    """A project whose pipeline has run once: the outputs every failure must leave intact."""
    return ran_project[0]


def snapshot(project: Path, exclude: set[str] = frozenset()) -> dict[str, str]:
    files = {}
    for d in OUTPUT_DIRS:
        for p in sorted((project / d).rglob("*")):
            rel = str(p.relative_to(project))
            if p.is_file() and rel not in exclude:
                files[rel] = hashlib.md5(p.read_bytes()).hexdigest()
    return files


def run_statuses(project: Path) -> list[str]:
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return [r.info.status for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def edit_params(key_path: str, value: str):
    """Set one key of params.yaml to a raw YAML value, as a person editing it would."""

    def apply(project: Path):
        import yaml

        params = yaml.safe_load((project / "params.yaml").read_text())
        *parents, leaf = key_path.split(".")
        node = params
        for k in parents:
            node = node[k]
        node[leaf] = yaml.safe_load(value)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    return apply


def write_params(text: str):
    def apply(project: Path):
        (project / "params.yaml").write_text(text)

    return apply


def edit_split(fn):
    def apply(project: Path):
        path = project / "data" / "train.parquet"
        fn(path)

    return apply


def _frame(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path):
    path.write_text("x1,x2,label\n1,2,0\n")


def drop_column(path: Path):
    _frame(path).drop(columns=["x2"]).to_parquet(path, index=False)


def nan_value(path: Path):
    df = _frame(path)
    df.loc[3, "x1"] = float("nan")
    df.to_parquet(path, index=False)


def inf_value(path: Path):
    df = _frame(path)
    df.loc[5, "x2"] = float("inf")
    df.to_parquet(path, index=False)


def bad_label(path: Path):
    df = _frame(path)
    df.loc[7, "label"] = 9
    df.to_parquet(path, index=False)


def empty_split(path: Path):
    _frame(path).iloc[:0].to_parquet(path, index=False)


def string_feature(path: Path):
    df = _frame(path)
    df["x1"] = df["x1"].astype(str)
    df.to_parquet(path, index=False)


def float_labels(path: Path):
    df = _frame(path)
    df["label"] = df["label"].astype(float) + 0.5
    df.to_parquet(path, index=False)


def tiny_split(path: Path):
    _frame(path).iloc[:1].to_parquet(path, index=False)


def delete(path: Path):
    path.unlink()


def edit_output(rel: str, fn):
    """A file a stage wrote, damaged or edited by hand before the next stage reads it."""

    def apply(project: Path):
        fn(project / rel)

    return apply


def unnormalised(path: Path):
    df = _frame(path)
    probs = [c for c in df.columns if c.startswith("p")]
    df[probs] = df[probs] * 0.9  # every row sums to 0.9
    df.to_parquet(path, index=False)


def drop_grid_rows(path: Path):
    _frame(path).iloc[:-7].to_parquet(path, index=False)


def drop_history_column(path: Path):
    pd.read_csv(path).drop(columns=["val_loss"]).to_csv(path, index=False)


def drop_tracking_uri(path: Path):
    import json

    info = json.loads(path.read_text())
    del info["tracking_uri"]
    path.write_text(json.dumps(info))


def drop_logits(path: Path):
    df = _frame(path)
    df.drop(columns=[c for c in df.columns if c.startswith("logit")]).to_parquet(path, index=False)


@dataclass
class Case:
    id: str
    setup: object
    cmd: list[str]
    needles: list[str]
    env: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = 2  # None: any non-zero (the command is DVC's, not ours)
    changed: set[str] = field(default_factory=set)  # outputs the setup itself altered
    absent: list[str] = field(default_factory=list)  # what the message must not say
    slow: bool = False  # one more case of a path the fast tier has a case of


DVC = ["dvc", "repro"]
CHECK = [sys.executable, "-m", "softmaxlab.stages.check"]
TRAIN = [sys.executable, "-m", "softmaxlab.stages.train"]
APP = [sys.executable, "-m", "softmaxlab", "hydra.run.dir=hydra_out"]
EVALUATE = [sys.executable, "-m", "softmaxlab.stages.evaluate"]
REPORT = [sys.executable, "-m", "softmaxlab.stages.report"]
SPLIT = {"data/train.parquet"}
GRID, TEST_PRED = "predictions/grid.parquet", "predictions/test.parquet"
METRICS = "reports/calibration/metrics.json"
HISTORY, TRAIN_JSON = "reports/history.csv", "reports/train.json"

CASES = [
    # params.yaml edited by hand, then `dvc repro`: a value (test_config.py's BAD_VALUES has
    # every rule), and YAML that does not parse; then a value of the wrong type, through the
    # check stage that `dvc repro` runs first
    Case(
        "lr-negative",
        edit_params("optimizer.lr", "-0.1"),
        DVC,
        ["optimizer.lr=-0.1", "must be in"],
        exit_code=None,
    ),
    Case("broken-yaml", write_params("seed: [1, 2\nmodel: {"), DVC, ["params.yaml"], exit_code=None),
    Case("epochs-text", edit_params("train.epochs", "ten"), CHECK, ["train.epochs", "ten"]),
    # a stage without its params.yaml, or asked for what the machine lacks
    Case("stage-no-params", lambda p: (p / "params.yaml").unlink(), TRAIN, ["params.yaml", "make params"]),
    Case("gpu-missing", edit_params("train.device", "gpu"), TRAIN, ["train.device='gpu'", "no GPU"]),
    # data files corrupted or edited by hand, then the train stage
    Case(
        "truncated", edit_split(truncate), TRAIN, ["train.parquet", "not a readable Parquet"], changed=SPLIT
    ),
    Case(
        "not-parquet", edit_split(garbage), TRAIN, ["train.parquet", "not a readable Parquet"], changed=SPLIT
    ),
    Case("missing-column", edit_split(drop_column), TRAIN, ["columns", "x2"], changed=SPLIT),
    Case("nan", edit_split(nan_value), TRAIN, ["x1", "nan", "row 3"], changed=SPLIT),
    Case("inf", edit_split(inf_value), TRAIN, ["x2", "inf", "row 5"], changed=SPLIT),
    Case("label-range", edit_split(bad_label), TRAIN, ["label 9", "row 7", "0..3"], changed=SPLIT),
    Case("empty", edit_split(empty_split), TRAIN, ["empty"], changed=SPLIT),
    Case("string-x1", edit_split(string_feature), TRAIN, ["x1", "dtype"], changed=SPLIT),
    Case("float-labels", edit_split(float_labels), TRAIN, ["label", "dtype"], changed=SPLIT),
    Case("one-row", edit_split(tiny_split), TRAIN, ["1 rows", "validation"], changed=SPLIT),
    Case("no-data", edit_split(delete), TRAIN, ["train.parquet", "not found"], changed=SPLIT),
    # a stage's own outputs damaged or edited by hand, then the stage that reads them
    Case(
        "grid-damaged",
        edit_output(GRID, truncate),
        REPORT,
        ["grid.parquet", "not a readable Parquet file", "dvc repro -f -s train"],
        changed={GRID},
    ),
    Case(
        "predictions-columns",
        edit_output(TEST_PRED, drop_logits),
        EVALUATE,
        ["test.parquet", "columns are", "logit0"],
        changed={TEST_PRED},
        slow=True,
    ),
    Case(
        "metrics-damaged",
        edit_output(METRICS, garbage),
        REPORT,
        ["metrics.json", "not a readable JSON file", "dvc repro -f -s evaluate"],
        changed={METRICS},
        slow=True,
    ),
    Case(
        "predictions-not-summing-to-1",
        edit_output(TEST_PRED, unnormalised),
        EVALUATE,
        ["test.parquet", "sum to", "not 1", "dvc repro -f -s train"],
        changed={TEST_PRED},
    ),
    Case(
        "grid-rows-removed",
        edit_output(GRID, drop_grid_rows),
        REPORT,
        ["grid.parquet", "do not make a full", "dvc repro -f -s train"],
        changed={GRID},
        slow=True,
    ),
    Case(
        "history-column-missing",
        edit_output(HISTORY, drop_history_column),
        REPORT,
        ["history.csv", "no column val_loss", "dvc repro -f -s train"],
        changed={HISTORY},
        slow=True,
    ),
    Case(
        "train-json-without-uri",
        edit_output(TRAIN_JSON, drop_tracking_uri),
        REPORT,
        ["train.json", "no tracking_uri", "dvc repro -f -s train"],
        changed={TRAIN_JSON},
        slow=True,
    ),
    # environment
    Case(
        "bad-uri-scheme",
        None,
        TRAIN,
        ["bogus://nowhere", "not usable"],
        env={"MLFLOW_TRACKING_URI": "bogus://nowhere"},
    ),
    # the Hydra app
    Case("app-unknown-option", None, [*APP, "model=huge"], ["model", "huge"], slow=True),
    Case("app-bad-type", None, [*APP, "train.epochs=many"], ["train.epochs", "many"]),
    Case("app-bad-value", None, [*APP, "optimizer.lr=-1"], ["optimizer.lr=-1.0"]),
    Case("app-unknown-key", None, [*APP, "train.lerning_rate=0.1"], ["lerning_rate"], slow=True),
    # typos get the right hint, not Hydra's `+train.epoch=5` (which would add a key we refuse)
    Case(
        "app-typo-key",
        None,
        [*APP, "train.epoch=5"],
        ["train.epoch: no such key; did you mean `train.epochs`?"],
        absent=["+train.epoch"],
    ),
    Case(
        "app-typo-option",
        None,
        [*APP, "model=wdie"],
        ["model=wdie: no such option; did you mean `model=wide`?", "deep, seed, tiny, wide"],
    ),
    Case(
        "app-added-key",
        None,
        [*APP, "+train.epoch=5"],
        ["train.epoch: no such key; did you mean `train.epochs`?"],
        slow=True,
    ),
    Case(
        "check-typo-key",
        edit_params("train.epoch", "5"),
        CHECK,
        ["did you mean `train.epochs`?", "git show HEAD:params.yaml > params.yaml"],
    ),
    # a sweep whose shared settings are wrong fails once, before any job runs
    Case(
        "sweep-bad-base",
        None,
        [sys.executable, "-m", "softmaxlab", "-m", "hydra.sweep.dir=sweep_out", "train.epochs=0", "seed=0,1"],
        ["train.epochs=0"],
        slow=True,
    ),
    # an optimising sweeper must go the way of the validation objective it tunes on
    Case(
        "optuna-direction",
        None,
        [*APP[:3], "-m", "hydra.sweep.dir=sweep_out", "sweep=optuna", "hydra.sweeper.direction=maximize"],
        ["hydra.sweeper.direction=maximize", "objective=val/nll", "minimize"],
        slow=True,
    ),
    Case(
        "summarize-quote",
        None,
        [sys.executable, "-m", "softmaxlab", "summarize", "a'b"],
        ['sweep id "a\'b" is not valid'],
    ),
    Case(
        "summarize-usage",
        None,
        [sys.executable, "-m", "softmaxlab", "summarize"],
        ["usage: softmaxlab summarize"],
    ),
]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_bad_input_fails_clearly_and_loses_nothing(case, good_project, tmp_path):
    project = tmp_path / "proj"
    shutil.copytree(good_project, project, symlinks=True)
    if case.setup:
        case.setup(project)
    before = snapshot(project, exclude=case.changed)
    lock_before = (project / "dvc.lock").read_bytes()
    runs_before = run_statuses(project)

    proc = subprocess.run(case.cmd, cwd=project, env=env_with_venv(**case.env), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr

    assert proc.returncode != 0, out
    if case.exit_code is not None:
        assert proc.returncode == case.exit_code, out
    for needle in case.needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    for needle in case.absent:
        assert needle not in out, f"{needle!r} in:\n{out}"
    assert "Traceback" not in out, out
    if case.cmd[0] == sys.executable:  # ours, not DVC's
        ours = [line for line in proc.stderr.splitlines() if line.startswith("softmaxlab: error:")]
        assert len(ours) == 1, proc.stderr  # one line, not a wall of text
    statuses = run_statuses(project)
    assert "RUNNING" not in statuses, statuses
    assert statuses.count("FINISHED") == runs_before.count("FINISHED")
    assert_outputs_intact(project, case.cmd, before, lock_before, case.changed)
    assert not list(project.rglob(".*.tmp")) and not list(project.rglob(".model.keras*"))


def _lock_but_check(text: bytes) -> dict:
    import yaml

    lock = yaml.safe_load(text)
    lock["stages"].pop("check", None)
    return lock


def assert_outputs_intact(project, cmd, before, lock_before, exclude=frozenset()):
    """Our stages never touch an output unless they succeed (atomic writes). `dvc repro`
    removes a stage's outputs before running it; the last good ones stay in DVC's cache and
    dvc.lock, and `dvc checkout` brings them back byte for byte. The `check` stage only
    validates params.yaml: where it passed and a later stage failed, DVC records the new
    params for it, so its entry alone may change."""
    assert _lock_but_check((project / "dvc.lock").read_bytes()) == _lock_but_check(lock_before)
    if cmd is DVC and snapshot(project, exclude) != before:
        run_cmd(["dvc", "checkout", "--force"], project)
    assert snapshot(project, exclude) == before


@pytest.mark.slow
def test_nan_loss_stops_training_marks_the_run_failed_and_keeps_outputs(good_project, tmp_path):
    project = tmp_path / "proj"
    shutil.copytree(good_project, project, symlinks=True)
    for key, value in [("model.activation", "elu"), ("optimizer.name", "sgd"), ("optimizer.lr", "1000.0")]:
        edit_params(key, value)(project)
    before, lock_before = snapshot(project), (project / "dvc.lock").read_bytes()
    proc = subprocess.run(DVC, cwd=project, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "training diverged" in out and "lower optimizer.lr" in out, out
    assert "Traceback" not in out
    statuses = run_statuses(project)
    assert statuses.count("FAILED") == 1 and "RUNNING" not in statuses
    assert_outputs_intact(project, DVC, before, lock_before)
    # Fix the config and the next repro recovers.
    edit_params("optimizer.lr", "0.01")(project)
    run_cmd(DVC, project)
    assert "RUNNING" not in run_statuses(project)


@pytest.mark.slow
def test_ctrl_c_during_training_marks_the_run_killed_and_keeps_outputs(good_project, tmp_path):
    project = tmp_path / "proj"
    shutil.copytree(good_project, project, symlinks=True)
    edit_params("train.epochs", "100000")(project)
    before = snapshot(project)
    # On a terminal, as a person presses Ctrl-C in one: Keras' progress there says when the
    # epoch loop is under way ("Epoch 2/100000"), the moment to interrupt it.
    terminal, tty = pty.openpty()
    env = env_with_venv()
    env.pop("CI", None)  # CI logs get no progress display
    proc = subprocess.Popen(TRAIN, cwd=project, env=env, stdout=tty, preexec_fn=ctrl_c_reaches_it,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    os.close(tty)
    with open(terminal, errors="replace") as shown:
        screen = Lines(shown)
        try:
            in_loop = screen.wait_for("Epoch 2/", timeout=180)
            assert in_loop and proc.poll() is None, (proc.poll(), "".join(screen.lines)[-2000:])
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            screen.text()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    statuses = run_statuses(project)
    assert "KILLED" in statuses and "RUNNING" not in statuses
    assert snapshot(project) == before
    assert not [p for p in project.rglob(".*") if p.is_file() and p.parent.name in OUTPUT_DIRS]


@pytest.mark.slow
def test_same_config_gives_identical_bytes_and_metrics_in_fresh_projects(ran_project, tmp_path):
    # Determinism's one test: two fresh projects, the second run here, byte for byte.
    a, _ = ran_project
    b = make_project(tmp_path / "b", *tiny_overrides())
    run_cmd(DVC, b)
    assert (a / "data/train.parquet").read_bytes() == (b / "data/train.parquet").read_bytes()
    assert (a / "data/test.parquet").read_bytes() == (b / "data/test.parquet").read_bytes()
    assert (a / "reports/metrics.json").read_text() == (b / "reports/metrics.json").read_text()
    assert (a / "predictions/test.parquet").read_bytes() == (b / "predictions/test.parquet").read_bytes()
    # What docs/reproducibility.md says differs between two runs on one machine, and nothing else.
    import yaml

    def out_hashes(project):
        lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
        return {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])}

    ha, hb = out_hashes(a), out_hashes(b)
    assert sorted(k for k in ha if ha[k] != hb[k]) == [
        "models/model.keras",
        "reports/report.html",
        "reports/train.json",
    ]


def test_saved_model_loads_in_keras_safe_mode(good_project):
    import numpy as np

    from softmaxlab.model.network import load_model

    model = load_model(good_project / "models" / "model.keras")
    test = pd.read_parquet(good_project / "data" / "test.parquet")
    probs = np.asarray(model(test[["x1", "x2"]].to_numpy(np.float32)))
    saved = pd.read_parquet(good_project / "predictions" / "test.parquet")
    np.testing.assert_allclose(probs, saved[[f"p{j}" for j in range(4)]].to_numpy(), atol=1e-5)


def test_unsafe_model_is_refused_in_safe_mode(tmp_path):
    import keras

    from softmaxlab.model.network import load_model

    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)])
    path = tmp_path / "unsafe.keras"
    model.save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        load_model(path)
