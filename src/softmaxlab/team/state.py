"""What `softmaxlab team up` keeps under its state folder (`.team/` at the project root, or
`SOFTMAXLAB_TEAM_DIR`): the ports, the Ceph cluster's ids and the teammates' names and levels
(state.json), the generated secrets (secrets.json), and the env files people source: `.team/env`
(whoever runs the stack) and `.team/users/NAME.env` (one teammate's join file). Every file here
is its owner's alone (0600). The names every other team module shares (host, buckets, the
database roles, the services) are here too."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from softmaxlab.core.errors import UserError
from softmaxlab.core.private import write_private

HOST = "127.0.0.1"
# Fixed defaults, so a teammate's .team/env stays the same from one `team up` to the next;
# SOFTMAXLAB_TEAM_<NAME>_PORT overrides each (the tests pick free ports).
DEFAULT_PORTS = {"postgres": 15432, "ceph_mon": 16789, "s3": 17480, "mlflow": 15000}
# The database roles: the owner of the three databases (the MLflow server's; its password never
# leaves secrets.json and the server's own configuration), a group that may use the `optuna`
# database and no other (the `team` role and each EDIT teammate's role are its members).
DB_ROLE = "softmaxlab"
OPTUNA_GROUP = "optuna_users"
DATABASES = ("mlflow", "mlflow_auth", "optuna")
MLFLOW_BUCKET = "softmaxlab-mlflow"
DVC_BUCKET = "softmaxlab-dvc"
DVC_REMOTE_NAME = "team"
DVC_REMOTE_URL = f"s3://{DVC_BUCKET}/dvc"
REGION = "us-east-1"  # radosgw's default zonegroup accepts it; boto3 wants one
ADMIN = "admin"
# The shared identity of a stack without basic-auth (and of whoever runs it): S3 user and
# database role `team`, which may use the DVC bucket and the `optuna` database only.
TEAM = "team"
# The S3 user that owns the DVC bucket and writes its policy: its keys stay in secrets.json.
OWNER = "owner"
# What a teammate may do (`team add-user NAME [READ|EDIT]`): READ reads runs and pulls data;
# EDIT also logs runs, pushes data and gets an Optuna storage.
LEVELS = ("READ", "EDIT")
# A teammate's name goes into a path, an S3 user id, a database role and an export line.
NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
SERVICES = ("postgres", "ceph-mon", "ceph-osd", "radosgw", "mlflow")


def port_variable(name: str) -> str:
    return f"SOFTMAXLAB_TEAM_{name.upper()}_PORT"


def default_dir() -> Path:
    if os.environ.get("SOFTMAXLAB_TEAM_DIR"):
        return Path(os.environ["SOFTMAXLAB_TEAM_DIR"]).resolve()
    from softmaxlab.core.config import project_root

    return project_root() / ".team"


@dataclass
class State:
    """What `team up` created: ports, secrets and the Ceph cluster's ids, kept in state.json and
    secrets.json (0600) under `dir`."""

    dir: Path
    ports: dict[str, int]
    auth: bool = False
    ceph: dict = field(default_factory=dict)
    secrets: dict = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)  # name -> READ or EDIT

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def postgres_url(self, db: str) -> str:
        return postgres_url(self, db)

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """.team/env's variables: the server, and the `team` identity (its S3 keys for the DVC
        bucket, its role for the `optuna` database); with basic-auth also the MLflow admin's
        login, which makes the file the admin's alone (teammates get `add-user`'s files)."""
        env = self.join_env(
            TEAM, self.secrets.get("s3", {}).get(TEAM, {}), self.secrets.get("team_db_password")
        )
        if self.auth:
            env["MLFLOW_TRACKING_USERNAME"] = ADMIN
            env["MLFLOW_TRACKING_PASSWORD"] = self.secrets["admin_password"]
        return env

    def join_env(self, role: str, s3: dict, db_password: str | None) -> dict[str, str]:
        """What one identity needs to reach the stack: the server, its S3 keys (the DVC bucket)
        and, given a database password, an Optuna storage URL as database role `role`."""
        env = {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "AWS_ACCESS_KEY_ID": s3.get("access_key", ""),
            "AWS_SECRET_ACCESS_KEY": s3.get("secret_key", ""),
            "AWS_ENDPOINT_URL": self.s3_url,
            "AWS_DEFAULT_REGION": REGION,
            "SOFTMAXLAB_DVC_REMOTE": DVC_REMOTE_URL,
        }
        if db_password:
            # Optuna's shared studies talk to the database directly (RDB storage).
            env["SOFTMAXLAB_OPTUNA_STORAGE"] = role_url(self, role, db_password, "optuna")
        return env

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        public = {"ports": self.ports, "auth": self.auth, "ceph": self.ceph, "users": self.users}
        write_private(self.dir / "state.json", json.dumps(public, indent=2) + "\n")
        write_private(self.dir / "secrets.json", json.dumps(self.secrets, indent=2) + "\n")


def postgres_url(state: State, db: str) -> str:
    """SQLAlchemy URL of one of the stack's databases as their owner (the MLflow server's)."""
    return role_url(state, DB_ROLE, state.secrets["pg_password"], db)


def role_url(state: State, role: str, password: str, db: str) -> str:
    """SQLAlchemy URL of database `db` as `role` (psycopg2: SQLAlchemy 2 reads a plain
    postgresql:// as psycopg 3). Roles and generated passwords need no escaping: names match
    NAME, passwords are URL-safe tokens."""
    return f"postgresql+psycopg2://{role}:{password}@{HOST}:{state.ports['postgres']}/{db}"


def user_role(name: str) -> str:
    """Teammate `name`'s S3 user id and database role: apart from the stack's own
    (`mlflow`, `team`, `softmaxlab`, `postgres`), whatever the name."""
    return f"user-{name}"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UserError(
            f"user name {name!r} is not allowed: use 1-32 lowercase letters, digits, '-' or '_', "
            "starting with a letter"
        )
    return name


@contextlib.contextmanager
def locked(state_dir: Path):
    """One command at a time changes the state (`team up`, add-user, remove-user, rotate): each
    reads state.json and secrets.json, changes them and writes them back."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load(state_dir: Path | None = None) -> State:
    d = Path(state_dir or default_dir())
    if not (d / "state.json").is_file():
        raise UserError(f"no team services in {d}: start them with `make team-up` (softmaxlab team up)")
    public = json.loads((d / "state.json").read_text())
    private = json.loads((d / "secrets.json").read_text()) if (d / "secrets.json").is_file() else {}
    return State(
        d,
        public["ports"],
        public.get("auth", False),
        public.get("ceph", {}),
        private,
        public.get("users", {}),
    )


def resolve_ports(saved: dict | None, requested: dict | None) -> dict[str, int]:
    ports = {}
    for name, default in DEFAULT_PORTS.items():
        value = (requested or {}).get(name) or os.environ.get(port_variable(name)) or (saved or {}).get(name)
        try:
            ports[name] = int(value or default)
        except ValueError:
            raise UserError(f"{port_variable(name)}={value} is not allowed: must be a port number") from None
        if not 1024 <= ports[name] <= 65535:
            raise UserError(f"{port_variable(name)}={ports[name]} is not allowed: must be in [1024, 65535]")
    return ports


def write_env_file(path: Path, variables: dict[str, str], header: list[str]) -> Path:
    """`export K=V` lines a shell sources, each value shell-quoted (a password may hold any
    character), in a file only its owner can read."""
    lines = [f"# {line}" for line in header] + [f"export {k}={shlex.quote(v)}" for k, v in variables.items()]
    write_private(path, "\n".join(lines) + "\n")
    return path


def write_env(state: State) -> Path:
    if state.auth:
        header = [
            "The team stack's admin (`softmaxlab team up --auth`): the MLflow admin's login and the",
            "`team` S3 keys and database role. Yours alone: each teammate gets their own file from",
            "`softmaxlab team add-user NAME`.",
        ]
    else:
        header = [
            "The team stack without basic-auth (`softmaxlab team up`): the server's address, and the",
            "keys of the `team` S3 user (the DVC bucket) and database role (the optuna database).",
            "The file teammates source; it holds no admin or owner secret.",
        ]
    return write_env_file(state.path("env"), state.env, header)
