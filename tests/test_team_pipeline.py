"""The pipeline against the team services (issue 12 items 2, 3, 6): real PostgreSQL, Ceph
radosgw and MLflow server processes (`team_stack`: basic-auth on; the tests that stop a service
have a stack of their own), real clones sharing one git remote, DVC's S3 remote and the tracking
server."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import OWN_TEAM_STACK, Lines, env_with_venv, make_project, run_cmd, tiny_overrides

from softmaxlab.team import ceph, stack
from softmaxlab.team.state import DVC_BUCKET, MLFLOW_BUCKET
from softmaxlab.team.users import configure_dvc

pytestmark = [pytest.mark.slow, pytest.mark.team]
OUTPUT_DIRS = ("data", "models", "predictions", "reports")


def quiet(line: str) -> None:
    pass


def md5s(project: Path) -> dict[str, str]:
    """md5 of every file under the DVC-tracked output folders."""
    return {
        str(p.relative_to(project)): hashlib.md5(p.read_bytes()).hexdigest()
        for d in OUTPUT_DIRS
        for p in sorted((project / d).rglob("*"))
        if p.is_file()
    }


def git(project: Path, *args: str):
    return run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], project)


def lock_hashes(project: Path) -> set[str]:
    """Every md5 dvc.lock names for an output (files, and directories' .dir listings)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def remote_has(state, prefix: str, md5: str) -> bool:
    s3 = ceph.s3_client(state)
    key = f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}"
    return s3.list_objects_v2(Bucket=DVC_BUCKET, Prefix=key, MaxKeys=1).get("KeyCount", 0) == 1


def exp_show(project: Path, env: dict) -> str:
    """`dvc exp show`'s table as a user sees it (the headline columns, wide enough to read):
    a value DVC cannot find is `!`."""
    keep = "^(Experiment|accuracy|nll|ece)$"
    return run_cmd(["dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", keep], project,
                   env={**env, "COLUMNS": "200"}).stdout  # fmt: skip


def the_run(client, experiment: str, **tags):
    exp = client.get_experiment_by_name(experiment)
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items()) or ""
    return client.search_runs([exp.experiment_id], query)


def sweep_id_once_job_1_logs(client, experiment: str, sweep: subprocess.Popen) -> str:
    """Wait (up to 5 min) until the sweep's job 1 has a RUNNING run on the server: the moment
    to break the store under it. Its sweep id."""
    deadline = time.time() + 300
    while time.time() < deadline and sweep.poll() is None:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], "tags.job_num = '1'") if exp else []
        if runs and runs[0].info.status == "RUNNING":
            return runs[0].data.tags["sweep_id"]
        time.sleep(0.1)
    raise AssertionError("job 1 never started")


@pytest.mark.xdist_group(OWN_TEAM_STACK)  # stops radosgw
def test_two_clones_share_data_experiments_and_runs_through_the_team_stack(team_stack, tmp_path):
    from mlflow.tracking import MlflowClient

    # A prefix of the team bucket of its own: the session's other tests push there too.
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    env = env_with_venv(**{**team_stack.env, "SOFTMAXLAB_DVC_REMOTE": f"s3://{DVC_BUCKET}/{prefix}"})
    server = MlflowClient(team_stack.mlflow_url)
    origin = tmp_path / "origin.git"
    run_cmd(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    experiment = f"two-clones-{uuid.uuid4().hex[:8]}"  # the session's other tests share the server
    a = make_project(tmp_path / "a", *tiny_overrides(f"tracking.experiment={experiment}"))
    git(a, "remote", "add", "origin", str(origin))
    configure_dvc(a, env)

    # Item 3: dvc repro logs to the server: the data as input datasets at their DVC remote address.
    run_cmd(["dvc", "repro"], a, env=env)
    (run,) = the_run(server, experiment)
    assert run.info.status == "FINISHED" and "tracking.fallback_from" not in run.data.tags
    lock = yaml.safe_load((a / "dvc.lock").read_text())
    train_md5 = next(
        o["md5"] for o in lock["stages"]["generate"]["outs"] if o["path"] == "data/train.parquet"
    )
    (train_input,) = [d for d in run.inputs.dataset_inputs if d.dataset.digest == train_md5]
    assert json.loads(train_input.dataset.source)["uri"] == (
        f"s3://{DVC_BUCKET}/{prefix}/files/md5/{train_md5[:2]}/{train_md5[2:]}"
    )
    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "baseline run")
    git(a, "push", "-q", "origin", "main")

    # Item 6c: a missing or wrong credential is one line naming the variable; nothing is sent.
    key, secret = team_stack.env["AWS_ACCESS_KEY_ID"], team_stack.env["AWS_SECRET_ACCESS_KEY"]
    no_keys = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cases = [
        (no_keys, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set"),
        ({**no_keys, "AWS_ACCESS_KEY_ID": key}, "AWS_SECRET_ACCESS_KEY is not set"),
        ({**env, "AWS_SECRET_ACCESS_KEY": "wrong-" + secret}, f"AWS_SECRET_ACCESS_KEY is wrong for AWS_ACCESS_KEY_ID={key[:4]}"),
        ({**env, "AWS_ACCESS_KEY_ID": "NOSUCHKEY"}, "AWS_ACCESS_KEY_ID=NOSU… is not a key the object store knows"),
    ]  # fmt: skip
    for case_env, said in cases:
        out = run_cmd(["softmaxlab", "push"], a, env=case_env, check=False)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and said in out.stderr, out.stderr
        assert secret not in out.stderr + out.stdout
    assert not any(remote_has(team_stack, prefix, h) for h in lock_hashes(a))

    # Item 6b: the object store is down during a push: one line, the cache keeps everything,
    # and once it is back the push completes.
    stack.stop(team_stack.dir, "radosgw", say=quiet)
    try:
        down = run_cmd(["softmaxlab", "push"], a, env=env, check=False)
        assert down.returncode == 1 and down.stderr.count("\n") == 1, down.stderr
        assert "is not answering" in down.stderr and "run `softmaxlab push` again" in down.stderr
        # DVC's own push says it in one line too (plus its support link).
        raw = run_cmd(["dvc", "push"], a, env=env, check=False)
        assert raw.returncode != 0 and "Could not connect to the endpoint URL" in raw.stderr
    finally:
        stack.up(team_stack.dir, say=quiet)  # starts radosgw again, nothing else
    cache = a / ".dvc" / "cache" / "files" / "md5"
    assert all((cache / h[:2] / h[2:]).is_file() for h in lock_hashes(a))
    run_cmd(["softmaxlab", "push"], a, env=env)
    # Item 2: data, model, predictions and reports are all in the bucket (no output is cache: false).
    assert all(remote_has(team_stack, prefix, h) for h in lock_hashes(a))

    # A teammate's clone: git clone, the same env, dvc pull -> the same bytes, nothing to do.
    b = tmp_path / "b"
    run_cmd(["git", "clone", "-q", str(origin), str(b)], tmp_path)
    configure_dvc(b, env)
    run_cmd(["softmaxlab", "pull"], b, env=env)
    assert md5s(b) == md5s(a) and len(md5s(a)) > 10
    assert "Data and pipelines are up to date" in run_cmd(["dvc", "status"], b, env=env).stdout
    shown = exp_show(b, env)
    assert "!" not in shown and re.search(r"^\s*main\b.*\d", shown, re.M), shown

    # An experiment in b, logged to the server, carried to a by dvc exp push / pull.
    # With Hydra on, DVC composes params.yaml from conf/ and the -S overrides: the tiny ones too.
    settings = [o for o in tiny_overrides() if not o.startswith("train.epochs=")]
    settings += ["train.epochs=3", f"tracking.experiment={experiment}"]
    run_cmd(
        ["dvc", "exp", "run", "-n", "three-epochs", *(x for o in settings for x in ("-S", o))], b, env=env
    )
    (exp_run,) = the_run(server, experiment, dvc_exp_name="three-epochs")
    assert exp_run.info.status == "FINISHED"
    run_cmd(["dvc", "exp", "push", "origin", "three-epochs"], b, env=env)
    run_cmd(["dvc", "exp", "pull", "origin", "three-epochs"], a, env=env)
    shown = exp_show(a, env)
    assert "!" not in shown and re.search(r"three-epochs\b.*\d", shown), shown
    run_cmd(["dvc", "exp", "apply", "three-epochs"], a, env=env)
    assert md5s(a) == md5s(b)
    figure = "reports/figures/reliability.png"
    figure_md5 = md5s(b)[figure]

    # Item 3: from a directory with none of either clone's files, read both runs back through
    # the server: the figure (its bytes), the report, and the model by its URI.
    shutil.rmtree(a)
    shutil.rmtree(b)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent(f"""
        import hashlib, json, mlflow, pandas as pd
        from mlflow.tracking import MlflowClient
        c = MlflowClient()
        out = {{}}
        for rid in {[run.info.run_id, exp_run.info.run_id]!r}:
            fig = c.download_artifacts(rid, "figures/reliability.png", "dl-" + rid)
            page = c.download_artifacts(rid, "report.html", "dl-" + rid)
            model = mlflow.pyfunc.load_model(f"runs:/{{rid}}/calibrated")
            pred = model.predict(pd.DataFrame({{"x1": [1.5], "x2": [15.9]}}))
            out[rid] = [hashlib.md5(open(fig, "rb").read()).hexdigest(), open(page).read().count("<img"),
                        float(pred[[c for c in pred.columns if c[1:].isdigit()]].sum(axis=1)[0])]
        print(json.dumps(out))
    """)  # fmt: skip
    read = run_cmd([sys.executable, "-c", script], elsewhere, env=env)
    got = json.loads(read.stdout.strip().splitlines()[-1])
    assert got[exp_run.info.run_id][0] == figure_md5
    assert all(n_img > 0 and p_sum == pytest.approx(1.0, abs=1e-5) for _, n_img, p_sum in got.values())
    # The artifacts are objects in the S3 bucket (through the server: proxied), the runs rows in PostgreSQL.
    listed = ceph.s3_client(team_stack, "mlflow").list_objects_v2(Bucket=MLFLOW_BUCKET, Prefix="mlflow/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(run.info.run_id in k and k.endswith("figures/reliability.png") for k in keys)
    import sqlalchemy

    engine = sqlalchemy.create_engine(team_stack.postgres_url("mlflow"))
    with engine.connect() as db:
        rows = db.execute(
            sqlalchemy.text("select status from runs where run_uuid = :r"), {"r": run.info.run_id}
        )
        assert rows.scalar_one() == "FINISHED"
    engine.dispose()


def test_every_sweep_kind_logs_to_the_team_server(team_stack, tmp_path):
    from mlflow.tracking import MlflowClient

    env = env_with_venv(**team_stack.env)
    server = MlflowClient(team_stack.mlflow_url)
    experiment = f"sweeps-{uuid.uuid4().hex[:8]}"
    project = make_project(tmp_path / "proj")
    kinds = {
        "basic": ["-m", "seed=0,1"],
        "joblib": ["-m", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        "optuna": ["sweep=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=team-sweep-test"],
    }
    for kind, args in kinds.items():
        out = run_cmd([sys.executable, "-m", "softmaxlab", *args, *tiny_overrides(f"tracking.experiment={experiment}"), f"hydra.sweep.dir={kind}"],
                      project, env=env)  # fmt: skip
        assert "unreachable" not in out.stderr, out.stderr
        sid = re.search(r"softmaxlab: sweep (\S+), MLflow parent run", out.stderr).group(1)
        runs = the_run(server, experiment, sweep_id=sid)
        (parent,) = [r for r in runs if "job_num" not in r.data.tags]
        jobs = [r for r in runs if "job_num" in r.data.tags]
        assert len(jobs) == 2 and parent.info.status == "FINISHED", kind
        for job in jobs:
            assert job.info.status == "FINISHED" and job.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert {"figures", "report.html", "calibrated"} <= {
                a.path for a in server.list_artifacts(job.info.run_id)
            }
            assert {
                t.value for d in job.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"
            } >= {"training", "test"}
        assert "summary/summary.csv" in {a.path for a in server.list_artifacts(parent.info.run_id, "summary")}
    assert not (project / "mlflow.db").exists()  # nothing went to the local store


@pytest.mark.xdist_group(OWN_TEAM_STACK)
def test_postgres_restarting_mid_sweep_leaves_no_run_running(team_stack, tmp_path):
    """The server's database restarts while jobs log: MLflow's retries (about 30 s, see
    tracking.tracker.connect) ride it out, so every job and the sweep finish, and exit 0."""
    from mlflow.tracking import MlflowClient

    env = env_with_venv(**team_stack.env)
    server = MlflowClient(team_stack.mlflow_url)
    experiment = f"pg-restart-{uuid.uuid4().hex[:8]}"
    project = make_project(tmp_path / "proj")
    sweep = subprocess.Popen(
        [sys.executable, "-m", "softmaxlab", "-m", "seed=0,1,2", *tiny_overrides(f"tracking.experiment={experiment}"), "hydra.sweep.dir=sweep"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        sid = sweep_id_once_job_1_logs(server, experiment, sweep)
        stack.stop(team_stack.dir, "postgres", say=quiet)
        stack.up(team_stack.dir, say=quiet)  # starts PostgreSQL again
        out, err = sweep.communicate(timeout=600)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, err
    runs = the_run(server, experiment, sweep_id=sid)
    jobs = [r for r in runs if "job_num" in r.data.tags]
    assert sorted(int(r.data.tags["job_num"]) for r in jobs) == [0, 1, 2]
    for r in runs:  # the jobs and the parent
        assert r.info.status == "FINISHED", (
            r.data.tags.get("job_num"),
            r.info.status,
            r.data.tags.get("error"),
        )


@pytest.mark.xdist_group(OWN_TEAM_STACK)
def test_postgres_down_longer_than_the_retries_fails_the_job_with_its_error(team_stack, tmp_path):
    """The database stays down past the client's retries: the job logging then fails alone,
    its run ends FAILED with the error once the database is back; nothing stays RUNNING."""
    from mlflow.tracking import MlflowClient

    # One retry (a few seconds) instead of our default 4 (~30 s): the outage outlasts it sooner.
    env = env_with_venv(**team_stack.env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    server = MlflowClient(team_stack.mlflow_url)
    experiment = f"pg-down-{uuid.uuid4().hex[:8]}"
    project = make_project(tmp_path / "proj")
    sweep = subprocess.Popen(
        [sys.executable, "-m", "softmaxlab", "-m", "seed=0,1,2",
         *tiny_overrides(f"tracking.experiment={experiment}"), "hydra.sweep.dir=sweep"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stdout, stderr = Lines(sweep.stdout), Lines(sweep.stderr)
    try:
        sid = sweep_id_once_job_1_logs(server, experiment, sweep)
        stack.stop(team_stack.dir, "postgres", say=quiet)
        # Down until job 1 has failed (its retries spent): the sweep counts it done.
        stderr.wait_for("sweep: 2/3 jobs done", timeout=300)
        stack.up(team_stack.dir, say=quiet)
        sweep.wait(timeout=600)
    finally:
        sweep.kill()
    stdout.text()  # read to its end: the sweep never waited on a full pipe
    err = stderr.text()
    assert sweep.returncode == 1, err
    assert re.search(r"error: job 1 .*tracking store", err), err
    runs = the_run(server, experiment, sweep_id=sid)
    assert "RUNNING" not in [r.info.status for r in runs], (
        [(r.data.tags.get("job_num"), r.info.status) for r in runs],
        err,
    )
    (job1,) = [r for r in runs if r.data.tags.get("job_num") == "1"]
    assert job1.info.status == "FAILED" and job1.data.tags.get("error"), job1.data.tags
    for r in runs:
        if r.info.status == "FAILED" and "job_num" in r.data.tags:
            assert r.data.tags.get("error"), r.data.tags
