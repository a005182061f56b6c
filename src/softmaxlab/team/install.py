"""What the team services need installed: Debian's PostgreSQL and Ceph packages (installed with
apt-get when we are root) and the team extra's Python packages."""

from __future__ import annotations

import os
import shutil
import subprocess

from softmaxlab.core.errors import UserError
from softmaxlab.team.postgres import PG_BIN

CEPH_BINS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")
APT_PACKAGES = "postgresql radosgw ceph-mon ceph-osd ceph-common"


def missing_programs() -> list[str]:
    missing = [
        str(PG_BIN / p) for p in ("initdb", "pg_ctl", "psql", "pg_isready") if not (PG_BIN / p).exists()
    ]
    return missing + [b for b in CEPH_BINS if shutil.which(b) is None]


def ensure_installed() -> None:
    """Debian's PostgreSQL and Ceph packages (installed with apt-get when we are root) and the
    team extra's Python packages; otherwise one line saying what is missing and how to get it."""
    missing = missing_programs()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"team: installing Debian packages ({APT_PACKAGES}): about 70 MB, a minute", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES.split()]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
        missing = missing_programs()
    if missing:
        raise UserError(
            f"missing {', '.join(missing)}: install Debian's packages as root "
            f"(`apt-get install --no-install-recommends {APT_PACKAGES}`)"
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
