"""`dvc repro` and `dvc exp run` in a real temporary git + DVC project, as a user runs them.
The fast tier checks the session's one `dvc repro` (conftest's `ran_project`); the rest change
copies of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest
from conftest import copy_project, env_with_venv, make_project, run_cmd, tiny_overrides

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IN_CI = os.environ.get("CI", "").lower() == "true"


def metric_tables(node):
    """Every reports/metrics.json that `dvc exp show --json` holds, wherever it nests them."""
    if isinstance(node, dict):
        if "reports/metrics.json" in node and isinstance(node["reports/metrics.json"], dict):
            yield node["reports/metrics.json"]["data"]
        for value in node.values():
            yield from metric_tables(value)
    elif isinstance(node, list):
        for value in node:
            yield from metric_tables(value)


def runs_in(project):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("softmaxlab")
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def repro_project(ran_project, tmp_path_factory):
    """A copy of the session's ran project that this module's slow tests change in turn."""
    project, first = ran_project
    return copy_project(project, tmp_path_factory.mktemp("dvc") / "proj"), first


def test_repro_runs_four_stages_and_one_mlflow_run(ran_project):
    project, first = ran_project
    for stage in ["generate", "train", "evaluate", "report"]:
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert {"accuracy", "nll", "ece", "ece_ts", "temperature", "val_nll"} == metrics.keys()
    assert (project / "reports/report.html").stat().st_size > 50_000  # figures are embedded
    client, runs = runs_in(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and "pipeline.pending" not in run.data.tags
    # The later stages added to the run the train stage opened.
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"], rel=1e-3)
    assert {"calibration", "figures", "report.html"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    assert json.loads((project / "reports/train.json").read_text())["run_id"] == run.info.run_id


def test_outputs_are_tracked_by_dvc_and_ignored_by_git(ran_project):
    project, _ = ran_project
    lock = (project / "dvc.lock").read_text()
    for out in ["data/train.parquet", "models/model.keras", "reports/metrics.json", "reports/report.html"]:
        assert out in lock
    status = run_cmd(["git", "status", "--porcelain", "--ignored"], project).stdout
    assert "!! data/" in status and "!! reports/" in status and "!! mlflow.db" in status


def test_second_repro_is_up_to_date_and_makes_no_run(ran_project):
    project, _ = ran_project
    second = run_cmd(["dvc", "repro"], project)
    assert "Data and pipelines are up to date." in second.stdout
    assert len(runs_in(project)[1]) == 1


@pytest.mark.slow
def test_changing_a_training_param_reruns_train_evaluate_report_not_generate(repro_project):
    project, _ = repro_project
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 2", "epochs: 3"))
    out = run_cmd(["dvc", "repro"], project).stdout
    assert "Stage 'generate' didn't change, skipping" in out
    for stage in ["train", "evaluate", "report"]:
        assert f"Running stage '{stage}'" in out
    assert len(runs_in(project)[1]) == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_dvc_plots_show_renders_reliability_and_training_curves(repro_project):
    project, _ = repro_project
    plots = json.loads(run_cmd(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    # The curves carry the training history, epoch by epoch.
    history = (project / "reports/history.csv").read_text().splitlines()
    header, last = (
        history[0].split(","),
        dict(zip(history[0].split(","), history[-1].split(","), strict=True)),
    )
    curves = [
        p for spec in plots.values() for p in spec if "val_loss" in str(p["content"]["data"]["values"][:1])
    ]
    assert curves and all(set(header) <= set(p["content"]["data"]["values"][0]) for p in curves)
    rows = curves[0]["content"]["data"]["values"]
    by_epoch = {r["epoch"]: r for r in rows}
    assert len(by_epoch) == len(history) - 1
    assert float(by_epoch[last["epoch"]]["val_loss"]) == pytest.approx(float(last["val_loss"]))
    run_cmd(["dvc", "plots", "show", "-o", "plots_out"], project)
    page = (project / "plots_out" / "index.html").read_text()
    for title in [
        "Training loss (log scale)",
        "Training accuracy",
        "Reliability before and after temperature scaling",
    ]:
        assert title in page, title
    # Axis titles say what they show (DVC's default would be "y"), the loss axis is logarithmic
    # and the reliability plot has its diagonal.
    for label in [
        "loss (training loss as configured; log scale)",
        "accuracy in bin",
        "mean confidence in bin",
    ]:
        assert f'"title": "{label}' in page, label
    assert '"type": "log"' in page and '"type": "rule"' in page
    # Vega comes with the page (.dvc/plots/offline.html), not from a CDN: it renders offline.
    assert "cdn.jsdelivr" not in page and "vega-embed@6.18.2 from the npm registry" in page


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="needs Debian's chromium (.ci/run installs it)")
def test_dvc_plots_page_draws_its_charts_in_a_browser_with_no_network(repro_project, tmp_path):
    project, _ = repro_project
    assert CHROMIUM, "CI=true but chromium is not installed (apt-get install -y chromium)"
    run_cmd(["dvc", "plots", "show", "-o", "plots_offline"], project)
    dom = run_cmd(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--proxy-server=127.0.0.1:9", "--virtual-time-budget=10000", "--dump-dom",
         (project / "plots_offline" / "index.html").as_uri()],
        project,
    ).stdout  # fmt: skip
    # vega-embed replaces each plot's div with a drawn canvas; with the scripts missing there is none.
    assert dom.count('class="marks"') == 3, dom[:2000]


@pytest.fixture(scope="module")
def exp_project(ran_project, tmp_path_factory):
    """A committed baseline and one `dvc exp run -n wide-exp -S model=wide` beside it."""
    project = copy_project(ran_project[0], tmp_path_factory.mktemp("exp") / "proj")
    # DVC composes conf/ (full-size defaults) with these overrides into params.yaml.
    sets = ["-S", "model=wide", *[a for o in tiny_overrides() for a in ("-S", o)]]
    run_cmd(["dvc", "exp", "run", "-n", "wide-exp", *sets], project)
    return project


@pytest.mark.slow
def test_dvc_exp_run_with_hydra_override_composes_conf_and_shows_beside_baseline(exp_project):
    show = json.loads(run_cmd(["dvc", "exp", "show", "--json"], exp_project).stdout)
    text = json.dumps(show)
    assert "wide-exp" in text
    # What DVC shows as metrics is the headline, for the baseline and the experiment alike:
    # no interval bounds, no after-scaling twins beyond ece_ts.
    shown = list(metric_tables(show))
    assert len(shown) >= 2
    for metrics in shown:
        assert set(metrics) == {"accuracy", "nll", "ece", "ece_ts", "temperature", "val_nll"}
    params = run_cmd(["dvc", "exp", "show", "--csv"], exp_project).stdout
    assert "wide" in params


# What ran (reports/setup.json), then evaluate's headline (reports/metrics.json).
SETUP_COLUMNS = ["model", "hidden", "optimizer", "lr", "epochs", "data", "backend"]
HEADLINE_COLUMNS = ["Experiment", "Created", *SETUP_COLUMNS, "accuracy", "nll", "ece", "ece_ts"]


def table_rows(text: str) -> tuple[str, list[str]]:
    """The header line and the body lines of DVC's table (between its 2nd and 3rd rules)."""
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("─")]
    assert len(rules) == 3, text
    return lines[rules[0] + 1], lines[rules[1] + 1 : rules[2]]


@pytest.mark.slow
def test_dvc_exp_show_default_opens_with_what_ran_and_its_headline_one_line_per_experiment(exp_project):
    # Not a terminal: DVC renders what it sends to its pager (less -S on a terminal), whose
    # first screen is what a user sees at a glance.
    header, rows = table_rows(run_cmd(["dvc", "exp", "show"], exp_project).stdout)
    assert header.split()[: len(HEADLINE_COLUMNS)] == HEADLINE_COLUMNS
    assert header.index(" ece_ts ") < 150, header[:200]
    # One line each for the workspace, main and the experiment.
    assert len(rows) == 3 and all(row[2] != " " for row in rows), rows
    wide = next(row for row in rows if "wide-exp" in row)
    assert re.search(r" wide +64-64 +adam +0\.001 +2 +blobs +tensorflow +0\.\d+ ", wide), wide


@pytest.mark.slow
@pytest.mark.parametrize("columns", [120, 150, 160])
def test_dvc_exp_show_no_pager_fits_the_terminal_without_blank_continuation_lines(exp_project, columns):
    # --no-pager fits the terminal: DVC collapses what does not fit into "…" cells. What we
    # control is that no list-valued param lands in such a cell and wraps into blank lines
    # (params.yaml lists them last). DVC's own squeeze of its Created column ("01:50 PM" onto
    # two lines) comes and goes with the terminal width and the number of dependency columns:
    # a continuation line may hold that column's AM/PM and nothing else
    # (docs/experiments.md gives the widths measured).
    proc = run_cmd(["dvc", "exp", "show", "--no-pager"], exp_project, env_with_venv(COLUMNS=str(columns)))
    header, lines = table_rows(proc.stdout)
    assert max(map(len, proc.stdout.splitlines())) <= columns
    cells = header.split()
    assert cells[0] == "Experiment" and cells[1 + cells[1].startswith("Cr")].startswith("m"), header  # model
    rows = [line for line in lines if line[2] != " "]
    continued = [line.split() for line in lines if line[2] == " "]
    assert len(rows) == 3, proc.stdout
    assert all(parts and set(parts) <= {"AM", "PM"} for parts in continued), proc.stdout


def output_hashes(project) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(project)): hashlib.md5(p.read_bytes()).hexdigest()
        for d in ("data", "models", "predictions", "reports")
        for p in sorted((project / d).rglob("*"))
        if p.is_file() and p.name != "params.ok"  # the check stage's own marker
    }


@pytest.fixture
def committed_project(ran_project, tmp_path):
    """A project whose pipeline ran and whose outputs and dvc.lock are committed."""
    return copy_project(ran_project[0], tmp_path / "proj")


@pytest.mark.slow
def test_a_bad_value_in_dvc_exp_run_stops_before_any_output_is_removed(committed_project):
    project = committed_project
    before = output_hashes(project)
    # The tiny settings too, so the new params.yaml is as long as the committed one (0.001 and
    # -0.01): where `git checkout HEAD -- params.yaml` was seen to restore nothing (check.py).
    sets = [a for o in tiny_overrides("optimizer.lr=-0.01") for a in ("-S", o)]
    proc = run_cmd(["dvc", "exp", "run", *sets], project, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "optimizer.lr=-0.01 is not allowed" in out and "git show HEAD:params.yaml > params.yaml" in out, (
        out
    )
    assert "Running stage 'train'" not in out and "Traceback" not in out, out
    assert output_hashes(project) == before  # the model, predictions and reports are all there
    assert "lr: -0.01" in (project / "params.yaml").read_text()  # DVC wrote it; the message says how back
    # The way back the message gives: restore params.yaml, and dvc has nothing to rebuild.
    run_cmd(["bash", "-c", "git show HEAD:params.yaml > params.yaml"], project)
    assert "lr: 0.001" in (project / "params.yaml").read_text()
    again = run_cmd(["dvc", "repro"], project).stdout
    for stage in ["generate", "train", "evaluate", "report"]:
        assert f"Stage '{stage}' didn't change, skipping" in again, again
    assert output_hashes(project) == before
    assert run_cmd(["dvc", "status"], project).stdout.strip() == "Data and pipelines are up to date."


@pytest.mark.slow
@pytest.mark.parametrize("override,dvc_says", [("model=wdie", "Could not find 'model/wdie'"),
                                               ("train.epoch=5", "Could not override 'train.epoch'")])  # fmt: skip
def test_a_config_typo_in_dvc_exp_run_is_dvcs_error_and_changes_nothing(
    committed_project, override, dvc_says
):
    # DVC composes conf/ itself, before any of our code runs, and reports Hydra's error as its
    # own "unexpected error" (exit code 255): docs/experiments.md says so. Nothing is changed.
    project = committed_project
    before, params = output_hashes(project), (project / "params.yaml").read_bytes()
    proc = run_cmd(["dvc", "exp", "run", "-S", override], project, check=False)
    assert proc.returncode == 255 and dvc_says in proc.stderr, proc.stderr
    assert (project / "params.yaml").read_bytes() == params
    assert output_hashes(project) == before


@pytest.mark.slow
def test_dvc_exp_run_names_and_tags_its_mlflow_run_after_the_experiment(committed_project):
    project = committed_project
    sets = [a for o in tiny_overrides("optimizer.lr=0.01") for a in ("-S", o)]
    run_cmd(["dvc", "exp", "run", "-n", "lr-exp", *sets], project)
    client, runs = runs_in(project)
    newest = runs[0]
    assert newest.info.run_name.startswith("lr-exp: ")
    assert newest.data.tags["dvc_exp_name"] == "lr-exp"
    head = run_cmd(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert newest.data.tags["dvc_exp_baseline_rev"] == head
    # The plain `dvc repro` baseline is no experiment: no such tag.
    assert "dvc_exp_name" not in runs[-1].data.tags


@pytest.mark.slow
def test_the_suite_passes_with_an_applied_experiment_and_adopt_makes_it_the_default(tmp_path):
    import shutil

    from conftest import ROOT, env_with_venv

    project = make_project(tmp_path / "proj")  # params.yaml is conf/'s default, committed
    shutil.copytree(ROOT / "tests", project / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    sets = [a for o in tiny_overrides("model=wide") for a in ("-S", o)]
    run_cmd(["dvc", "exp", "run", "-n", "wide-exp", *sets], project)
    run_cmd(["dvc", "exp", "apply", "wide-exp"], project)
    env = env_with_venv(PYTHONPATH=str(project / "src"))
    drift_test = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                  "tests/test_config.py", "-k", "composed_default or tutorials"]  # fmt: skip
    assert "2 passed" in run_cmd(drift_test, project, env).stdout
    # Committed as it is, the experiment is drift, and the test says how to adopt it.
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "wide"], project)
    failed = run_cmd(drift_test, project, env, check=False)
    assert failed.returncode == 1 and "softmaxlab adopt" in failed.stdout
    adopted = run_cmd([sys.executable, "-m", "softmaxlab", "adopt"], project, env).stdout
    assert "conf/config.yaml: model: seed -> wide" in adopted, adopted
    assert "model: wide" in (project / "conf" / "config.yaml").read_text()
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "adopt"], project)
    # (conf/'s defaults are this project's own now, no longer the tutorial's)
    assert "1 passed" in run_cmd([*drift_test[:-1], "composed_default"], project, env).stdout
    # The check stage has nothing left to say about drift.
    assert "differs from conf/" not in run_cmd(["dvc", "repro"], project).stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "damaged", "error"),
    [
        ("evaluate", "predictions/test.parquet", "test.parquet: not a readable Parquet file"),
        ("report", "predictions/grid.parquet", "grid.parquet: not a readable Parquet file"),
    ],
)
def test_a_later_stage_that_fails_leaves_the_run_failed_with_its_error(tmp_path, stage, damaged, error):
    # Under dvc repro, train opens the run and ends its process long before evaluate and
    # report run: the run must not read FINISHED unless the whole pipeline did.
    project = make_project(tmp_path / "proj", *tiny_overrides())
    dvc_yaml = project / "dvc.yaml"
    good = dvc_yaml.read_text()
    damage = f"python -c \"open('{damaged}', 'w').write('damaged')\" && python -m softmaxlab.stages.{stage}"
    dvc_yaml.write_text(good.replace(f"cmd: python -m softmaxlab.stages.{stage}", f"cmd: {damage}"))
    proc = run_cmd(["dvc", "repro"], project, check=False)
    assert proc.returncode != 0 and error in proc.stderr, proc.stderr
    client, runs = runs_in(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["pipeline.failed_stage"] == stage and error in run.data.tags["error"]
    assert run.data.tags["pipeline.pending"] == "evaluate, report"
    # Once the cause is gone, the next repro completes the pipeline and its run says so.
    dvc_yaml.write_text(good)
    run_cmd(["dvc", "checkout", "--force", "train"], project)  # undo the damage to train's outputs
    run_cmd(["dvc", "repro"], project)
    client, runs = runs_in(project)
    newest = client.get_run(json.loads((project / "reports/train.json").read_text())["run_id"])
    assert newest.info.status == "FINISHED"
    assert not {"pipeline.pending", "error", "pipeline.failed_stage"} & set(newest.data.tags)
    assert "RUNNING" not in {r.info.status for r in runs}
