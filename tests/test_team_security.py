"""The team stack's own servers accept only those who should reach them, and `team up` does only
what it is asked (issue 22 items 4, 5 and 6): Ceph with cephx on, keyrings 0600; no system
package installed unless asked; a clone in a private (0700) folder brings the stack up."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import OWN_TEAM_STACK, VENV_BIN, env_with_venv, make_project, run_cmd

from softmaxlab.core.processes import free_port
from softmaxlab.team import ceph, install, postgres, stack
from softmaxlab.team.state import DEFAULT_PORTS, DVC_BUCKET, OWNER, load, port_variable

pytestmark = [pytest.mark.team]


def ceph_cmd(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ceph", "-c", str(conf), "--connect-timeout", "15", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def last_line(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]


@pytest.mark.slow
def test_ceph_monitor_refuses_clients_without_the_keyring_and_s3_still_works(team_stack, tmp_path):
    conf = team_stack.path("ceph", "ceph.conf")
    assert "auth_client_required = cephx" in conf.read_text()
    # Each key is its owner's only: keyrings 0600 in a folder only the stack's user may enter.
    keyrings = [ceph.admin_keyring(team_stack), *team_stack.path("ceph").glob("*/*/keyring"),
                team_stack.path("ceph", "rgw", "keyring")]  # fmt: skip
    assert {k.parent.name for k in keyrings} >= {"ceph", "ceph-a", "ceph-0", "rgw"}
    for path in keyrings:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(team_stack.path("ceph").stat().st_mode) == 0o700

    # The stack's own client (client.admin's keyring, named in ceph.conf) gets in...
    assert ceph_cmd(conf, "mon", "stat").returncode == 0
    # ...a client with no key (cephx off on its side, what any user without the keyring has)
    # is refused by the monitor, and so is one with a key the monitor never issued.
    no_key = ceph_cmd(conf, "--auth-client-required", "none", "mon", "stat")
    assert no_key.returncode != 0, no_key.stdout
    assert "error connecting to the cluster" in last_line(no_key)
    forged = tmp_path / "forged.keyring"
    subprocess.run(["ceph-authtool", "--create-keyring", str(forged), "--gen-key", "-n", "client.admin"],
                   check=True, capture_output=True)  # fmt: skip
    wrong_key = ceph_cmd(conf, "--keyring", str(forged), "mon", "stat")
    assert wrong_key.returncode != 0, wrong_key.stdout
    assert last_line(wrong_key) == "[errno 13] RADOS permission denied (error connecting to the cluster)"

    # S3 through radosgw (which authenticates to the cluster with its own key) works.
    s3 = ceph.s3_client(team_stack, "team")
    s3.put_object(Bucket=DVC_BUCKET, Key="security/cephx", Body=b"through radosgw")
    assert s3.get_object(Bucket=DVC_BUCKET, Key="security/cephx")["Body"].read() == b"through radosgw"
    # Cleaned up as the bucket's owner: the `team` key may not delete (its bucket policy).
    ceph.s3_client(team_stack, OWNER).delete_object(Bucket=DVC_BUCKET, Key="security/cephx")


def test_team_up_installs_no_system_package_unless_asked(tmp_path):
    """Debian's packages missing: `team up` installs nothing (not even as root) and says, in one
    line, the command that installs them; `python -m softmaxlab.team.install` (make
    team-install) is how to ask. apt-get here is a stand-in that records its arguments: the
    test must not install anything on the machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-get-calls"
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "apt-get").chmod(0o755)
    # Neither PostgreSQL's programs nor Ceph's on this PATH: the venv's and the stand-in only.
    env = env_with_venv(
        PATH=f"{bin_dir}{os.pathsep}{VENV_BIN}",
        SOFTMAXLAB_PG_BIN=str(tmp_path / "no-postgresql"),
        SOFTMAXLAB_TEAM_DIR=str(tmp_path / "team"),
    )
    up = run_cmd([str(VENV_BIN / "softmaxlab"), "team", "up"], tmp_path, env, check=False)
    assert up.returncode == 2, up.stderr
    assert up.stderr.count("\n") == 1 and "Traceback" not in up.stderr
    assert "missing " in up.stderr and "ceph-mon" in up.stderr
    assert f"`apt-get install --no-install-recommends {install.APT_PACKAGES}`" in up.stderr
    assert not calls.exists(), f"team up ran apt-get {calls.read_text()}"
    assert not (tmp_path / "team").exists()  # nothing half-made

    asked = run_cmd([sys.executable, "-m", "softmaxlab.team.install"], tmp_path, env, check=False)
    assert asked.returncode == 2 and asked.stderr.count("\n") == 1, asked.stderr
    if os.geteuid() == 0:  # asked, as root: apt-get installs them (here: the stand-in is called)
        assert f"install -y -qq --no-install-recommends {install.APT_PACKAGES}" in calls.read_text()
        assert "missing " in asked.stderr  # the stand-in installed nothing, so it still says so
    else:
        assert "needs root" in asked.stderr and not calls.exists()


@pytest.mark.slow
@pytest.mark.xdist_group(OWN_TEAM_STACK)
def test_team_up_from_a_clone_in_a_private_folder(tmp_path):
    """`softmaxlab team up` in a clone under a `mktemp -d` folder (0700): as root PostgreSQL runs
    as user postgres, which cannot enter it; its files go to a folder of its own instead."""
    missing = install.missing_programs()
    if missing and os.environ.get("CI") != "true":
        pytest.skip(f"team services need {', '.join(missing)}")
    private = Path(tempfile.mkdtemp(prefix="softmaxlab-private-"))
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    clone = make_project(private / "clone")
    ports = {port_variable(name): str(free_port()) for name in DEFAULT_PORTS}
    env = env_with_venv(**ports)
    env.pop("SOFTMAXLAB_TEAM_DIR", None)  # the clone's own .team/
    state_dir = clone / ".team"
    pg_home = None
    try:
        up = run_cmd(["softmaxlab", "team", "up"], clone, env, check=False)
        assert up.returncode == 0, up.stderr
        assert "team: up in" in up.stdout
        state = load(state_dir)
        assert all(s.answers for s in stack.status(state_dir)), stack.status(state_dir)
        data = postgres.pg_dirs(state)[0]
        pg_home = data.parent
        assert (data / "PG_VERSION").exists()
        if os.geteuid() == 0:
            # Outside the private folder, owned by postgres, 0700, and recorded in the state.
            assert private not in pg_home.parents
            assert state.path("pg").is_symlink() and state.path("pg").resolve() == pg_home
            assert pg_home.owner() == "postgres" and stat.S_IMODE(pg_home.stat().st_mode) == 0o700
        # The databases answer through the MLflow server: it created its tables there.
        import sqlalchemy

        engine = sqlalchemy.create_engine(state.postgres_url("mlflow"))
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT count(*) FROM experiments")).scalar() >= 1
        engine.dispose()
        down = run_cmd(["softmaxlab", "team", "down"], clone, env, check=False)
        assert down.returncode == 0, down.stderr
        assert (data / "PG_VERSION").exists()  # `team down` keeps PostgreSQL's data, as the rest
    finally:
        if (state_dir / "state.json").exists():
            stack.down(state_dir, say=lambda line: None)
            postgres.remove_data(load(state_dir))
        shutil.rmtree(private, ignore_errors=True)
    assert pg_home is not None and not pg_home.exists()  # the throwaway stack left nothing behind
