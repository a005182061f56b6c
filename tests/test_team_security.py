"""`team up` does only what it is asked (issue 22 item 5): no system package installed unless
asked."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import VENV_BIN, env_with_venv, run_cmd

from softmaxlab.team import install

pytestmark = [pytest.mark.team]


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
