"""`dvc repro` and `dvc exp run` in a real temporary git + DVC project, as a user runs them."""

from __future__ import annotations

import json

import pytest
from conftest import make_project, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow


def runs_in(project):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("softmaxlab")
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("dvc") / "proj", *tiny_overrides())
    first = run_cmd(["dvc", "repro"], project)
    return project, first


def test_repro_runs_four_stages_and_one_mlflow_run(repro_project):
    project, first = repro_project
    for stage in ["generate", "train", "evaluate", "report"]:
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert {"accuracy", "nll", "ece", "ece_ts", "temperature", "val_nll"} == metrics.keys()
    assert (project / "reports/report.html").stat().st_size > 50_000  # figures are embedded
    client, runs = runs_in(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # The later stages added to the run the train stage opened.
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert {"calibration", "figures", "report.html"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    assert json.loads((project / "reports/train.json").read_text())["run_id"] == run.info.run_id


def test_outputs_are_tracked_by_dvc_and_ignored_by_git(repro_project):
    project, _ = repro_project
    lock = (project / "dvc.lock").read_text()
    for out in ["data/train.parquet", "models/model.keras", "reports/metrics.json", "reports/report.html"]:
        assert out in lock
    status = run_cmd(["git", "status", "--porcelain", "--ignored"], project).stdout
    assert "!! data/" in status and "!! reports/" in status and "!! mlflow.db" in status


def test_second_repro_is_up_to_date_and_makes_no_run(repro_project):
    project, _ = repro_project
    second = run_cmd(["dvc", "repro"], project)
    assert "Data and pipelines are up to date." in second.stdout
    assert len(runs_in(project)[1]) == 1


def test_changing_a_training_param_reruns_train_evaluate_report_not_generate(repro_project):
    project, _ = repro_project
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 2", "epochs: 3"))
    out = run_cmd(["dvc", "repro"], project).stdout
    assert "Stage 'generate' didn't change, skipping" in out
    for stage in ["train", "evaluate", "report"]:
        assert f"Running stage '{stage}'" in out
    assert len(runs_in(project)[1]) == 2


def test_a_retrain_with_identical_results_still_completes_its_own_run(repro_project):
    # Training is deterministic, so a forced retrain reproduces the same predictions and DVC
    # rightly skips evaluate; report must still run, or the new MLflow run would hold no test
    # metrics or report (report records evaluate's results in the run).
    project, _ = repro_project
    out = run_cmd(["dvc", "repro", "-f", "-s", "train"], project).stdout
    out += run_cmd(["dvc", "repro"], project).stdout
    assert "Running stage 'report'" in out
    client, runs = runs_in(project)
    newest = runs[0]  # search_runs: newest first
    assert json.loads((project / "reports/train.json").read_text())["run_id"] == newest.info.run_id
    assert "test/accuracy" in newest.data.metrics
    assert "report.html" in {a.path for a in client.list_artifacts(newest.info.run_id)}


def test_dvc_plots_show_renders_reliability_and_training_curves(repro_project):
    project, _ = repro_project
    run_cmd(["dvc", "plots", "show", "--json"], project)
    html = run_cmd(["dvc", "plots", "show", "-o", "plots_out"], project)
    assert html.returncode == 0
    page = (project / "plots_out" / "index.html").read_text()
    assert "Reliability before and after temperature scaling" in page and "Training curves" in page


def test_dvc_exp_run_with_hydra_override_composes_conf_and_shows_beside_baseline(tmp_path):
    project = make_project(tmp_path / "proj", *tiny_overrides())
    run_cmd(["dvc", "repro"], project)
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "baseline"], project)
    # DVC composes conf/ (full-size defaults) with these overrides into params.yaml.
    sets = ["-S", "model=wide", *[a for o in tiny_overrides() for a in ("-S", o)]]
    run_cmd(["dvc", "exp", "run", "-n", "wide-exp", *sets], project)
    show = json.loads(run_cmd(["dvc", "exp", "show", "--json"], project).stdout)
    text = json.dumps(show)
    assert "wide-exp" in text
    params = run_cmd(["dvc", "exp", "show", "--csv"], project).stdout
    assert "wide" in params
