"""Sweeps on a cluster: a real two-node Ray cluster (tools/ray_local.sh, a head and a worker
joined with `ray start --address`, one CPU each, in a network namespace with only loopback),
Optuna studies in a database, Hydra's submitit launcher.

One Ray cluster serves the whole module; it is stopped by its namespace: killing the
`unshare` process that started it kills the namespace's first process, and the kernel then
kills every process in it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, env_with_venv, make_project, run_cmd, tiny_overrides
from test_sweep import check_parent_and_children, runs

from softmaxlab.sweeps.summary import SUMMARY_COLUMNS

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def needs_root_for_namespaces() -> None:
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("nsenter"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("the Ray tests need root and util-linux (unshare, nsenter): CI runs as root")
    pytest.skip("Ray runs only inside a network namespace here, which needs root (unshare)")


class RayCluster:
    """tools/ray_local.sh with a command that only waits: commands run inside its network,
    PID and mount namespaces with nsenter."""

    def __init__(self, cwd: Path, log: Path, workers: int = 1):
        ready = log.with_suffix(".ready")
        wait = f'echo "$RAY_ADDRESS $RAY_AUTH_TOKEN_PATH" > {ready}.tmp && mv {ready}.tmp {ready}; exec sleep 3600'
        self.log = log.open("w")
        # The script execs unshare: self.proc is unshare, the namespaces' parent.
        self.proc = subprocess.Popen(
            [str(ROOT / "tools" / "ray_local.sh"), "--workers", str(workers), "--", "bash", "-c", wait],
            cwd=cwd, env=env_with_venv(), stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 180
        while not ready.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise AssertionError(f"the Ray cluster did not start:\n{log.read_text()}")
            time.sleep(0.5)
        address, token_path = ready.read_text().split()
        self.state = Path(token_path).parent
        self.env = {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path,
                    "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
        # The namespaces' first process (ray_local.sh inside), the one nsenter joins.
        self.init = int(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()[0])

    def run(self, args: list[str], cwd: Path, check: bool = True, **extra_env: str):
        enter = ["nsenter", f"--target={self.init}", "--net", "--pid", "--mount", "--"]
        # cd inside: a directory opened before entering the mount namespace is on the old
        # namespace's mount, and renaming from it to an absolute path fails (EXDEV).
        cd = ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd)]
        return run_cmd(enter + cd + args, cwd, env=env_with_venv(**{**self.env, **extra_env}), check=check)

    def popen(self, args: list[str], cwd: Path, **extra_env: str) -> subprocess.Popen:
        enter = ["nsenter", f"--target={self.init}", "--net", "--pid", "--mount", "--"]
        cd = ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd)]
        return subprocess.Popen(enter + cd + args, cwd=cwd, env=env_with_venv(**{**self.env, **extra_env}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def stop(self) -> None:
        self.proc.kill()  # unshare --kill-child: its child, the namespace's first process, gets SIGKILL too
        self.proc.wait(timeout=60)
        self.log.close()
        if hasattr(self, "init"):
            deadline = time.time() + 30
            while Path(f"/proc/{self.init}").exists() and time.time() < deadline:
                time.sleep(0.2)
            assert not Path(f"/proc/{self.init}").exists(), "the Ray namespace outlived its parent"
        if hasattr(self, "state"):
            shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_project(tmp_path_factory):
    needs_root_for_namespaces()
    return make_project(tmp_path_factory.mktemp("ray") / "proj")


@pytest.fixture(scope="module")
def ray_cluster(ray_project, tmp_path_factory):
    # Started from another directory than the sweeps': each sweep's workers move to its own.
    cluster = RayCluster(tmp_path_factory.mktemp("raynodes"), tmp_path_factory.mktemp("raylog") / "ray.log")
    yield cluster
    cluster.stop()


def ray_sweep(cluster, project, *args, check=True):
    cmd = ["python", "-m", "softmaxlab", "-m", "launcher=ray", *args, *tiny_overrides()]
    return cluster.run(cmd, project, check=check)


def test_the_cluster_has_two_nodes_and_nothing_outside_loopback(ray_cluster, ray_project):
    probe = (
        "import ray, socket; ray.init(); "
        "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']), ray.cluster_resources()['CPU']); "
        "print(sorted(socket.if_nameindex()))"  # the namespace's interfaces
    )  # fmt: skip
    out = ray_cluster.run(["python", "-c", probe], ray_project).stdout.splitlines()
    assert out[-2] == "['127.0.0.1', '127.0.0.1'] 2.0"
    assert out[-1] == "[(1, 'lo')]"


def test_a_sweep_runs_its_jobs_on_both_nodes_one_child_run_each(ray_cluster, ray_project):
    proc = ray_sweep(ray_cluster, ray_project, "model=seed,tiny", "seed=0,1", "hydra.sweep.dir=sweep")
    parent = check_parent_and_children(ray_project, 4)
    children = runs(ray_project).dropna(subset=["tags.job_num"])
    # Two nodes with one CPU each and four one-CPU jobs: both nodes ran jobs.
    assert children["tags.ray.node_id"].nunique() == 2
    assert parent["tags.best.objective"] == "val/nll"
    # The summary has the same columns as an in-process sweep's, in the launching directory.
    summary = pd.read_csv(ray_project / "sweep" / "summary.csv")
    assert list(summary.columns) == [c for c in SUMMARY_COLUMNS.values()]
    assert len(summary) == 4 and (summary["status"] == "FINISHED").all()
    # Job outputs are in the sweep's directory too, though the nodes started elsewhere.
    assert all((ray_project / "sweep" / str(k) / "reports" / "metrics.json").exists() for k in range(4))
    # Each job's progress line comes from its worker, behind Ray's `(_run_job pid=…)`.
    done = sorted(re.findall(r"sweep: \d+/4 jobs done", proc.stderr))
    assert done == [f"sweep: {k}/4 jobs done" for k in range(1, 5)]
    assert "Traceback" not in proc.stderr


def test_a_job_that_fails_on_the_cluster_is_a_failed_child_and_the_sweep_exits_1(ray_cluster, tmp_path):
    project = make_project(tmp_path / "proj")
    # lr=1000 with SGD diverges (NaN loss): only training can find that out.
    proc = ray_sweep(ray_cluster, project, "optimizer=sgd", "model.activation=elu", "optimizer.lr=0.001,1000",
                     "hydra.sweep.dir=sweep", check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "softmaxlab: error:" in line]
    assert len(errors) == 1 and "job 1" in errors[0] and "diverged" in errors[0], proc.stderr
    df = runs(project)
    assert "RUNNING" not in set(df["status"])
    children = df[df["tags.job_num"].notna()].sort_values("tags.job_num")
    assert list(children["status"]) == ["FINISHED", "FAILED"]
    assert list(pd.read_csv(project / "sweep" / "summary.csv")["status"]) == ["FINISHED", "FAILED"]
    assert df[df["tags.sweep_overrides"].notna()].iloc[0]["status"] == "FAILED"


def job_workers(project: Path) -> list[int]:
    """PIDs of Ray workers running a job of a sweep started in `project`: Ray titles a busy
    worker `ray::_run_job`, and the sweep's runtime env gives its workers SOFTMAXLAB_SWEEP_CWD."""
    mark = f"SOFTMAXLAB_SWEEP_CWD={project}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "cmdline").read_bytes().startswith(b"ray::_run_job") and mark in (
                proc / "environ"
            ).read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def test_a_job_whose_ray_worker_dies_fails_alone_and_its_run_is_not_left_running(ray_cluster, tmp_path):
    project = make_project(tmp_path / "proj")
    tiny = [o for o in tiny_overrides() if not o.startswith("train.epochs")]
    # Job 0 trains 2 epochs; job 1 trains long enough to be killed while it trains.
    proc = ray_cluster.popen(["python", "-m", "softmaxlab", "-m", "launcher=ray", "train.epochs=2,5000", *tiny,
                              "hydra.sweep.dir=sweep"], project)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            # Job 0's marker first: reading the store while the sweep creates it races its migrations.
            if (project / "sweep" / ".jobs_done" / "0").exists():
                df = runs(project)
                status = (
                    dict(zip(df["tags.job_num"], df["status"], strict=True)) if "tags.job_num" in df else {}
                )
                if (
                    status.get("0") == "FINISHED"
                    and status.get("1") == "RUNNING"
                    and len(job_workers(project)) == 1
                ):
                    break
            time.sleep(1)
        workers = job_workers(project)
        assert len(workers) == 1, (workers, proc.poll())
        os.kill(workers[0], signal.SIGKILL)  # as Ray's memory monitor or a lost node would
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    lost = [line for line in err.splitlines() if line.startswith("softmaxlab: error: job 1")]
    assert len(lost) == 1 and "Ray lost its worker" in lost[0], err
    df = runs(project)
    assert "RUNNING" not in set(df["status"])
    children = df[df["tags.job_num"].notna()].sort_values("tags.job_num")
    assert list(children["status"]) == ["FINISHED", "FAILED"]
    assert children.iloc[1]["tags.error"].startswith("Ray lost its worker")
    assert list(pd.read_csv(project / "sweep" / "summary.csv")["status"]) == ["FINISHED", "FAILED"]
    assert df[df["tags.sweep_overrides"].notna()].iloc[0]["status"] == "FAILED"


def test_a_cluster_that_refuses_the_sweep_is_one_line_and_no_job_runs(ray_cluster, tmp_path):
    project = make_project(tmp_path / "proj")
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    proc = ray_cluster.run(
        ["python", "-m", "softmaxlab", "-m", "launcher=ray", "seed=0,1", *tiny_overrides()],
        project, check=False, RAY_AUTH_TOKEN_PATH=str(wrong),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("softmaxlab: error:")]
    assert len(errors) == 1 and "Ray:" in errors[0] and "InvalidAuthToken" in errors[0], proc.stderr
    assert errors[0].endswith("(address=127.0.0.1:6379)"), proc.stderr
    assert "Traceback" not in proc.stderr
    df = runs(project)
    # The parent says why; no job ran.
    assert len(df) == 1 and df.iloc[0]["status"] == "FAILED" and "Ray:" in df.iloc[0]["tags.error"]


def test_an_optuna_database_prepared_here_is_one_optuna_2_opens_and_shares(tmp_path):
    import optuna
    import sqlalchemy

    from softmaxlab.sweeps.cluster import prepare_optuna_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    # What optuna 2.10.1 does alone on SQLAlchemy 2 (optuna issue 4375): the schema stamp
    # is rolled back and opening the storage fails. If this starts passing, the workaround
    # in prepare_optuna_storage can go.
    with pytest.raises(AssertionError):
        optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'plain.db'}")
    prepare_optuna_storage(url)
    prepare_optuna_storage(url)  # a second sweep on the same database changes nothing
    with sqlalchemy.create_engine(url).connect() as conn:
        assert conn.execute(sqlalchemy.text("select version_num from alembic_version")).scalars().all() == [
            "v2.6.0.a"
        ]
    first = optuna.create_study(study_name="s", storage=url, load_if_exists=True)
    first.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    second = optuna.create_study(study_name="s", storage=url, load_if_exists=True)
    second.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 3


@pytest.mark.team
def test_two_optuna_sweeps_started_at_once_share_one_study_on_postgresql(team_stack, tmp_path):
    import mlflow
    import optuna

    project = make_project(tmp_path / "proj")
    # The team's variables, as a teammate's shell has them: MLFLOW_TRACKING_URI (the team
    # server) and SOFTMAXLAB_OPTUNA_STORAGE (its PostgreSQL database `optuna`).
    env = env_with_venv(**team_stack.env, SOFTMAXLAB_OPTUNA_STUDY="shared")
    procs = [
        subprocess.Popen(
            [
                "python",
                "-m",
                "softmaxlab",
                "sweep=optuna",
                "hydra.sweeper.n_trials=2",
                f"hydra.sweeper.sampler.seed={k}",
                *tiny_overrides(),
                f"hydra.sweep.dir=worker{k}",
            ],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for k in (1, 2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=team_stack.env["SOFTMAXLAB_OPTUNA_STORAGE"])
    # n_trials counts per process: 2 + 2 trials, all in the one study.
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    in_study = sorted(round(t.params["optimizer.lr"], 8) for t in study.trials)
    ran = []
    for k in (1, 2):
        summary = pd.read_csv(project / f"worker{k}" / "summary.csv")
        assert len(summary) == 2 and (summary["status"] == "FINISHED").all()
        client = mlflow.tracking.MlflowClient(team_stack.mlflow_url)
        for run_id in summary["run_id"]:
            ran.append(round(float(client.get_run(run_id).data.params["optimizer.lr"]), 8))
    # Every trial of the study is a job one of the two processes ran and logged on the server.
    assert sorted(ran) == in_study


def test_the_slurm_launchers_path_runs_jobs_as_submitit_processes(tmp_path):
    # launcher=submitit_local: the submitit launcher of launcher=slurm with local processes.
    project = make_project(tmp_path / "proj")
    proc = run_cmd(
        ["python", "-m", "softmaxlab", "-m", "launcher=submitit_local", "optimizer=sgd", "model.activation=elu",
         "optimizer.lr=0.001,1000", *tiny_overrides(), "hydra.sweep.dir=sweep"],
        project, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    df = runs(project)
    children = df[df["tags.job_num"].notna()].sort_values("tags.job_num")
    assert list(children["status"]) == ["FINISHED", "FAILED"]
    assert df[df["tags.sweep_overrides"].notna()].iloc[0]["status"] == "FAILED"
    assert list(pd.read_csv(project / "sweep" / "summary.csv")["status"]) == ["FINISHED", "FAILED"]
    # Each job ran in its own process: its output is in submitit's folder, the error too.
    logs = "".join(p.read_text() for p in (project / "sweep" / ".submitit").glob("*/*_log.err"))
    assert "softmaxlab: error: job 1" in logs and "diverged" in logs


def test_the_slurm_preset_submits_what_a_cluster_user_sets():
    from hydra import compose, initialize_config_dir

    from softmaxlab.core.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", ["launcher=slurm", "hydra.launcher.partition=gpu", "train.device=gpu"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task) == ("gpu", 30, 1)
    from softmaxlab.sweeps.cluster import prepare_launcher

    prepare_launcher(cfg, {}, cfg.train.device)
    assert launcher.gpus_per_node == 1  # a job that trains on a GPU reserves one


def test_a_sweep_on_a_one_node_slurm_cluster_runs_each_job_as_a_slurm_job(tmp_path):
    # tools/slurm_local.sh: slurmctld and slurmd on 127.0.0.1 in a PID namespace that ends
    # with the command, authenticated by a munged of their own (Debian's slurm-wlm and munge;
    # .ci/run installs them).
    if os.geteuid() != 0 or not shutil.which("slurmctld") or not shutil.which("munged"):
        if os.environ.get("CI") == "true":
            pytest.fail("the SLURM test needs root, slurm-wlm and munge (apt-get install slurm-wlm munge)")
        pytest.skip("needs root and Debian's slurm-wlm and munge")
    project = make_project(tmp_path / "proj")
    # Before the sweep: what the running slurmctld says it authenticates with, and the key's mode.
    said = tmp_path / "auth.txt"
    check = (
        f'scontrol show config | grep -E "^(AuthType|CredType) " > {said} && '
        f'stat -c "key %a" "$(dirname "$SLURM_CONF")/munge/munge.key" >> {said} && exec "$@"'
    )
    proc = run_cmd(
        [str(ROOT / "tools" / "slurm_local.sh"), "--", "bash", "-c", check, "bash", "python", "-m", "softmaxlab",
         "-m", "launcher=slurm", "optimizer=sgd", "model.activation=elu", "optimizer.lr=0.001,1000",
         *tiny_overrides(), "hydra.sweep.dir=sweep"],
        project, check=False,
    )  # fmt: skip
    auth = said.read_text().split()
    assert (
        auth[auth.index("AuthType") + 2] == "auth/munge" and auth[auth.index("CredType") + 2] == "cred/munge"
    )
    assert auth[-2:] == ["key", "400"]
    assert proc.returncode == 1, proc.stderr
    df = runs(project)
    assert "RUNNING" not in set(df["status"])
    children = df[df["tags.job_num"].notna()].sort_values("tags.job_num")
    assert list(children["status"]) == ["FINISHED", "FAILED"]
    # Both ran as SLURM jobs on the cluster's node, each its own job.
    assert list(children["tags.slurm.node"]) == ["local", "local"]
    assert children["tags.slurm.job_id"].nunique() == 2
    assert df[df["tags.sweep_overrides"].notna()].iloc[0]["status"] == "FAILED"
    assert list(pd.read_csv(project / "sweep" / "summary.csv")["status"]) == ["FINISHED", "FAILED"]


@pytest.mark.parametrize(("device", "extra", "gpus"), [("gpu", [], 1), ("cpu", [], 0), ("auto", [], 0),
                                                       ("gpu", ["hydra.launcher.ray.remote.num_gpus=2"], 2)])  # fmt: skip
def test_the_ray_preset_gives_every_job_its_resources_and_the_sweeps_environment(device, extra, gpus):
    from hydra import compose, initialize_config_dir

    from softmaxlab.core.config import register_configs
    from softmaxlab.sweeps.cluster import ENV_CWD, ray_settings

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", ["launcher=ray", f"train.device={device}", *extra,
                                 "+hydra.launcher.ray.init.runtime_env.env_vars.MINE=1"], return_hydra_config=True)  # fmt: skip
    ray_settings(cfg, {"SOFTMAXLAB_PARENT_RUN_ID": "abc"}, cfg.train.device)
    ray = cfg.hydra.launcher.ray
    assert (ray.remote.num_cpus, ray.remote.num_gpus, ray.remote.max_retries) == (1, gpus, 0)
    # The sweep's variables join the user's own; the workers move to this directory.
    assert dict(ray.init.runtime_env.env_vars) == {
        "MINE": 1,
        "SOFTMAXLAB_PARENT_RUN_ID": "abc",
        ENV_CWD: os.getcwd(),
    }
    assert ray.init.runtime_env.worker_process_setup_hook == "softmaxlab.sweeps.cluster.ray_worker_setup"
    assert ray.init.object_store_memory is None  # the plugin's 1.2.2 default is refused by a running cluster


def test_the_ray_runtime_env_carries_no_credential():
    from hydra import compose, initialize_config_dir

    from softmaxlab.core.config import register_configs
    from softmaxlab.core.errors import UserError
    from softmaxlab.sweeps.cluster import ray_settings

    register_configs()
    secret = "s3cr3t-pa55"
    uri = f"http://alice:{secret}@127.0.0.1:5000"
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "SOFTMAXLAB_SWEEP_STORE": f"1 {uri}",
        "SOFTMAXLAB_PARENT_RUN_ID": "abc",
    }
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", ["launcher=ray"], return_hydra_config=True)
        ray_settings(cfg, env, "cpu")
        env_vars = dict(cfg.hydra.launcher.ray.init.runtime_env.env_vars)
        assert secret not in str(env_vars) and "alice" not in str(env_vars)
        # The jobs still get the store, without its user info: their node holds the credentials.
        assert env_vars["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
        assert env_vars["SOFTMAXLAB_SWEEP_STORE"] == "1 http://127.0.0.1:5000"
        # A credential the user puts in the runtime env is refused, in one line that does not show it.
        for key, value in (("MLFLOW_TRACKING_PASSWORD", secret), ("MLFLOW_TRACKING_URI", uri)):
            cfg = compose("config", ["launcher=ray", f"+hydra.launcher.ray.init.runtime_env.env_vars.{key}={value}"],
                          return_hydra_config=True)  # fmt: skip
            with pytest.raises(UserError) as refused:
                ray_settings(cfg, {}, "cpu")
            message = str(refused.value)
            assert "\n" not in message and secret not in message
            assert f"env_vars.{key} holds a credential" in message and "~/.mlflow/credentials" in message


def test_an_unusable_optuna_storage_url_is_named_without_its_password():
    from softmaxlab.core.errors import UserError
    from softmaxlab.sweeps.cluster import prepare_optuna_storage

    secret = "s3cr3t-pa55"
    for url in (
        f"postgresqlx://alice:{secret}@127.0.0.1/optuna",
        f"postgresql://alice:{secret}@127.0.0.1:port/optuna",
    ):
        with pytest.raises(UserError) as refused:
            prepare_optuna_storage(url)
        message = str(refused.value)
        assert secret not in message and "\n" not in message, message
        assert message.startswith("hydra.sweeper.storage=postgresql") and "://***@127.0.0.1" in message, (
            message
        )


# Run inside the namespace of tools/ray_local.sh: a tracking server behind a basic-auth login
# (test_tracking_server's), a sweep against it with the credentials in its URI, then a search
# of every file Ray wrote (its temp folders) for the password.
LOGIN_DRIVER = """
import json, os, pathlib, subprocess, sys
sys.path.insert(0, {tests!r})
from test_tracking_server import basic_auth_proxy, free_port, start_mlflow_server

out, project, secret = pathlib.Path(sys.argv[1]), sys.argv[2], os.environ["LOGIN_SECRET"]
port = free_port()
server = start_mlflow_server(port, out)
try:
    with basic_auth_proxy(port, "alice", secret) as front:
        env = {{**os.environ, "MLFLOW_TRACKING_URI": f"http://alice:{{secret}}@127.0.0.1:{{front}}"}}
        del env["LOGIN_SECRET"]
        proc = subprocess.run(sys.argv[3:], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    # Before the namespace ends: tools/ray_local.sh removes its cluster's folder then.
    written = [p for d in (os.environ["RAY_TMPDIR"], os.environ["RAY_LOCAL_DIR"]) for p in pathlib.Path(d).rglob("*")]
    found = [str(p) for p in written if p.is_file() and secret.encode() in p.read_bytes()]
    result = {{"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "files": len(written),
               "found": found}}
    (out / "result.json").write_text(json.dumps(result))
finally:
    server.terminate()
    server.wait(timeout=60)
"""


@pytest.fixture
def short_tmp():
    """A folder with a short path, for Ray's temp folders: its sockets' paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("ray", ["the sweep's own Ray", "a Ray cluster"])
def test_a_ray_sweep_logs_to_a_server_behind_a_login_and_ray_never_gets_the_password(
    ray, tmp_path, short_tmp
):
    from mlflow.tracking import MlflowClient

    needs_root_for_namespaces()
    secret = "s3cr3t-pa55"
    project = make_project(tmp_path / "proj")
    out = tmp_path / "out"
    ray_tmp, ray_local = short_tmp / "t", short_tmp / "l"
    for d in (out, ray_tmp, ray_local):
        d.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(LOGIN_DRIVER.format(tests=str(ROOT / "tests")))
    env = env_with_venv(LOGIN_SECRET=secret, RAY_TMPDIR=str(ray_tmp), RAY_LOCAL_DIR=str(ray_local),
                        RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    if ray == "a Ray cluster":
        # The nodes hold the credentials in the environment they were started with.
        env.update(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=secret)
        where = ["--workers", "0"]
    else:
        where = ["--no-cluster"]
    sweep = ["python", "-m", "softmaxlab", "-m", "launcher=ray", "seed=0,1", *tiny_overrides(),
             "hydra.sweep.dir=sweep"]  # fmt: skip
    run_cmd([str(ROOT / "tools" / "ray_local.sh"), *where, "--", "python", str(driver), str(out), str(project),
             *sweep], tmp_path, env=env, timeout=1200)  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["rc"] == 0, result["stderr"]
    # The token of the sweep's own Ray went with it; Ray's logs stay.
    assert list(ray_tmp.rglob("auth_token")) == []
    # Ray wrote its logs (the runtime env agent logs every runtime env it creates): none holds it.
    assert result["files"] > 10 and result["found"] == [], result["found"]
    assert secret not in result["stdout"] + result["stderr"]
    # Every job logged its run on the server, under the sweep's parent.
    client = MlflowClient(f"sqlite:///{out / 'server.db'}")
    found = client.search_runs([client.get_experiment_by_name("softmaxlab").experiment_id])
    parents = [r for r in found if "sweep_overrides" in r.data.tags]
    children = [r for r in found if "job_num" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["job_num"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    for run in found:
        assert secret not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert secret.encode() not in path.read_bytes(), path


def test_the_ray_a_sweep_starts_takes_loopback_for_its_address_whatever_the_machine_has(tmp_path):
    # Ray's node address is what its servers listen on; Ray would take the machine's primary
    # address (it resolves even a loopback one given to ray.init to that). No Ray is started
    # here: this asks Ray, in a process set up as the sweep sets up its own Ray, which address
    # it would use. (Outside a namespace: ray_local.sh's has only loopback, where Ray takes it anyway.)
    ask = (
        "import os\nfrom softmaxlab.sweeps.cluster import local_ray\nlocal_ray(None)\n"
        "from ray._private.services import get_node_ip_address\nprint(get_node_ip_address())\n"
    )
    env = env_with_venv(RAY_TMPDIR=str(tmp_path))
    assert run_cmd(["python", "-c", ask], tmp_path, env=env).stdout.split() == ["127.0.0.1"]
    # Its folder: private, with the token gone once the process has ended.
    (folder,) = tmp_path.glob("softmaxlab-ray-*")
    assert folder.stat().st_mode & 0o777 == 0o700 and not (folder / "auth_token").exists()


def descendants(pid: int) -> list[int]:
    """The processes started under `pid`, from /proc."""
    parent = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def test_the_ray_a_sweep_starts_refuses_clients_without_its_token_and_listens_on_loopback(
    tmp_path, short_tmp
):
    needs_root_for_namespaces()
    project = make_project(tmp_path / "proj")
    tiny = [o for o in tiny_overrides() if not o.startswith("train.epochs")]
    # RAY_AUTH_MODE=disabled, as a user may have it for another cluster: the sweep's Ray has a token anyway.
    env = env_with_venv(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(short_tmp), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # A job that trains long enough to try the cluster while it runs.
    sweep = subprocess.Popen(
        [str(ROOT / "tools" / "ray_local.sh"), "--no-cluster", "--", "python", "-m", "softmaxlab", "-m",
         "launcher=ray", "train.epochs=5000", *tiny, "tracking.enabled=false", "hydra.sweep.dir=sweep"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline, gcs = time.time() + 300, None
        while gcs is None and time.time() < deadline and sweep.poll() is None:
            for pid in descendants(sweep.pid):
                with contextlib.suppress(OSError):
                    if b"gcs_server" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                        gcs = pid
            time.sleep(0.5)
        assert gcs is not None, (
            sweep.communicate(timeout=60)[0] if sweep.poll() is not None else "no Ray started"
        )
        args = Path(f"/proc/{gcs}/cmdline").read_bytes().decode().split("\0")
        assert "--node_ip_address=127.0.0.1" in args or "--node-ip-address=127.0.0.1" in args, args
        enter = ["nsenter", f"--target={gcs}", "--net", "--pid", "--mount", "--"]
        # Its port (Ray picks a free one) once it listens: the namespace's sockets, with their processes.
        port = None
        while port is None and time.time() < deadline:
            listening = run_cmd(enter + ["ss", "-ltnpH"], tmp_path, env=env_with_venv()).stdout.splitlines()
            port = next(
                (line.split()[3].rsplit(":", 1)[1] for line in listening if '"gcs_server"' in line), None
            )
            time.sleep(0.5)
        assert port is not None
        probe = ["python", "-c", f"import ray; ray.init(address='127.0.0.1:{port}'); print('joined')"]
        # A client without a token, and one with another token: both refused.
        refused = run_cmd(
            enter + probe, tmp_path, env=env_with_venv(RAY_AUTH_MODE="disabled"), check=False, timeout=180
        )
        assert refused.returncode != 0 and "joined" not in refused.stdout, refused.stderr
        wrong = tmp_path / "wrong_token"
        wrong.write_text("0" * 64)
        other = run_cmd(enter + probe, tmp_path, check=False, timeout=180,
                        env=env_with_venv(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong)))  # fmt: skip
        assert other.returncode != 0 and "InvalidAuthToken" in other.stderr, other.stderr
        # Its token: a file of its own, 0600 in a 0700 folder, not the ~/.ray/auth_token other clusters
        # share; with it, a client joins.
        environ = dict(
            line.split("=", 1) for line in Path(f"/proc/{gcs}/environ").read_text().split("\0") if "=" in line
        )
        assert environ["RAY_AUTH_MODE"] == "token"
        token = Path(environ["RAY_AUTH_TOKEN_PATH"])
        assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
        assert Path.home() / ".ray" not in token.parents
        joined = run_cmd(enter + probe, tmp_path, timeout=180,
                         env=env_with_venv(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)))  # fmt: skip
        assert "joined" in joined.stdout
        # Every socket in the namespace listens on loopback (where there is nothing else, as here).
        listening = run_cmd(enter + ["ss", "-ltnH"], tmp_path, env=env_with_venv()).stdout.splitlines()
        local = [line.split()[3] for line in listening if line.strip()]
        assert local and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in local), local
    finally:
        sweep.kill()  # unshare --kill-child: the namespace, the sweep and its Ray go with it
        sweep.communicate(timeout=60)
