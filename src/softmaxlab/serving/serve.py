"""`softmaxlab serve [--port 5001] [--version N]` (`make serve`): the registered model's
champion (or one version) behind MLflow's scoring server, on 127.0.0.1 only.

It runs `mlflow models serve --env-manager local` in place of this process (exec: Ctrl-C and
a kill by PID reach the server itself), against the project's tracking store, with this
environment's bin directory first on PATH: MLflow starts `uvicorn` from PATH, so the server
starts even from a shell where .venv is not activated. The alias is resolved once, when the
server starts: after `softmaxlab promote` moves it, restart the server.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from softmaxlab.core.errors import UserError
from softmaxlab.serving.promote import ALIAS, open_store

HOST = "127.0.0.1"


def example_rows(cfg, root: Path) -> list[list[float]]:
    """Two rows of real inputs: the first two test points, or two class centres before any
    data has been generated here."""
    import pandas as pd

    from softmaxlab.core.io import FEATURES

    test = root / cfg.paths.test_data
    if test.is_file():
        return pd.read_parquet(test)[list(FEATURES)].iloc[:2].to_numpy().round(4).tolist()
    return [list(c) for c in cfg.data.centers[:2]]


def curl_command(port: int, rows: list[list[float]]) -> str:
    from softmaxlab.core.io import FEATURES

    payload = json.dumps({"dataframe_split": {"columns": list(FEATURES), "data": rows}})
    return (
        f"curl -s http://{HOST}:{port}/invocations -H 'Content-Type: application/json' "
        f"-d {shlex.quote(payload)}"
    )


def resolve(client, name: str, version: int | None):
    """The model version to serve, or a one-line UserError saying what to do first."""
    from mlflow.exceptions import MlflowException

    try:
        if version is None:
            return client.get_model_version_by_alias(name, ALIAS)
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if version is None:
            raise UserError(
                f"registered model {name!r} has no {ALIAS} in this tracking store: "
                "run the pipeline (`make run`), then `softmaxlab promote`"
            ) from err
        raise UserError(f"registered model {name!r} has no version {version}") from err


def serve_cli(args: list[str]) -> None:
    from softmaxlab.core.config import load_params, project_root
    from softmaxlab.tracking.server import redact

    parser = argparse.ArgumentParser(prog="softmaxlab serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5001, help="port on 127.0.0.1 (default 5001)")
    parser.add_argument("--version", type=int, help=f"serve this version instead of the {ALIAS}")
    opts = parser.parse_args(args)
    if not 1 <= opts.port <= 65535:
        raise UserError(f"--port={opts.port} is not allowed: must be in [1, 65535]")
    root = project_root()
    cfg = load_params(root / "params.yaml")
    name = cfg.tracking.registered_model
    client, uri = open_store(cfg)
    version = resolve(client, name, opts.version)
    model_uri = f"models:/{name}/{version.version}" if opts.version else f"models:/{name}@{ALIAS}"
    print(
        f"serving {model_uri} (version {version.version}, run {version.run_id}) from {redact(uri)}\n"
        f"  URL:  http://{HOST}:{opts.port}/invocations  (ready once the server logs 'Application startup complete')\n"
        f"  try:  {curl_command(opts.port, example_rows(cfg, root))}",
        flush=True,
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model file
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", HOST, "--port", str(opts.port)]  # fmt: skip
    os.execve(sys.executable, cmd, env)
