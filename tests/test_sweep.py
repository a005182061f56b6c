"""Hydra multirun (sequential and joblib) and DVC's queued grid, against real sqlite stores."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from conftest import make_project, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow


def sweep(project, *args):
    return run_cmd(
        ["python", "-m", "softmaxlab", "-m", *args, *tiny_overrides(), "hydra.sweep.dir=sweep"], project
    )


def runs(project):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["softmaxlab"], output_format="pandas")


def check_parent_and_children(project, n_jobs):
    df = runs(project)
    parents = df[df["tags.sweep_overrides"].notna()]
    children = df[df["tags.job_num"].notna()]
    assert len(parents) == 1 and len(children) == n_jobs
    parent = parents.iloc[0]
    assert parent["status"] == "FINISHED"
    assert (children["tags.mlflow.parentRunId"] == parent["run_id"]).all()
    assert (children["tags.sweep_id"] == parent["tags.sweep_id"]).all()
    assert (children["status"] == "FINISHED").all()
    assert sorted(children["tags.job_num"].astype(int)) == list(range(n_jobs))
    return parent


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("sweep") / "proj")


def test_in_process_multirun_logs_children_under_one_parent_with_summary(project):
    out = sweep(project, "model=seed,tiny", "seed=0,1").stdout
    parent = check_parent_and_children(project, 4)
    # seed=0,1 varies the weights and shuffling, not the data: every job is measured on one test set.
    children = runs(project).dropna(subset=["tags.job_num"])
    assert children["tags.data_md5"].nunique() == 1
    summary = pd.read_csv(project / "sweep" / "summary.csv")
    assert len(summary) == 4
    assert {"overrides", "val_nll", "accuracy", "nll", "ece", "ece_ts", "temperature", "train_s"} <= set(
        summary
    )
    # The sweep picks on the validation objective (val/nll, minimised); the picked job's test
    # metrics are reported beside it, not used to choose.
    best = summary.sort_values(["val_nll", "job"]).iloc[0]
    assert parent["tags.best.objective"] == "val/nll" and parent["tags.best.job"] == str(best["job"])
    assert parent["metrics.best/val/nll"] == pytest.approx(best["val_nll"])
    assert parent["metrics.best/test/accuracy"] == pytest.approx(best["accuracy"])
    # Only what varies between jobs is shown.
    assert set(summary["overrides"]) == {f"model={m} seed={s}" for m in ("seed", "tiny") for s in (0, 1)}
    assert (project / "sweep" / "accuracy_vs_ece.png").stat().st_size > 10_000
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(parent["run_id"], "summary")}
    assert {"summary/summary.csv", "summary/summary.md", "summary/accuracy_vs_ece.png"} <= logged
    assert "runs?workflowType=machine_learning" in out

    # A past sweep's summary can be rebuilt from MLflow alone.
    rebuilt = run_cmd(["softmaxlab", "summarize", parent["tags.sweep_id"], "rebuilt"], project)
    assert "summary:" in rebuilt.stdout
    pd.testing.assert_frame_equal(pd.read_csv(project / "rebuilt" / "summary.csv"), summary)


def test_parallel_joblib_sweep_loses_no_runs(tmp_path):
    project = make_project(tmp_path / "proj")
    sweep(project, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=seed,tiny", "seed=0,1")
    check_parent_and_children(project, 4)


def test_queued_dvc_grid_runs_and_shows_in_exp_show(tmp_path):
    project = make_project(tmp_path / "proj", *tiny_overrides())
    run_cmd(["dvc", "repro"], project)
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "baseline"], project)
    tiny = [a for o in tiny_overrides() for a in ("-S", o)]
    run_cmd(
        ["dvc", "exp", "run", "--queue", "-S", "model=seed,wide", "-S", "optimizer.lr=0.001,0.01", *tiny],
        project,
    )
    run_cmd(["dvc", "queue", "start", "-j", "1"], project)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = run_cmd(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") == 4, status
    shown = json.dumps(json.loads(run_cmd(["dvc", "exp", "show", "--json"], project).stdout))
    assert shown.count('"accuracy"') >= 5  # baseline + 4 experiments
    # Runs from DVC's temporary experiment copies land in the project's store, not the copies'.
    # model=seed, lr=0.001 is the baseline itself: DVC restores it from its run-cache without
    # training, so baseline + 3 trained experiments = 4 runs.
    df = runs(project)
    assert len(df) == 4
    assert df["status"].eq("FINISHED").all()


def test_a_bad_job_fails_alone_and_the_sweep_says_so(tmp_path):
    project = make_project(tmp_path / "proj")
    proc = run_cmd(
        ["python", "-m", "softmaxlab", "-m", "optimizer.lr=0.001,-1", *tiny_overrides(), "hydra.sweep.dir=sweep"],
        project, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("softmaxlab: error:")]
    assert len(errors) == 1 and "job 1" in errors[0] and "optimizer.lr=-1.0" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    df = runs(project)
    assert "RUNNING" not in set(df["status"])
    children = df[df["tags.job_num"].notna()].sort_values("tags.job_num")
    # The good job ran and was logged; the bad one is on record as FAILED, with its error.
    assert list(children["status"]) == ["FINISHED", "FAILED"]
    assert "optimizer.lr=-1.0" in children.iloc[1]["tags.error"]
    summary = pd.read_csv(project / "sweep" / "summary.csv")
    assert list(summary["status"]) == ["FINISHED", "FAILED"]
    parent = df[df["tags.sweep_overrides"].notna()].iloc[0]
    assert parent["status"] == "FAILED"  # the sweep as a whole did not complete
