"""The team stack's own servers accept only those who should reach them, and `team up` does only
what it is asked (issue 22 items 4 and 5): Ceph with cephx on, keyrings 0600; no system package
installed unless asked."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import VENV_BIN, env_with_venv, run_cmd

from softmaxlab.team import ceph, install
from softmaxlab.team.state import DVC_BUCKET

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
    s3.delete_object(Bucket=DVC_BUCKET, Key="security/cephx")


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
