"""`make ui` (`softmaxlab ui`): "starting…", then the runs table's link once the UI answers."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ctrl_c_reaches_it, env_with_venv, make_project, tiny_overrides

from softmaxlab.core.processes import free_port, stop_group

pytestmark = pytest.mark.slow


def group_commands(pgid: int) -> list[str]:
    """The command lines of the processes in process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def test_ui_says_starting_then_prints_the_runs_link_once_it_answers(tmp_path):
    import mlflow

    project = make_project(tmp_path / "proj", *tiny_overrides())
    port = free_port()
    # Its own process group: the teardown stops it and the `mlflow ui` it started, whatever happens.
    proc = subprocess.Popen([sys.executable, "-m", "softmaxlab", "ui", str(port)], cwd=project,
                            env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_reaches_it, start_new_session=True)  # fmt: skip
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"MLflow UI: starting on http://127.0.0.1:{port}"), first
        ready = proc.stdout.readline()
        # Printed only after the server answered: the link works the moment it appears.
        match = re.search(
            rf"http://127\.0\.0\.1:{port}/#/experiments/(\d+)/runs\?workflowType=machine_learning", ready
        )
        assert ready.startswith("MLflow UI ready: ") and match, ready
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        exp = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_experiment_by_name(
            "softmaxlab"
        )
        assert match.group(1) == exp.experiment_id
        # MLflow's job runner and its Huey consumers (seven processes importing MLflow) are off.
        assert not [c for c in group_commands(proc.pid) if "mlflow.server.jobs" in c or "huey" in c]
    finally:
        # Ctrl-C, as a terminal sends it to the foreground group; killed after 60 s if it hangs.
        stopped, out, err = stop_group(proc, signal.SIGINT, timeout=60)
    assert stopped, f"softmaxlab ui did not stop on Ctrl-C within 60 s\n{out}\n{err}"
    assert "Look at the runs" not in out + err
    assert "Traceback" not in err, err
    log = (project / "outputs" / "mlflow-ui.log").read_text()
    assert "Uvicorn running" in log and "DeprecationWarning" not in log, log


def test_ui_refuses_a_bad_port_argument(tmp_path):
    project = make_project(tmp_path / "proj")
    proc = subprocess.run([sys.executable, "-m", "softmaxlab", "ui", "nope"], cwd=project, env=env_with_venv(),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == "softmaxlab: error: usage: softmaxlab ui [PORT]"
