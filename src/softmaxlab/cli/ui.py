"""`softmaxlab ui [PORT]` (`make ui`): MLflow's UI on 127.0.0.1, and the runs table's link
once it answers.

`mlflow ui` takes seconds to start and prints its own start-up chatter (and, with the pinned
Starlette, four deprecation warnings from MLflow's imports). Here the server's output goes to
outputs/mlflow-ui.log; the terminal gets "starting…", then the link once /health answers,
or the log's last lines if the server gave up.

With a tracking server (MLFLOW_TRACKING_URI or tracking.uri is http(s), e.g. the team's from
`source .team/env`), that server is the UI: no local one starts, the link points there.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from softmaxlab.core.errors import UserError, first_line
from softmaxlab.core.probe import answers_ok

HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# MLflow's fastapi app imports starlette.middleware.wsgi, which this Starlette deprecates:
# not ours to fix, and nothing a user can act on.
HIDE_WARNINGS = "ignore:starlette.middleware.wsgi is deprecated"


def _last_line(log: Path) -> str:
    lines = [s.strip() for s in log.read_text().splitlines() if s.strip()]
    return f"{lines[-1] if lines else 'no output'} (full log: {log})"


def remote_link(uri: str, experiment: str) -> str:
    """The runs table's link on the tracking server at `uri`, or a one-line UserError saying
    why it cannot be opened (not answering; credentials refused, naming the variables)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from softmaxlab.tracking.server import reachable, redact, refusal
    from softmaxlab.tracking.store import runs_table_url

    why = reachable(uri)
    if why:
        raise UserError(
            f"the tracking server {redact(uri)} (MLFLOW_TRACKING_URI or tracking.uri) does not "
            f"answer ({why}): start it (`make team-up`), or unset MLFLOW_TRACKING_URI for the local store"
        )
    try:
        exp = MlflowClient(uri).get_experiment_by_name(experiment)
    except MlflowException as err:
        if refusal(err):
            raise UserError(
                f"the tracking server {redact(uri)} refused the credentials: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (`source .team/env`, or your user's)"
            ) from None
        raise UserError(f"the tracking server {redact(uri)}: {first_line(err)}") from None
    base = redact(uri).rstrip("/")
    return runs_table_url(exp.experiment_id, base) if exp else f"{base}/#/experiments"


def serve(port: int = DEFAULT_PORT, log: Path | None = None) -> int:
    """Start `mlflow ui` on the project's store, print the link once it answers, and wait
    for it (Ctrl-C stops it). Returns the server's exit code."""
    from softmaxlab.core.config import load_params, project_root
    from softmaxlab.tracking.store import ensure_experiment, resolve_uri, runs_table_url

    root = project_root()
    cfg = load_params(root / "params.yaml")
    remote = resolve_uri(cfg)
    if remote.startswith(("http://", "https://")):
        link = remote_link(remote, cfg.tracking.experiment)
        print(f"MLflow UI: the tracking server is the UI (MLFLOW_TRACKING_URI): {link}", flush=True)
        return 0
    store = f"sqlite:///{root / 'mlflow.db'}"
    log = log or root / "outputs" / "mlflow-ui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "ui", "--host", HOST, "--port", str(port), "--workers", "1",
           "--backend-store-uri", store]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": HIDE_WARNINGS}
    # MLflow 3's server also starts a job runner and seven Huey consumer processes for its
    # GenAI jobs (none here), each importing MLflow: seconds of CPU at every start, and
    # processes that outlive a Ctrl-C by a minute on a loaded machine. Unless asked for, off.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow UI: starting on http://{HOST}:{port} … (server log: {log})", flush=True)
    import mlflow  # noqa: F401  (configures MLflow's loggers, which the next line overrides)

    # A fresh store's "Creating initial MLflow database tables" lines say nothing useful here.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # The experiment must exist for the link to name it; a fresh clone has no store yet.
    experiment_id = ensure_experiment(store, cfg.tracking.experiment)
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        while not answers_ok(f"http://{HOST}:{port}/health", timeout=2):
            if server.poll() is not None:
                raise UserError(
                    f"mlflow ui stopped (exit code {server.returncode}) before answering: {_last_line(log)}"
                )
            time.sleep(0.5)
        if server.poll() is not None:  # something else answers on that port
            raise UserError(f"port {port} is taken: {_last_line(log)}; try `softmaxlab ui {port + 1}`")
        print(f"MLflow UI ready: {runs_table_url(experiment_id, f'http://{HOST}:{port}')}", flush=True)
        print("(Ctrl-C stops it)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def ui_cli(args: list[str]) -> None:
    if len(args) > 1 or (args and not args[0].isdigit()):
        raise UserError("usage: softmaxlab ui [PORT]")
    sys.exit(serve(int(args[0]) if args else DEFAULT_PORT))
