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
never their command lines: `ps` shows no password or key. Everything the stack writes is its
owner's alone (umask 077 while it runs; the state folder itself 0711 so PostgreSQL's user can
pass through).

API (what other modules and the tests call):

    state = stack.up(state_dir, ports=None, auth=False, project=None)   # start what is not running
    stack.down(state_dir)                 # stop our processes (by PID/process group); data stays
    stack.stop(state_dir, "radosgw")      # stop some (fault tests); a later stack.up restarts them
    stack.status(state_dir)               # [Service(name, url, pid, answers, rss_mb)]
    state = team.state.load(state_dir)    # a stack created before; state.env: .team/env's variables
    state.postgres_url("mlflow")          # the owner's SQLAlchemy URL: postgresql+psycopg2://softmaxlab:…@127.0.0.1:P/mlflow
    users.add_user(state, "alice", "EDIT") -> join file;  users.grant(state, "alice", "softmaxlab", "EDIT")
    users.remove_user(state, "alice");  stack.rotate(state_dir)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from softmaxlab.core.errors import UserError
from softmaxlab.core.processes import stop_group
from softmaxlab.team import ceph, mlflow_server, postgres
from softmaxlab.team.install import ensure_installed
from softmaxlab.team.services import http_answers, port_open, rss_mb, running_pid
from softmaxlab.team.state import (
    ADMIN,
    DB_ROLE,
    HOST,
    OWNER,
    SERVICES,
    TEAM,
    State,
    default_dir,
    load,
    locked,
    resolve_ports,
    write_env,
)
from softmaxlab.team.users import configure_dvc, set_admin_password


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
    with locked(d), private_files(d):
        return _up(d, ports, auth, project, say, started)


@contextlib.contextmanager
def private_files(d: Path):
    """Files and folders this process and the servers it starts create are their owner's alone
    (umask 077, put back afterwards); files an older stack left readable are made so too.
    PostgreSQL's own files are its own (mode 0600/0700 by initdb and pg_ctl)."""
    old = os.umask(0o077)
    try:
        for path in d.rglob("*"):
            with contextlib.suppress(OSError):
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
        yield
    finally:
        os.umask(old)


def _up(d: Path, ports, auth, project, say, started: float) -> State:
    saved = json.loads((d / "state.json").read_text()) if (d / "state.json").is_file() else {}
    old = load(d) if saved else None
    auth = saved.get("auth", False) if auth is None else auth
    state = State(
        d, resolve_ports(saved.get("ports"), ports), auth, saved.get("ceph", {}), old.secrets if old else {}
    )

    state.secrets.setdefault("pg_password", secrets.token_urlsafe(24))
    state.secrets.setdefault("team_db_password", secrets.token_urlsafe(24))
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
        postgres.roles_and_databases(state)
        report("postgres", "already running", f"{HOST}:{state.ports['postgres']}")
    else:
        report("postgres", postgres.start(state), f"{HOST}:{state.ports['postgres']}")
    urls = {"ceph-mon": f"v1:{HOST}:{state.ports['ceph_mon']}", "ceph-osd": "osd.0 (BlueStore)",
            "radosgw": state.s3_url}  # fmt: skip
    ceph.start(state, lambda name, what: report(name, what, urls[name]))
    if any(uid not in state.secrets.get("s3", {}) for uid in ("mlflow", OWNER, TEAM)):
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


def rotate(state_dir: Path | None = None) -> str:
    """New secrets for the stack's own identities: the MLflow admin's password (through MLflow,
    which keeps it), the owner's database password, the `team` role's, the S3 keys of `mlflow`,
    `owner` and `team`, the server's CSRF key; the MLflow server restarts on them and .team/env
    is rewritten. Teammates' own keys stay (remove-user and add-user replace one's)."""
    d = Path(state_dir or default_dir()).resolve()
    with locked(d), private_files(d):
        state = load(d)
        if running_pid(state, "mlflow") is None or not postgres.answers(state):
            raise UserError("the team stack is not running: `softmaxlab team up` first")
        if state.auth and state.secrets.get("admin_created"):
            state.secrets["admin_password"] = set_admin_password(state, secrets.token_urlsafe(18))
        else:  # MLflow has no admin yet: it takes this one on its first start with basic-auth
            state.secrets["admin_password"] = secrets.token_urlsafe(18)
        state.save()
        for role, key in ((DB_ROLE, "pg_password"), (TEAM, "team_db_password")):
            state.secrets[key] = secrets.token_urlsafe(24)
            postgres.set_password(state, role, state.secrets[key])
            state.save()
        for uid in ("mlflow", OWNER, TEAM):
            state.secrets["s3"][uid] = ceph.new_keys(state, uid)
            state.save()
        state.secrets["flask_secret_key"] = secrets.token_urlsafe(32)
        state.save()
        mlflow_server.start(state, restart=True)
        write_env(state)
    return (
        f"new secrets for the MLflow {ADMIN}, database roles {DB_ROLE} and {TEAM}, S3 users mlflow, "
        f"{OWNER} and {TEAM}; the MLflow server restarted; {state.path('env')} rewritten"
    )


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
