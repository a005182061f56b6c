"""The team services (issue 12 items 1 and 4; issue 22 items 1 and 5): real PostgreSQL, Ceph
radosgw and MLflow server processes on 127.0.0.1, started by the same code as `softmaxlab team
up`: the session's shared stack (basic-auth on), or for the tests that stop services or change
the stack's own secrets a stack of their own (conftest). Each teammate's identity is tried with
what their join file holds, as they would: MLflow's 403, S3's AccessDenied and PostgreSQL's
permission error each end in one line."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import OWN_TEAM_STACK, env_with_venv, make_project, run_cmd, tiny_overrides

from softmaxlab.core.errors import UserError, first_line
from softmaxlab.core.processes import group_members
from softmaxlab.team import ceph, install, postgres, services, stack, users
from softmaxlab.team.state import DVC_BUCKET, MLFLOW_BUCKET, SERVICES, State, load, write_env

pytestmark = [pytest.mark.slow, pytest.mark.team]


def http_status(
    url: str, user: str | None = None, password: str | None = None, data: dict | None = None
) -> int:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None)
    req.add_header("Content-Type", "application/json")
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def process_listing() -> str:
    return subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout


def secret_values(state: State) -> list[str]:
    values = [state.secrets["pg_password"], state.secrets["admin_password"]]
    for keys in state.secrets["s3"].values():
        values += [keys["access_key"], keys["secret_key"]]
    return values


def sourced(path: Path) -> dict[str, str]:
    """The variables an env file sets, as bash's `source` reads it (the file's own exports only)."""
    out = subprocess.run(["bash", "-c", 'set -a; . "$1"; env -0', "_", str(path)],
                         env={"PATH": os.environ["PATH"]}, capture_output=True, check=True).stdout  # fmt: skip
    env = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    return {k: v for k, v in env.items() if k not in ("PATH", "PWD", "SHLVL", "_", "OLDPWD")}


def team_cli(state: State, *args: str, **env: str):
    return run_cmd(
        ["softmaxlab", "team", *args], Path.cwd(), env_with_venv(SOFTMAXLAB_TEAM_DIR=str(state.dir), **env),
        check=False,
    )  # fmt: skip


def test_second_up_reports_what_runs_and_status_answers(team_stack):
    said = []
    again = stack.up(team_stack.dir, ports=team_stack.ports, say=said.append)
    assert [line.split()[2:4] for line in said[:5]] == [["already", "running:"]] * 5
    assert again.env == team_stack.env
    out = team_cli(team_stack, "status")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert all(" answers " in rows[name] for name in SERVICES)
    assert team_stack.mlflow_url in rows["mlflow"] and team_stack.s3_url in rows["radosgw"]
    # .team/env: the variables a teammate sources, readable by its owner only.
    env_file = team_stack.path("env")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    exported = sourced(env_file)
    assert exported == team_stack.env
    for name in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert exported[name]


def test_runs_go_to_postgresql_and_artifacts_to_s3_through_the_server(team_stack, tmp_path, monkeypatch):
    import mlflow
    import sqlalchemy

    client = mlflow.MlflowClient(team_stack.mlflow_url)
    exp_id = client.create_experiment("team-stack-test")
    run = client.create_run(exp_id)
    client.log_param(run.info.run_id, "lr", "0.01")
    (tmp_path / "note.txt").write_text("through the server")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    # The run's row is in PostgreSQL ...
    engine = sqlalchemy.create_engine(team_stack.postgres_url("mlflow"))
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": run.info.run_id}
        )
        assert [r[0] for r in rows] == ["FINISHED"]
    engine.dispose()
    # ... the artifact an object in the server's bucket, which the team's keys cannot touch.
    keys = [
        o["Key"]
        for o in ceph.s3_client(team_stack, "mlflow").list_objects_v2(Bucket=MLFLOW_BUCKET)["Contents"]
    ]
    assert f"mlflow/{exp_id}/{run.info.run_id}/artifacts/note.txt" in keys
    with pytest.raises(Exception, match="AccessDenied"):
        ceph.s3_client(team_stack, "team").list_objects_v2(Bucket=MLFLOW_BUCKET)
    # A client needs only the server's URL to read it back.
    # (set explicitly: an earlier in-process run in this worker may have set MLflow's global URI;
    # the autouse fixture in conftest puts it back after the test)
    mlflow.set_tracking_uri(team_stack.mlflow_url)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/note.txt") == "through the server"


def test_databases_for_mlflow_and_optuna_take_the_generated_password_only(team_stack):
    import sqlalchemy

    for db in ("mlflow", "optuna", "mlflow_auth"):
        engine = sqlalchemy.create_engine(team_stack.postgres_url(db))
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == db
        engine.dispose()
    wrong = team_stack.postgres_url("optuna").replace(team_stack.secrets["pg_password"], "wrong")
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        sqlalchemy.create_engine(wrong).connect()


def state_copy(state: State, dest: Path, **changes) -> State:
    """The stack's state files in `dest` with `changes` (auth, secrets): a `softmaxlab team`
    command pointed there talks to the same servers, and the shared stack's own files stay."""
    copy = State(dest, state.ports, state.auth, state.ceph, state.secrets)
    for name, value in changes.items():
        setattr(copy, name, value)
    copy.save()
    return copy


def test_team_commands_say_what_is_wrong_in_one_line(team_stack, tmp_path):
    # The same stack as the team saw it before `team up --auth`.
    out = team_cli(state_copy(team_stack, tmp_path / "no-auth", auth=False), "add-user", "alice")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "without basic-auth" in out.stderr and "--auth" in out.stderr
    nothing = run_cmd(
        ["softmaxlab", "team", "status"],
        tmp_path,
        env_with_venv(SOFTMAXLAB_TEAM_DIR=str(tmp_path / "none")),
        check=False,
    )
    assert (
        nothing.returncode == 2 and "no team services" in nothing.stderr and "Traceback" not in nothing.stderr
    )
    bad_port = team_cli(team_stack, "up", SOFTMAXLAB_TEAM_MLFLOW_PORT="80")
    assert bad_port.returncode == 2 and "SOFTMAXLAB_TEAM_MLFLOW_PORT=80 is not allowed" in bad_port.stderr


def test_ui_with_the_team_server_points_at_it_instead_of_starting_one(team_stack, tmp_path):
    import mlflow

    project = make_project(tmp_path / "proj")
    client = mlflow.MlflowClient(team_stack.mlflow_url)
    # The session's stack is shared: another test may have logged to "softmaxlab" already.
    exp = client.get_experiment_by_name("softmaxlab")
    exp_id = exp.experiment_id if exp else client.create_experiment("softmaxlab")
    out = run_cmd(["softmaxlab", "ui"], project, env_with_venv(MLFLOW_TRACKING_URI=team_stack.mlflow_url))
    link = f"{team_stack.mlflow_url}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    assert out.stdout.strip() == f"MLflow UI: the tracking server is the UI (MLFLOW_TRACKING_URI): {link}"
    assert not (project / "mlflow.db").exists() and not (project / "outputs").exists()  # nothing local
    stopped = f"http://127.0.0.1:{team_stack.ports['postgres']}"  # no HTTP server there
    down = run_cmd(["softmaxlab", "ui"], project, env_with_venv(MLFLOW_TRACKING_URI=stopped), check=False)
    assert down.returncode == 2 and down.stderr.count("\n") == 1 and "make team-up" in down.stderr


def test_join_sets_a_clones_dvc_remote_from_the_sourced_env_and_dvc_push_reaches_the_bucket(
    team_stack, tmp_path
):
    project = make_project(tmp_path / "proj")
    (project / "blob.bin").write_bytes(bytes(range(256)) * 1000)
    run_cmd(["dvc", "add", "-q", "blob.bin"], project)
    missing = run_cmd(["softmaxlab", "team", "join"], project, check=False)
    assert missing.returncode == 2 and "SOFTMAXLAB_DVC_REMOTE and AWS_ENDPOINT_URL" in missing.stderr
    env = env_with_venv(**team_stack.env)
    out = run_cmd(["softmaxlab", "team", "join"], project, env)
    assert f"s3://{DVC_BUCKET}/dvc at {team_stack.s3_url}" in out.stdout
    # Only this clone's git-ignored config names the local endpoint; the committed one is as it was.
    local = (project / ".dvc" / "config.local").read_text()
    assert team_stack.s3_url in local and "secret" not in local.lower()
    assert run_cmd(["git", "diff", "--quiet", "--", ".dvc/config"], project, check=False).returncode == 0
    run_cmd(["dvc", "push"], project, env)
    md5 = next(
        line.split()[-1] for line in (project / "blob.bin.dvc").read_text().splitlines() if "md5:" in line
    )
    key = f"dvc/files/md5/{md5[:2]}/{md5[2:]}"
    got = ceph.s3_client(team_stack, "team").get_object(Bucket=DVC_BUCKET, Key=key)["Body"].read()
    assert got == (project / "blob.bin").read_bytes()


# --- basic-auth (the shared stack has it on); a restart and down: a stack of their own ------------


def test_basic_auth_users_and_per_experiment_permissions(auth_stack):
    url = auth_stack.mlflow_url
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
    assert http_status(f"{url}/health") == 200
    assert http_status(search) == 401
    admin = auth_stack.env["MLFLOW_TRACKING_PASSWORD"]
    assert auth_stack.env["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert http_status(search, "admin", admin) == 200
    assert http_status(search, "admin", "wrong") == 401
    # Users through the command (their credentials go to .team/users/NAME.env, 0600).
    said = ""
    for name in ("alice", "bob"):
        out = team_cli(auth_stack, "add-user", name)
        assert out.returncode == 0, out.stderr
        said += out.stdout + out.stderr
    users = {}
    for name in ("alice", "bob"):
        path = auth_stack.path("users", f"{name}.env")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        lines = sourced(path)
        assert lines["MLFLOW_TRACKING_USERNAME"] == name
        users[name] = lines["MLFLOW_TRACKING_PASSWORD"]
        assert users[name] not in said
    create = f"{url}/api/2.0/mlflow/experiments/create"
    assert http_status(create, "alice", users["alice"], {"name": "alice-exp"}) == 200
    exp = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=alice-exp",
        headers={"Authorization": "Basic " + base64.b64encode(f"alice:{users['alice']}".encode()).decode()},
    ), timeout=30).read())["experiment"]  # fmt: skip
    new_run = f"{url}/api/2.0/mlflow/runs/create"
    body = {"experiment_id": exp["experiment_id"]}
    # Bob may read (default READ) but not write until alice's experiment is granted to him.
    assert http_status(new_run, "bob", users["bob"], body) == 403
    out = team_cli(auth_stack, "grant", "bob", "alice-exp", "EDIT")
    assert out.returncode == 0, out.stderr
    assert http_status(new_run, "bob", users["bob"], body) == 200
    bad = team_cli(auth_stack, "grant", "bob", "alice-exp", "OWNER")
    assert bad.returncode == 2 and "READ, EDIT, MANAGE, NO_PERMISSIONS" in bad.stderr
    # The auth configuration (it holds the admin password and the database URL) is private.
    assert stat.S_IMODE(auth_stack.path("mlflow", "basic_auth.ini").stat().st_mode) == 0o600


def test_wrong_admin_password_is_one_line_naming_the_variable(auth_stack, tmp_path):
    wrong = {**auth_stack.secrets, "admin_password": "not-the-password"}
    out = team_cli(state_copy(auth_stack, tmp_path / "wrong", secrets=wrong), "add-user", "mallory")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "HTTP 401" in out.stderr and "MLFLOW_AUTH_ADMIN_PASSWORD" in out.stderr


def test_missing_or_wrong_mlflow_credentials_are_one_line_naming_the_variables(auth_stack, tmp_path):
    project = make_project(tmp_path / "proj")
    for creds in ({}, {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong-pw-3c1"}):
        env = env_with_venv(MLFLOW_TRACKING_URI=auth_stack.mlflow_url, **creds)
        ui = run_cmd(["softmaxlab", "ui"], project, env, check=False)
        run = run_cmd([sys.executable, "-m", "softmaxlab", *tiny_overrides()], project, env, check=False)
        for out in (ui, run):
            assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
            assert "wrong-pw-3c1" not in out.stderr
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in ui.stderr
        if creds:
            assert "refused MLFLOW_TRACKING_USERNAME=admin with its password (HTTP 401)" in run.stderr
            assert "check MLFLOW_TRACKING_PASSWORD" in run.stderr
        else:
            assert (
                "wants a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                in run.stderr
            )


def test_a_user_without_edit_gets_one_line_saying_who_grants_it_and_no_run(auth_stack, tmp_path):
    import mlflow

    admin = ("admin", auth_stack.secrets["admin_password"])
    assert (
        http_status(
            f"{auth_stack.mlflow_url}/api/2.0/mlflow/experiments/create", *admin, {"name": "admin-exp"}
        )
        == 200
    )
    password = sourced(users.add_user(auth_stack, "erin"))["MLFLOW_TRACKING_PASSWORD"]
    project = make_project(tmp_path / "proj")
    env = env_with_venv(MLFLOW_TRACKING_URI=auth_stack.mlflow_url, MLFLOW_TRACKING_USERNAME="erin",
                        MLFLOW_TRACKING_PASSWORD=password)  # fmt: skip
    for args in ([], ["-m", "seed=0,1"]):  # one run, and a sweep (refused before any job)
        out = run_cmd([sys.executable, "-m", "softmaxlab", *args, *tiny_overrides(), "tracking.experiment=admin-exp"],
                      project, env, check=False)  # fmt: skip
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "user erin may not write to experiment 'admin-exp' (HTTP 403)" in out.stderr
        assert "softmaxlab team grant erin admin-exp EDIT" in out.stderr
    client = mlflow.MlflowClient(auth_stack.mlflow_url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", auth_stack.secrets["admin_password"])
        assert client.search_runs([client.get_experiment_by_name("admin-exp").experiment_id]) == []


def test_a_users_pipeline_run_on_the_auth_server_carries_no_credential(auth_stack, tmp_path, monkeypatch):
    import mlflow

    password = sourced(users.add_user(auth_stack, "carol"))["MLFLOW_TRACKING_PASSWORD"]
    creds = {"MLFLOW_TRACKING_USERNAME": "carol", "MLFLOW_TRACKING_PASSWORD": password}
    project = make_project(tmp_path / "proj", *tiny_overrides())
    env = env_with_venv(MLFLOW_TRACKING_URI=auth_stack.mlflow_url, **creds)
    # A registered model of her own: on the session's shared stack another test may have
    # registered the default one first, and only its owner (or a grant) may add versions.
    own = ["tracking.experiment=carol-exp", "tracking.registered_model=carol-model"]
    out = run_cmd([sys.executable, "-m", "softmaxlab", *tiny_overrides(), *own], project, env)
    assert password not in out.stdout + out.stderr
    # Read back as the admin: the run is carol's, on the server, and holds no credential.
    mlflow.set_tracking_uri(auth_stack.mlflow_url)  # MLflow's global URI wins over the env
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_stack.secrets["admin_password"])
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("carol-exp").experiment_id])
    assert run.info.status == "FINISHED"
    data = run.data
    logged = " ".join([*data.tags, *data.tags.values(), *data.params, *data.params.values(), *data.metrics])
    files = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "artifacts"))
    blobs = [p.read_bytes() for p in Path(files).rglob("*") if p.is_file()]
    assert len(blobs) > 10  # report, figures, tables, the model's files: through the server from S3
    for value in (password, auth_stack.secrets["admin_password"], *secret_values(auth_stack)):
        assert value not in logged
        assert not any(value.encode() in b for b in blobs)


# --- each holds only their own keys (issue 22 item 1) ---------------------------------------------


def s3_as(state: State, env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=state.s3_url, region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


def s3_refusal(call) -> str:
    """The one line S3 answers a refused request with (its error code first)."""
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError) as err:
        call()
    return f"{err.value.response['Error']['Code']}: {first_line(err.value)}"


def db_refusal(url: str) -> str:
    """PostgreSQL's answer to `url`'s login, in one line (what `prepare_optuna_storage` says)."""
    from softmaxlab.sweeps.cluster import prepare_optuna_storage

    with pytest.raises(UserError) as err:
        prepare_optuna_storage(url)
    assert "\n" not in str(err.value)
    return str(err.value)


def other_db(url: str, db: str) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


def test_the_admins_env_holds_no_owner_secret_and_the_shared_one_no_admin_login(auth_stack, tmp_path):
    import sqlalchemy

    owner_secrets = [auth_stack.secrets["pg_password"], auth_stack.secrets["flask_secret_key"],
                     *auth_stack.secrets["s3"]["mlflow"].values(), *auth_stack.secrets["s3"]["owner"].values()]  # fmt: skip
    admin = sourced(auth_stack.path("env"))
    text = auth_stack.path("env").read_text()
    assert admin["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert not any(secret in text for secret in owner_secrets)
    # Without basic-auth the same stack's file is the one teammates share: no admin login in it.
    shared_state = state_copy(auth_stack, tmp_path / "no-auth", auth=False)
    shared = sourced(write_env(shared_state))
    assert "MLFLOW_TRACKING_USERNAME" not in shared and "MLFLOW_TRACKING_PASSWORD" not in shared
    shared_text = shared_state.path("env").read_text()
    assert not any(s in shared_text for s in [auth_stack.secrets["admin_password"], *owner_secrets])
    assert shared["AWS_ACCESS_KEY_ID"] == admin["AWS_ACCESS_KEY_ID"]  # the `team` S3 user's
    # The `team` role reaches the optuna database and no other: never the auth database.
    optuna_url = shared["SOFTMAXLAB_OPTUNA_STORAGE"]
    engine = sqlalchemy.create_engine(optuna_url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == "optuna"
    engine.dispose()
    for db in ("mlflow_auth", "mlflow", "postgres"):
        assert f'FATAL:  permission denied for database "{db}"' in db_refusal(other_db(optuna_url, db))
    # The `team` S3 key: the DVC bucket, not the server's artifacts, and not the bucket's policy.
    s3 = s3_as(auth_stack, shared)
    s3.put_object(Bucket=DVC_BUCKET, Key="dvc/team-wrote-this", Body=b"ok")
    assert s3_refusal(lambda: s3.list_objects_v2(Bucket=MLFLOW_BUCKET)).startswith("AccessDenied")
    assert s3_refusal(lambda: s3.delete_bucket_policy(Bucket=DVC_BUCKET)).startswith("AccessDenied")


def test_a_read_user_reads_runs_and_pulls_data_but_writes_neither(auth_stack, tmp_path, capsys):
    import mlflow

    seen = []
    admin = sourced(auth_stack.path("env"))
    out = team_cli(auth_stack, "add-user", "rita", "READ")
    assert out.returncode == 0, out.stderr
    rita = sourced(auth_stack.path("users", "rita.env"))
    assert stat.S_IMODE(auth_stack.path("users", "rita.env").stat().st_mode) == 0o600
    assert rita["MLFLOW_TRACKING_USERNAME"] == "rita" and "SOFTMAXLAB_OPTUNA_STORAGE" not in rita
    text = auth_stack.path("users", "rita.env").read_text()
    assert not any(value in text for value in secret_values(auth_stack))  # nobody else's key
    # Runs: she reads the admin's, and may not write to the experiment.
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.setenv(name, admin[name])
        client = mlflow.MlflowClient(auth_stack.mlflow_url)
        exp_id = client.create_experiment("read-only-exp")
        run = client.create_run(exp_id)
        client.log_param(run.info.run_id, "lr", "0.5")
        client.set_terminated(run.info.run_id)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.setenv(name, rita[name])
        (got,) = mlflow.MlflowClient(auth_stack.mlflow_url).search_runs([exp_id])
        assert got.data.params == {"lr": "0.5"}
        seen.append(f"READ rita reads the admin's run: params {got.data.params}")
    project = make_project(tmp_path / "proj")
    env = env_with_venv(**rita)
    refused = run_cmd([sys.executable, "-m", "softmaxlab", *tiny_overrides(), "tracking.experiment=read-only-exp"],
                      project, env, check=False)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "user rita may not write to experiment 'read-only-exp' (HTTP 403)" in refused.stderr
    seen.append(f"READ rita runs the pipeline: {refused.stderr.strip()}")
    # Data: the admin pushes, she pulls; her push is refused before DVC runs, in one line.
    (project / "blob.bin").write_bytes(b"shared data " * 5000)
    run_cmd(["dvc", "add", "-q", "blob.bin"], project)
    run_cmd(["softmaxlab", "team", "join"], project, env_with_venv(**admin))
    run_cmd(["softmaxlab", "push", "blob.bin.dvc"], project, env_with_venv(**admin))
    shutil.rmtree(project / ".dvc" / "cache")
    (project / "blob.bin").unlink()
    run_cmd(["softmaxlab", "pull", "blob.bin.dvc"], project, env)
    assert (project / "blob.bin").read_bytes() == b"shared data " * 5000
    seen.append("READ rita: softmaxlab pull got the admin's data")
    (project / "blob.bin").write_bytes(b"rita's change")
    run_cmd(["dvc", "add", "-q", "blob.bin"], project)
    push = run_cmd(["softmaxlab", "push"], project, env, check=False)
    assert push.returncode == 2 and push.stderr.count("\n") == 1, push.stderr
    assert f"may not write to bucket '{DVC_BUCKET}' (AccessDenied)" in push.stderr
    assert rita["AWS_SECRET_ACCESS_KEY"] not in push.stderr
    seen.append(f"READ rita pushes: {push.stderr.strip()}")
    s3 = s3_as(auth_stack, rita)
    seen.append("READ rita puts an object with boto3: "
                + s3_refusal(lambda: s3.put_object(Bucket=DVC_BUCKET, Key="dvc/rita", Body=b"x")))  # fmt: skip
    assert "AccessDenied" in seen[-1]
    # An EDIT grant would let her write runs: refused for a READ user.
    grant = team_cli(auth_stack, "grant", "rita", "read-only-exp", "EDIT")
    assert grant.returncode == 2 and grant.stderr.count("\n") == 1 and "READ user" in grant.stderr
    with capsys.disabled():
        print("\n" + "\n".join(seen))


def test_edit_users_hold_their_own_keys_and_remove_user_revokes_them(auth_stack, tmp_path, capsys):
    import optuna
    import sqlalchemy

    from softmaxlab.sweeps.cluster import prepare_optuna_storage

    seen = []
    for name in ("eddie", "edna"):
        out = team_cli(auth_stack, "add-user", name)  # EDIT unless told
        assert out.returncode == 0, out.stderr
        assert "database role" in auth_stack.path("users", f"{name}.env").read_text()
    eddie, edna = (sourced(auth_stack.path("users", f"{n}.env")) for n in ("eddie", "edna"))
    team = sourced(auth_stack.path("env"))
    keys = {e["AWS_ACCESS_KEY_ID"] for e in (eddie, edna, team)}
    assert len(keys) == 3  # each their own S3 key
    # MLflow: eddie's experiment; edna may read it but not write until granted.
    eddie_auth, edna_auth = (
        ("eddie", eddie["MLFLOW_TRACKING_PASSWORD"]),
        ("edna", edna["MLFLOW_TRACKING_PASSWORD"]),
    )
    url = auth_stack.mlflow_url
    assert http_status(f"{url}/api/2.0/mlflow/experiments/create", *eddie_auth, {"name": "eddie-exp"}) == 200
    exp_id = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=eddie-exp",
        headers={"Authorization": "Basic " + base64.b64encode(":".join(eddie_auth).encode()).decode()},
    ), timeout=30).read())["experiment"]["experiment_id"]  # fmt: skip
    new_run = (f"{url}/api/2.0/mlflow/runs/create", {"experiment_id": exp_id})
    assert http_status(new_run[0], *edna_auth, new_run[1]) == 403
    seen.append("second EDIT user edna writes to eddie's experiment: HTTP 403 until granted")
    # S3: both push to the DVC bucket, neither deletes nor reads the server's artifacts.
    for who, env in (("eddie", eddie), ("edna", edna)):
        s3 = s3_as(auth_stack, env)
        s3.put_object(Bucket=DVC_BUCKET, Key=f"dvc/{who}-wrote-this", Body=who.encode())
        denied = s3_refusal(lambda s3=s3: s3.list_objects_v2(Bucket=MLFLOW_BUCKET))
        assert denied.startswith("AccessDenied")
        seen.append(f"EDIT {who} lists the artifacts bucket: {denied}")
        assert s3_refusal(
            lambda s3=s3, who=who: s3.delete_object(Bucket=DVC_BUCKET, Key=f"dvc/{who}-wrote-this")
        ).startswith("AccessDenied")
    # PostgreSQL: one Optuna study both use; no other database.
    prepare_optuna_storage(eddie["SOFTMAXLAB_OPTUNA_STORAGE"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="eddie-and-edna", storage=eddie["SOFTMAXLAB_OPTUNA_STORAGE"])
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    shared = optuna.load_study(study_name="eddie-and-edna", storage=edna["SOFTMAXLAB_OPTUNA_STORAGE"])
    assert len(shared.trials) == 1
    for db in ("mlflow_auth", "mlflow"):
        refused = db_refusal(other_db(edna["SOFTMAXLAB_OPTUNA_STORAGE"], db))
        assert f'permission denied for database "{db}"' in refused
        assert edna["SOFTMAXLAB_OPTUNA_STORAGE"].split(":")[2].split("@")[0] not in refused  # no password
        seen.append(f"EDIT edna's role on {db}: {refused}")
    # remove-user: eddie's login, key and role are refused; edna keeps hers.
    out = team_cli(auth_stack, "remove-user", "eddie")
    assert out.returncode == 0, out.stderr
    assert not auth_stack.path("users", "eddie.env").exists()
    assert http_status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", *eddie_auth) == 401
    gone = s3_refusal(lambda: s3_as(auth_stack, eddie).list_objects_v2(Bucket=DVC_BUCKET))
    assert gone.startswith("InvalidAccessKeyId")
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        sqlalchemy.create_engine(eddie["SOFTMAXLAB_OPTUNA_STORAGE"]).connect()
    seen.append(
        f"removed eddie: MLflow 401, S3 {gone.split(':')[0]}, PostgreSQL password authentication failed"
    )
    s3_as(auth_stack, edna).put_object(Bucket=DVC_BUCKET, Key="dvc/edna-after", Body=b"still")
    assert (
        len(optuna.load_study(study_name="eddie-and-edna", storage=edna["SOFTMAXLAB_OPTUNA_STORAGE"]).trials)
        == 1
    )
    # The admin: everything the teammates were refused.
    admin = ("admin", auth_stack.secrets["admin_password"])
    assert http_status(new_run[0], *admin, new_run[1]) == 200
    seen.append("admin writes to eddie's experiment: HTTP 200")
    with capsys.disabled():
        print("\n" + "\n".join(seen))


# --- files and names (issue 22 item 5) ------------------------------------------------------------


def test_env_files_quote_values_so_a_secret_with_shell_syntax_survives_source(auth_stack, tmp_path):
    # MLFLOW_AUTH_ADMIN_PASSWORD is the user's choice: any character may be in it.
    password = f"p$(touch {tmp_path}/ran) `x` 'q\" $HOME;|&<> *"
    copy = state_copy(
        auth_stack, tmp_path / "quoted", secrets={**auth_stack.secrets, "admin_password": password}
    )
    got = sourced(write_env(copy))
    assert got["MLFLOW_TRACKING_PASSWORD"] == password
    assert got == copy.env
    assert not (tmp_path / "ran").exists()


def test_add_user_refuses_a_name_outside_the_safe_alphabet_in_one_line(auth_stack):
    for name in ("../evil", "bob;touch x", "Bob", "-x", "a" * 33, ""):
        out = team_cli(auth_stack, "add-user", name)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, (
            out.stderr
        )
        assert f"user name {name!r} is not allowed: use 1-32 lowercase letters, digits" in out.stderr
    assert not (auth_stack.dir / "evil.env").exists()
    assert not any("evil" in p.name or ";" in p.name for p in auth_stack.path("users").glob("*"))
    assert not any(name.startswith(("../", "bob;")) for name in load(auth_stack.dir).users)


def test_no_file_the_stack_wrote_is_readable_by_group_or_others(auth_stack):
    """Readable by others: group/other read bits on the file, and every folder above it (up to
    the state folder) lets them through. Only the state folder itself is 0711 (PostgreSQL's
    user passes through it)."""
    assert stat.S_IMODE(auth_stack.dir.stat().st_mode) == 0o711
    exposed = []
    for path in auth_stack.dir.rglob("*"):
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o044:
            continue
        parents = [p for p in path.parents if p != auth_stack.dir and auth_stack.dir in p.parents]
        if all(p.stat().st_mode & 0o011 for p in parents):
            exposed.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(auth_stack.dir)}")
    assert exposed == []
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in auth_stack.path("logs").glob("*.log"))


def test_the_local_mlflow_db_is_its_owners_alone(tmp_path):
    import mlflow

    from softmaxlab.tracking.store import use_uri

    use_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.MlflowClient().create_experiment("private")
    assert stat.S_IMODE((tmp_path / "mlflow.db").stat().st_mode) == 0o600


def test_a_version_of_someone_elses_registered_model_is_refused_in_one_line(
    auth_stack, tmp_path, monkeypatch
):
    import mlflow

    # The admin registers the model first, so it is theirs; dave may write his own experiment
    # but not add versions to their model: the run stops in one line and ends FAILED.
    mlflow.set_tracking_uri(auth_stack.mlflow_url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_stack.secrets["admin_password"])
    client = mlflow.MlflowClient()
    client.create_registered_model("admins-model")
    password = sourced(users.add_user(auth_stack, "dave"))["MLFLOW_TRACKING_PASSWORD"]
    creds = {"MLFLOW_TRACKING_USERNAME": "dave", "MLFLOW_TRACKING_PASSWORD": password}
    project = make_project(tmp_path / "proj", *tiny_overrides())
    env = env_with_venv(MLFLOW_TRACKING_URI=auth_stack.mlflow_url, **creds)
    own = ["tracking.experiment=dave-exp", "tracking.registered_model=admins-model"]
    proc = run_cmd([sys.executable, "-m", "softmaxlab", *tiny_overrides(), *own], project, env, check=False)
    out = proc.stdout + proc.stderr
    err = [line for line in out.splitlines() if "may not add a version" in line]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(err) == 1, out
    assert "user dave may not add a version to registered model 'admins-model' (HTTP 403)" in err[0], out
    assert password not in proc.stdout + proc.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("dave-exp").experiment_id])
    assert run.info.status == "FAILED"
    assert client.search_model_versions("name = 'admins-model'") == []


def test_auth_mode_puts_no_credential_in_process_listings_or_logs(auth_stack):
    listing = process_listing()
    assert f"--port {auth_stack.ports['mlflow']}" in listing  # the server is in it
    assert "--app-name basic-auth" in listing
    logs = "".join(p.read_text(errors="replace") for p in auth_stack.path("logs").glob("*.log"))
    for value in secret_values(auth_stack):
        assert value not in listing
        assert value not in logs


@pytest.mark.xdist_group(OWN_TEAM_STACK)
def test_rotate_replaces_the_admin_owner_and_team_secrets(auth_stack, tmp_path, monkeypatch):
    import mlflow
    import sqlalchemy

    old = json.loads(json.dumps(auth_stack.secrets))
    old_env = sourced(auth_stack.path("env"))
    out = team_cli(auth_stack, "rotate")
    assert out.returncode == 0, out.stderr
    new = load(auth_stack.dir)
    # This stack's later tests (same group) go on with the new secrets.
    auth_stack.secrets.clear()
    auth_stack.secrets.update(new.secrets)
    for key in ("admin_password", "pg_password", "team_db_password", "flask_secret_key"):
        assert new.secrets[key] != old[key]
        assert old[key] not in out.stdout + auth_stack.path("env").read_text()
    for uid in ("mlflow", "owner", "team"):
        assert new.secrets["s3"][uid]["access_key"] != old["s3"][uid]["access_key"]
    url = auth_stack.mlflow_url
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search, "admin", old["admin_password"]) == 401
    assert http_status(search, "admin", new.secrets["admin_password"]) == 200
    for old_url in (auth_stack.postgres_url("mlflow").replace(new.secrets["pg_password"], old["pg_password"]),
                    old_env["SOFTMAXLAB_OPTUNA_STORAGE"]):  # fmt: skip
        with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
            sqlalchemy.create_engine(old_url).connect()
    denied = s3_refusal(lambda: s3_as(auth_stack, old_env).list_objects_v2(Bucket=DVC_BUCKET))
    assert denied.startswith("InvalidAccessKeyId")
    # The new ones work: the server (restarted on the new database password and S3 keys) stores
    # a run's artifact; the new `team` key and role reach the DVC bucket and the optuna database.
    env = sourced(auth_stack.path("env"))
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, env[name])
    client = mlflow.MlflowClient(url)
    run = client.create_run(client.create_experiment("after-rotate"))
    (tmp_path / "note.txt").write_text("after rotate")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    mlflow.set_tracking_uri(url)
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/note.txt") == "after rotate"
    s3_as(auth_stack, env).put_object(Bucket=DVC_BUCKET, Key="dvc/after-rotate", Body=b"new")
    sqlalchemy.create_engine(env["SOFTMAXLAB_OPTUNA_STORAGE"]).connect().close()


@pytest.mark.xdist_group(OWN_TEAM_STACK)
def test_stopping_one_service_leaves_the_others_and_up_restarts_only_it(auth_stack):
    before = {name: services.running_pid(auth_stack, name) for name in SERVICES}
    assert stack.stop(auth_stack.dir, "radosgw", say=lambda line: None) == ["radosgw"]
    assert not any(s.answers for s in stack.status(auth_stack.dir) if s.name == "radosgw")
    said = []
    stack.up(auth_stack.dir, ports=auth_stack.ports, say=said.append)
    assert [line.split()[1:3] for line in said[:5]] == [
        ["postgres", "already"], ["ceph-mon", "already"], ["ceph-osd", "already"],
        ["radosgw", "started:"], ["mlflow", "already"],
    ]  # fmt: skip
    after = {name: services.running_pid(auth_stack, name) for name in SERVICES}
    assert {n: p for n, p in after.items() if n != "radosgw"} == {
        n: p for n, p in before.items() if n != "radosgw"
    }
    with pytest.raises(UserError, match="no service 'minio'"):
        stack.stop(auth_stack.dir, "minio")


@pytest.mark.xdist_group(OWN_TEAM_STACK)
def test_down_stops_every_process_and_up_keeps_objects_and_runs(auth_stack):
    admin = ("admin", auth_stack.env["MLFLOW_TRACKING_PASSWORD"])
    create = f"{auth_stack.mlflow_url}/api/2.0/mlflow/experiments/create"
    assert http_status(create, *admin, {"name": "before-restart"}) == 200
    s3 = ceph.s3_client(auth_stack, "team")
    s3.put_object(Bucket=DVC_BUCKET, Key="dvc/files/md5/ab/cdef", Body=b"x" * 100_000)
    pids = {name: services.running_pid(auth_stack, name) for name in SERVICES}
    assert all(pids.values()), pids
    groups = {pid: os.getpgid(pid) for pid in pids.values()}

    stopped = stack.down(auth_stack.dir, say=lambda line: None)
    assert sorted(stopped) == sorted(SERVICES)
    for pid in pids.values():
        assert services.start_ticks(pid) is None  # gone (or a zombie waiting for its parent)
        assert not group_members(groups[pid])
    assert f"-D {postgres.pg_dirs(auth_stack)[0]}" not in process_listing()
    assert all(s.pid is None and not s.answers for s in stack.status(auth_stack.dir))

    said = []
    stack.up(auth_stack.dir, ports=auth_stack.ports, say=said.append)  # no auth= given: the mode sticks
    assert not any("created" in line for line in said)  # the existing cluster and database
    assert "started with basic-auth" in said[4]
    assert http_status(f"{auth_stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    got = ceph.s3_client(auth_stack, "team").get_object(Bucket=DVC_BUCKET, Key="dvc/files/md5/ab/cdef")
    assert got["Body"].read() == b"x" * 100_000
    search = f"{auth_stack.mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=before-restart"
    assert http_status(search, *admin) == 200  # the run store and the auth store (admin) survived too


def test_missing_server_programs_are_one_line_naming_them_and_the_apt_command(tmp_path, monkeypatch):
    from softmaxlab.core.errors import UserError

    monkeypatch.setattr(install, "PG_BIN", tmp_path / "no-postgresql")
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)  # not root: nothing is installed for us
    with pytest.raises(UserError) as err:
        install.ensure_installed()
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "no-postgresql" / "initdb") in message
    assert f"apt-get install --no-install-recommends {install.APT_PACKAGES}" in message
