"""Hydra multirun and DVC's queued grid, against real sqlite stores. (Parallel jobs with the
joblib launcher: test_tracking_server.py's 8 jobs on 2 workers.)"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from conftest import ROOT, compose_config, copy_project, make_project, run_cmd, tiny_overrides


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
    proc = sweep(project, "model=seed,tiny", "seed=0,1")
    out = proc.stdout
    parent = check_parent_and_children(project, 4)
    # Progress after every job: k/N and an estimate of the time left, until the last.
    progress = [line for line in proc.stderr.splitlines() if line.startswith("sweep: ")]
    assert [p.split(" jobs done")[0] for p in progress] == [f"sweep: {k}/4" for k in range(1, 5)]
    assert all("left" in p for p in progress[:-1]) and "left" not in progress[-1]
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


@pytest.mark.slow
def test_queued_dvc_grid_runs_and_shows_in_exp_show(ran_project, tmp_path):
    project = copy_project(ran_project[0], tmp_path / "proj")  # its baseline ran and is committed
    tiny = [a for o in tiny_overrides() for a in ("-S", o)]
    run_cmd(
        ["dvc", "exp", "run", "--queue", "-S", "model=seed,wide", "-S", "optimizer.lr=0.001,0.01", *tiny],
        project,
    )
    run_cmd(["dvc", "queue", "start", "-j", "1"], project)
    # The experiments' runs ended (FINISHED, or not), then DVC's status of each: the deadline
    # is a bound for a queue that hangs, not a wait.
    deadline = time.time() + 600
    while time.time() < deadline:
        df = runs(project)
        if len(df) >= 4 and "RUNNING" not in set(df["status"]):
            break
        time.sleep(0.5)
    while True:
        status = run_cmd(["dvc", "queue", "status"], project).stdout
        if ("Queued" not in status and "Running" not in status) or time.time() > deadline:
            break
    assert status.count("Success") == 4, status
    shown = json.dumps(json.loads(run_cmd(["dvc", "exp", "show", "--json"], project).stdout))
    assert shown.count('"accuracy"') >= 5  # baseline + 4 experiments
    # Runs from DVC's temporary experiment copies land in the project's store, not the copies'.
    # model=seed, lr=0.001 is the baseline itself: DVC restores it from its run-cache without
    # training, so baseline + 3 trained experiments = 4 runs.
    df = runs(project)
    assert len(df) == 4
    assert df["status"].eq("FINISHED").all()


@pytest.mark.slow
def test_a_job_that_fails_while_training_fails_alone_and_the_sweep_says_so(tmp_path):
    project = make_project(tmp_path / "proj")
    # lr=1000 with SGD diverges (NaN loss): only training can find that out.
    jobs = ["optimizer=sgd", "model.activation=elu", "optimizer.lr=0.001,1000"]
    proc = run_cmd(["python", "-m", "softmaxlab", "-m", *jobs, *tiny_overrides(), "hydra.sweep.dir=sweep"],
                   project, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("softmaxlab: error:")]
    assert len(errors) == 1 and "job 1" in errors[0] and "diverged" in errors[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    df = runs(project)
    assert "RUNNING" not in set(df["status"])
    children = df[df["tags.job_num"].notna()].sort_values("tags.job_num")
    # The good job ran and was logged; the bad one is on record as FAILED.
    assert list(children["status"]) == ["FINISHED", "FAILED"]
    summary = pd.read_csv(project / "sweep" / "summary.csv")
    assert list(summary["status"]) == ["FINISHED", "FAILED"]
    parent = df[df["tags.sweep_overrides"].notna()].iloc[0]
    assert parent["status"] == "FAILED"  # the sweep as a whole did not complete


@pytest.mark.parametrize(
    "jobs,needle",
    [
        (["optimizer.lr=0.001,-1"], "sweep job 1 (optimizer.lr=-1 "),
        (["model=seed,wdie"], "model=wdie: no such option; did you mean `model=wide`?"),
        (["train.epoch=1,2"], "train.epoch: no such key; did you mean `train.epochs`?"),
    ],
)
def test_every_job_is_checked_before_the_first_trains_and_a_bad_one_leaves_no_run(tmp_path, jobs, needle):
    project = make_project(tmp_path / "proj")
    proc = run_cmd(["python", "-m", "softmaxlab", "-m", *jobs, *tiny_overrides(), "hydra.sweep.dir=sweep"],
                   project, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("softmaxlab: error:")]
    assert len(errors) == 1 and needle in errors[0] and errors[0].endswith("no job was run"), proc.stderr
    assert "softmaxlab: error: softmaxlab:" not in proc.stderr and "Traceback" not in proc.stderr
    assert "softmaxlab: test accuracy" not in proc.stdout  # no job trained
    assert not (project / "sweep" / "0").exists()
    # No parent run, FAILED or otherwise, and no child.
    assert not (project / "mlflow.db").exists() or runs(project).empty


def test_sweep_jobs_are_the_basic_sweepers_product_and_optunas_corners():
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from softmaxlab.core.config import register_configs
    from softmaxlab.sweeps.jobs import sweep_jobs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        grid = compose("config", ["sweep=grid12"], return_hydra_config=True)
        optuna = compose("config", ["sweep=optuna"], return_hydra_config=True)
    # The command line of `softmaxlab -m sweep=grid12 seed=1,2` (compose() takes no sweeps).
    with open_dict(grid):
        grid.hydra.overrides.task = ["sweep=grid12", "seed=1,2"]
    jobs = sweep_jobs(grid)
    assert len(jobs) == 24 and ["model=seed", "optimizer.lr=0.001", "sweep=grid12", "seed=1"] in jobs
    corners = sweep_jobs(optuna)
    assert len(corners) == 3 * 2 * 2
    assert {j[2] for j in corners} == {"optimizer.lr=0.0003", "optimizer.lr=0.03"}


def test_the_summary_shows_four_significant_digits():
    from softmaxlab.sweeps.summary import format_number, summary_table

    children = pd.DataFrame({
        "tags.job_num": ["1", "0"], "status": ["FINISHED"] * 2, "run_id": ["b", "a"],
        "tags.overrides": ["model=wide optimizer.lr=0.0012345678901234567 seed=3",
                           "model=seed optimizer.lr=0.013879088524426752 seed=3"],
    })  # fmt: skip
    table = summary_table(children)
    assert list(table["overrides"]) == ["model=seed optimizer.lr=0.01388", "model=wide optimizer.lr=0.001235"]
    assert [format_number(v) for v in (0.99600001, 5.7e-07, 12.3456, 0.1)] == [
        "0.996",
        "5.7e-07",
        "12.35",
        "0.1",
    ]


def test_tied_jobs_share_one_label_and_no_label_leaves_the_figure():
    from softmaxlab.sweeps.summary import accuracy_vs_ece

    table = pd.DataFrame({
        "job": [0, 1, 2, 3, 4], "overrides": ["a", "b", "c", "d", "e"],
        "accuracy": [1.0, 1.0, 1.0, 0.9, 0.95], "ece": [0.001, 0.001, 0.001, 0.2, 0.05],
    })  # fmt: skip
    fig = accuracy_vs_ece(table, "sweep x: 5 jobs")
    fig.canvas.draw()
    labels = [t for t in fig.axes[0].texts]
    assert sorted(t.get_text() for t in labels) == ["job 0, 1, 2", "job 3", "job 4"]
    renderer = fig.canvas.get_renderer()
    for t in labels:
        box = t.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, t.get_text()


@pytest.mark.parametrize(
    ("preset", "n_jobs"), [("grid12", 12), ("arch_lr_seed", 24), ("optimizers", 9), ("optuna", 12)]
)
def test_every_job_of_every_sweep_preset_composes_and_validates(preset, n_jobs):
    # Each preset in conf/sweep/ as its sweep would start: every job (Optuna: every choice and
    # interval end) composed and validated, as check_jobs does before the first one trains.
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from softmaxlab.core.config import register_configs
    from softmaxlab.sweeps.jobs import check_jobs, sweep_jobs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        config = compose("config", [f"sweep={preset}"], return_hydra_config=True)
        with open_dict(config):
            config.hydra.overrides.task = [f"sweep={preset}"]
        assert len(sweep_jobs(config)) == n_jobs
        check_jobs(config)  # raises, naming the job, if any of them is invalid
    assert config.objective == "val/nll"


@pytest.mark.slow
def test_optuna_preset_runs_tiny_and_picks_on_the_validation_objective(tmp_path):
    project = make_project(tmp_path / "proj")
    sweep(project, "sweep=optuna", "hydra.sweeper.n_trials=2")
    parent = check_parent_and_children(project, 2)
    summary = pd.read_csv(project / "sweep" / "summary.csv")
    best = summary.sort_values(["val_nll", "job"]).iloc[0]
    assert parent["tags.best.job"] == str(best["job"]) and parent["tags.best.objective"] == "val/nll"


@pytest.mark.slow
def test_a_sweep_whose_jobs_all_fail_exits_non_zero_with_tracking_off(tmp_path):
    # lr=1000 and 5000 with SGD (ELU: the ReLUs would die instead) diverge: every job fails alone, and the sweep says so in its
    # exit code without MLflow to count them.
    project = make_project(tmp_path / "proj")
    proc = run_cmd(["python", "-m", "softmaxlab", "-m", "optimizer=sgd", "model.activation=elu", "optimizer.lr=1000,5000",
                    *tiny_overrides("train.epochs=3"), "tracking.enabled=false", "hydra.sweep.dir=sweep"],
                   project, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("softmaxlab: error:")]
    assert len(errors) == 2 and all("diverged" in e for e in errors), proc.stderr
    assert "2 job(s) failed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (project / "mlflow.db").exists()
    # The same sweep dir used again by a sweep that succeeds: the earlier failures do not count.
    again = run_cmd(["python", "-m", "softmaxlab", "-m", "seed=0", *tiny_overrides(), "tracking.enabled=false",
                     "hydra.sweep.dir=sweep"], project, check=False)  # fmt: skip
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_a_sweep_whose_server_is_gone_at_the_end_still_exits_non_zero_for_its_failed_jobs(tmp_path):
    """A real `mlflow server`, stopped by PID once the sweep's parent run is on it: the jobs
    fail (they diverge) into the local store, and the MLflow summary, which counted failed jobs,
    cannot be written. The exit code still says they failed."""
    import subprocess
    import sys

    from conftest import env_with_venv
    from mlflow.tracking import MlflowClient
    from test_tracking_server import free_port, start_mlflow_server

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    project = make_project(tmp_path / "proj")
    server = start_mlflow_server(port, tmp_path)
    try:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "softmaxlab", "-m", "optimizer=sgd", "model.activation=elu", "optimizer.lr=1000,5000",
             *tiny_overrides("train.epochs=3"), "hydra.sweep.dir=sweep"],
            cwd=project, env=env_with_venv(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        remote, deadline = MlflowClient(uri), time.time() + 300
        while time.time() < deadline and sweep.poll() is None:
            exp = remote.get_experiment_by_name("softmaxlab")
            if exp and remote.search_runs([exp.experiment_id], "tags.sweep_overrides != ''"):
                break  # the parent run is there; no job has logged yet
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=60)
    try:
        _, err = sweep.communicate(timeout=600)
    finally:
        sweep.kill()
    assert "unreachable" in err and "softmaxlab sync" in err, err
    assert sweep.returncode == 1, err
    assert "2 job(s) failed" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_sweep_dir_with_a_quote_in_its_name_still_finds_its_runs(tmp_path):
    # The sweep id comes from the sweep dir's name and goes into MLflow filter strings.
    project = make_project(tmp_path / "proj")
    proc = run_cmd(["python", "-m", "softmaxlab", "-m", "seed=0", *tiny_overrides(),
                    "hydra.sweep.dir=\"o'neil sweep\""], project, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    parent = check_parent_and_children(project, 1)
    assert parent["tags.sweep_id"].startswith("o_neil_sweep-")
    assert len(pd.read_csv(project / "o'neil sweep" / "summary.csv")) == 1


@pytest.mark.slow
def test_a_store_still_failing_at_the_sweeps_end_is_waited_on_once_and_loses_no_failed_job(
    tmp_path, monkeypatch, capsys
):
    """The sweep's end against a real sqlite store that another process holds locked: the
    store is waited on once (one warning, not a second wait in close_parent), and a failed job
    the store could not record stays queued until it can."""
    import sqlite3

    from omegaconf import OmegaConf

    from softmaxlab.sweeps import parent
    from softmaxlab.sweeps.callback import SweepCallback
    from softmaxlab.tracking.tracker import connect

    db = tmp_path / "mlflow.db"
    cfg = compose_config(*tiny_overrides(f"tracking.uri=sqlite:///{db}"))
    tracker = connect(cfg)
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "overrides": {"task": ["seed=0,1"]}}}
    )
    for name in (parent.ENV_PARENT, parent.ENV_STORE):
        monkeypatch.setenv(name, "")  # open_parent sets them; restored after the test
    monkeypatch.setenv(parent.ENV_SWEEP, "sweep-test")
    monkeypatch.setattr(
        parent, "STORE_WAIT_S", 0
    )  # the failure is real; how long it is waited on is not the point
    parent.set_failed_jobs(0)
    parent.open_parent(config, cfg, tracker, "sweep-test")
    parent.defer_failed_job(1, "seed=1", "training diverged")  # job 1 failed while the store did too
    holder = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        # 1. Another process holds the whole database: reads fail too.
        holder.execute("BEGIN EXCLUSIVE")
        SweepCallback().on_multirun_end(config)
        assert parent.current_parent() is None
        parent.close_parent()  # as hydra_main does after the sweep
        err = capsys.readouterr().err
        assert len([line for line in err.splitlines() if "still fails" in line]) == 1, err
        assert parent.failed_jobs() >= 1
        # 2. It holds the write lock only: the store reads, but cannot record job 1.
        holder.execute("ROLLBACK")
        holder.execute("BEGIN IMMEDIATE")
        assert not parent.settle(tracker)
        # 3. Free again: job 1 is recorded, once.
        holder.execute("ROLLBACK")
        assert parent.settle(tracker)
    finally:
        holder.close()
        parent.set_failed_jobs(0)
    jobs = tracker.client.search_runs([tracker.experiment_id], "tags.job_num = '1'")
    assert [(r.info.status, r.data.tags["error"]) for r in jobs] == [("FAILED", "training diverged")]


def test_a_sync_whose_end_of_copy_fails_leaves_no_copy_running_and_the_next_one_ends_it(
    tmp_path, monkeypatch
):
    """sync ends a copy before it marks it complete: a copy whose end the target did not take
    (the call fails once, a unit-level fault on real sqlite stores) is discarded, and the next
    sync copies the run again, to a FINISHED copy, instead of reusing one left RUNNING."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from softmaxlab.core.errors import UserError
    from softmaxlab.tracking import sync

    local_uri, target_uri = f"sqlite:///{tmp_path / 'local.db'}", f"sqlite:///{tmp_path / 'server.db'}"
    local = MlflowClient(local_uri)
    exp = local.create_experiment("softmaxlab", artifact_location=str(tmp_path / "artifacts"))
    run = local.create_run(exp, tags={sync.FALLBACK_TAG: target_uri}, run_name="fell back")
    local.log_metric(run.info.run_id, "val/nll", 0.5)
    local.set_terminated(run.info.run_id, "FINISHED")

    real_set_terminated, calls = MlflowClient.set_terminated, []

    def fails_once(self, run_id, *args, **kwargs):
        calls.append(run_id)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return real_set_terminated(self, run_id, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "set_terminated", fails_once)
        with pytest.raises(UserError, match="sync stopped at run"):
            sync.sync(target_uri, local_uri)
    assert len(sync.sync(target_uri, local_uri)) == 1
    server = MlflowClient(target_uri)
    server_exp = server.get_experiment_by_name("softmaxlab").experiment_id
    every = server.search_runs([server_exp], run_view_type=ViewType.ALL)
    assert "RUNNING" not in [r.info.status for r in every]
    (copy,) = server.search_runs([server_exp])
    assert copy.info.status == "FINISHED" and copy.data.tags[sync.COMPLETE_TAG] == "true"
    assert copy.data.metrics["val/nll"] == 0.5
