"""The team's services as one stack: `softmaxlab team up|down|status` (`make team-up`,
`team-down`, `team-status`) start, stop and report on them, each a real server process on
127.0.0.1, all state under one git-ignored folder (`.team/` at the project root, or
`SOFTMAXLAB_TEAM_DIR`):

- PostgreSQL 15 (team/postgres.py): databases `mlflow`, `mlflow_auth` and `optuna`;
- Ceph radosgw, an S3 server (team/ceph.py): buckets `softmaxlab-mlflow` and `softmaxlab-dvc`
  (the DVC remote);
- the MLflow tracking server on them (team/mlflow_server.py), optionally behind MLflow's
  basic-auth app (`--auth`), its users in team/users.py.

Secrets reach the servers through their environment or files under `.team/` (mode 0600),
never their command lines: `ps` shows no password or key.

API (what other modules and the tests call):

    state = stack.up(state_dir, ports=None, auth=False, project=None)   # start what is not running
    stack.down(state_dir)                 # stop our processes (by PID/process group); data stays
    stack.stop(state_dir, "radosgw")      # stop some (fault tests); a later stack.up restarts them
    stack.status(state_dir)               # [Service(name, url, pid, answers, rss_mb)]
    state = team.state.load(state_dir)    # a stack created before; state.env: .team/env's variables
    state.postgres_url("optuna")          # SQLAlchemy URL: postgresql+psycopg2://softmaxlab:…@127.0.0.1:P/optuna
    users.add_user(state, "alice") -> password;  users.grant(state, "alice", "softmaxlab", "EDIT")
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from softmaxlab.core.errors import UserError
from softmaxlab.core.processes import stop_group
from softmaxlab.team import ceph, mlflow_server, postgres
from softmaxlab.team.install import ensure_installed
from softmaxlab.team.services import http_answers, port_open, rss_mb, running_pid
from softmaxlab.team.state import HOST, SERVICES, State, default_dir, load, resolve_ports, write_env
from softmaxlab.team.users import configure_dvc


def up(
    state_dir: Path | None = None,
    ports: dict[str, int] | None = None,
    auth: bool | None = None,
    project: Path | None = None,
    say=None,
) -> State:
    """Start every service that does not run yet (creating what does not exist), write
    .team/env, and (given `project`) set that clone's DVC remote. Returns the state.
    `auth`: True puts basic-auth in front of MLflow, False takes it away; None keeps the mode
    the stack had (off for a new one), so a plain `team up` never opens an auth-mode server."""
    started = time.monotonic()
    say = say or (lambda line: print(line, flush=True))
    d = Path(state_dir or default_dir()).resolve()
    ensure_installed()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o711)  # PostgreSQL's user must pass through to pg/; nothing else is readable
    saved = json.loads((d / "state.json").read_text()) if (d / "state.json").is_file() else {}
    old = load(d) if saved else None
    auth = saved.get("auth", False) if auth is None else auth
    state = State(
        d, resolve_ports(saved.get("ports"), ports), auth, saved.get("ceph", {}), old.secrets if old else {}
    )

    state.secrets.setdefault("pg_password", secrets.token_urlsafe(24))
    # MLflow creates the admin with this password on its first start with basic-auth and
    # ignores the setting afterwards: the environment's value counts only until then.
    admin_password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    if admin_password and not state.secrets.get("admin_created"):
        state.secrets["admin_password"] = admin_password
    elif admin_password and admin_password != state.secrets["admin_password"]:
        say("team: note: MLFLOW_AUTH_ADMIN_PASSWORD is not the admin's password, which MLflow set at its "
            "first start and keeps (.team/secrets.json); change it with MLflow's update-password API")  # fmt: skip
    state.secrets.setdefault("admin_password", secrets.token_urlsafe(18))
    state.secrets.setdefault("flask_secret_key", secrets.token_urlsafe(32))
    state.save()

    clock = [time.monotonic()]

    def report(name: str, what: str, url: str) -> None:
        now = time.monotonic()
        took = f" ({now - clock[0]:.1f} s)" if not what.startswith("already") else ""
        clock[0] = now
        say(f"team: {name:<9} {what}: {url}{took}")

    if running_pid(state, "postgres") and postgres.answers(state):
        report("postgres", "already running", f"{HOST}:{state.ports['postgres']}")
    else:
        report("postgres", postgres.start(state), f"{HOST}:{state.ports['postgres']}")
    urls = {"ceph-mon": f"v1:{HOST}:{state.ports['ceph_mon']}", "ceph-osd": "osd.0 (BlueStore)",
            "radosgw": state.s3_url}  # fmt: skip
    ceph.start(state, lambda name, what: report(name, what, urls[name]))
    if "s3" not in state.secrets or "team" not in state.secrets["s3"]:
        ceph.s3_users_and_buckets(state, state.path("ceph", "ceph.conf"))
    report("mlflow", mlflow_server.start(state), state.mlflow_url)
    if auth and not state.secrets.get("admin_created"):
        state.secrets["admin_created"] = True
        state.save()
    env_file = write_env(state)
    if project is not None and (project / ".dvc").is_dir():
        say(f"team: {configure_dvc(project, state.env)}")
    say(f"team: up in {time.monotonic() - started:.1f} s; `source {env_file}` to use it")
    return state


def stop(state_dir: Path | None, *names: str, say=print) -> list[str]:
    """Stop some of our services (names from SERVICES), newest first, by PID and their own
    process groups; their data stays. `up` starts them again (the fault tests stop one)."""
    state = load(state_dir)
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise UserError(f"no service {unknown[0]!r}: choose from {', '.join(SERVICES)}")
    stopped = []
    for name in reversed(SERVICES):
        if name not in names:
            continue
        pid = running_pid(state, name)
        if name == "postgres":
            if pid or postgres.answers(state) and (postgres.pg_dirs(state)[0] / "postmaster.pid").exists():
                postgres.stop(state)
        elif pid:
            stop_group(pid)
        if pid:
            stopped.append(name)
        say(f"team: {name:<9} {f'stopped (pid {pid})' if pid else 'was not running'}")
        with contextlib.suppress(FileNotFoundError):
            state.path("pids", f"{name}.pid").unlink()
    return stopped


def down(state_dir: Path | None = None, say=print) -> list[str]:
    """Stop all our processes (by PID and their own process groups); the data stays."""
    stopped = stop(state_dir, *SERVICES, say=say)
    say(f"team: data kept in {load(state_dir).dir}")
    return stopped


@dataclass
class Service:
    name: str
    url: str
    pid: int | None
    answers: bool
    rss_mb: float


def status(state_dir: Path | None = None) -> list[Service]:
    state = load(state_dir)
    conf = state.path("ceph", "ceph.conf")
    checks = {
        "postgres": (f"postgresql://{HOST}:{state.ports['postgres']}", lambda: postgres.answers(state)),
        "ceph-mon": (f"v1:{HOST}:{state.ports['ceph_mon']}", lambda: port_open(state.ports["ceph_mon"])),
        "ceph-osd": ("osd.0 (BlueStore)", lambda: ceph.osd_up(conf)),
        "radosgw": (state.s3_url, lambda: http_answers(state.s3_url)),
        "mlflow": (
            state.mlflow_url + (" (basic-auth)" if state.auth else ""),
            lambda: mlflow_server.health(state),
        ),
    }
    out = []
    for name in SERVICES:
        url, answers = checks[name]
        pid = running_pid(state, name)
        out.append(Service(name, url, pid, bool(pid) and answers(), rss_mb(pid)))
    return out
