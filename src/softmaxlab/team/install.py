"""What the team services need installed: Debian's PostgreSQL and Ceph packages and the team
extra's Python packages. `team up` only checks: it installs nothing itself. The Debian packages
are installed when asked, as root: `make team-install` (`python -m softmaxlab.team.install`)."""

from __future__ import annotations

import os
import shutil
import subprocess

from softmaxlab.core.errors import UserError, entry_point
from softmaxlab.team.postgres import PG_BIN

CEPH_BINS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")
APT_PACKAGES = "postgresql radosgw ceph-mon ceph-osd ceph-common"
APT_COMMAND = f"apt-get install --no-install-recommends {APT_PACKAGES}"


def missing_programs() -> list[str]:
    missing = [
        str(PG_BIN / p) for p in ("initdb", "pg_ctl", "psql", "pg_isready") if not (PG_BIN / p).exists()
    ]
    return missing + [b for b in CEPH_BINS if shutil.which(b) is None]


def ensure_installed() -> None:
    """Debian's PostgreSQL and Ceph packages and the team extra's Python packages are there;
    otherwise one line saying what is missing and the one command that installs it."""
    missing = missing_programs()
    if missing:
        raise UserError(
            f"missing {', '.join(missing)}: install Debian's packages as root with "
            f"`{APT_COMMAND}` (or `make team-install`)"
        )
    absent = []
    for module, package in (
        ("psycopg2", "psycopg2-binary"),
        ("boto3", "boto3"),
        ("flask_wtf", "mlflow[auth]"),
    ):
        try:
            __import__(module)
        except ImportError:
            absent.append(package)
    if absent:
        raise UserError(f"missing Python packages {', '.join(absent)}: run `make setup-team`")


def install_packages(say=print) -> None:
    """`make team-install`: Debian's packages with apt-get, as root (asked for: `team up` never
    installs anything), then the same check as `team up`."""
    if not missing_programs():
        say("team: Debian's PostgreSQL and Ceph packages are installed")
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise UserError(f"installing Debian's packages needs root and apt-get: run `{APT_COMMAND}` as root")
    say(f"team: installing Debian packages ({APT_PACKAGES}): about 70 MB, a minute")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES.split()]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:  # a stale package index
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise UserError(f"`{APT_COMMAND}` failed (exit code {proc.returncode}): {last}")
    ensure_installed()
    say("team: installed; `make team-up` starts the services")


if __name__ == "__main__":
    entry_point(install_packages)()
