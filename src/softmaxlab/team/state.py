"""What `softmaxlab team up` keeps under its state folder (`.team/` at the project root, or
`SOFTMAXLAB_TEAM_DIR`): the ports, the generated secrets (secrets.json, 0600) and the Ceph
cluster's ids, and the `.team/env` a teammate sources. The names every other team module shares
(host, buckets, the database role, the services) are here too."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from softmaxlab.core.errors import UserError

HOST = "127.0.0.1"
# Fixed defaults, so a teammate's .team/env stays the same from one `team up` to the next;
# SOFTMAXLAB_TEAM_<NAME>_PORT overrides each (the tests pick free ports).
DEFAULT_PORTS = {"postgres": 15432, "ceph_mon": 16789, "s3": 17480, "mlflow": 15000}
DB_ROLE = "softmaxlab"
DATABASES = ("mlflow", "mlflow_auth", "optuna")
MLFLOW_BUCKET = "softmaxlab-mlflow"
DVC_BUCKET = "softmaxlab-dvc"
DVC_REMOTE_NAME = "team"
DVC_REMOTE_URL = f"s3://{DVC_BUCKET}/dvc"
REGION = "us-east-1"  # radosgw's default zonegroup accepts it; boto3 wants one
ADMIN = "admin"
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
        """The variables a teammate sets (.team/env): the tracking server, and S3 for DVC."""
        s3 = self.secrets.get("s3", {}).get("team", {})
        env = {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "AWS_ACCESS_KEY_ID": s3.get("access_key", ""),
            "AWS_SECRET_ACCESS_KEY": s3.get("secret_key", ""),
            "AWS_ENDPOINT_URL": self.s3_url,
            "AWS_DEFAULT_REGION": REGION,
            "SOFTMAXLAB_DVC_REMOTE": DVC_REMOTE_URL,
            # Optuna's shared studies talk to the database directly (RDB storage).
            "SOFTMAXLAB_OPTUNA_STORAGE": postgres_url(self, "optuna"),
        }
        if self.auth:
            env["MLFLOW_TRACKING_USERNAME"] = ADMIN
            env["MLFLOW_TRACKING_PASSWORD"] = self.secrets["admin_password"]
        return env

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        public = {"ports": self.ports, "auth": self.auth, "ceph": self.ceph}
        (self.dir / "state.json").write_text(json.dumps(public, indent=2) + "\n")
        write_private(self.dir / "secrets.json", json.dumps(self.secrets, indent=2) + "\n")


def write_private(path: Path, text: str) -> None:
    """A file only its owner can read, never readable by others even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def postgres_url(state: State, db: str) -> str:
    """SQLAlchemy URL of one of the stack's databases (psycopg2: SQLAlchemy 2 reads a plain
    postgresql:// as psycopg 3)."""
    return f"postgresql+psycopg2://{DB_ROLE}:{state.secrets['pg_password']}@{HOST}:{state.ports['postgres']}/{db}"


def load(state_dir: Path | None = None) -> State:
    d = Path(state_dir or default_dir())
    if not (d / "state.json").is_file():
        raise UserError(f"no team services in {d}: start them with `make team-up` (softmaxlab team up)")
    public = json.loads((d / "state.json").read_text())
    private = json.loads((d / "secrets.json").read_text()) if (d / "secrets.json").is_file() else {}
    return State(d, public["ports"], public.get("auth", False), public.get("ceph", {}), private)


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


def write_env(state: State) -> Path:
    lines = [
        "# The team's services (`softmaxlab team up`): `source .team/env` in every shell that",
        "# logs runs or pushes data. Holds secrets: keep it in .team/ (git-ignored, mode 0600).",
    ]
    lines += [f"export {k}={v}" for k, v in state.env.items()]
    path = state.path("env")
    write_private(path, "\n".join(lines) + "\n")
    return path
