"""The team's PostgreSQL 15 (Debian's package): a cluster listening on 127.0.0.1, with the
databases `mlflow`, `mlflow_auth` and `optuna` owned by the role `softmaxlab` (the MLflow
server's), whose password is generated and kept in .team/secrets.json.

Everyone else reaches the `optuna` database only: CONNECT is revoked from PUBLIC on every
database, and granted on `optuna` to the group `optuna_users`, whose members are the role `team`
and each EDIT teammate's role. A member's sessions in `optuna` run as the group (a per-role
`SET role` default), so the tables Optuna creates belong to the group and every member may use
them; none of them owns anything, so a teammate's role can be dropped at once.

Its files (data/, run/ with the socket, postgres.log) are in .team/pg when we are not root. As
root, PostgreSQL runs as user postgres, which may not be able to enter the clone (a 0700 home,
`mktemp -d`): its files then go to a folder of their own in postgres's home,
~postgres/softmaxlab/<random id> (owned by postgres, 0700), and .team/pg is a symbolic link to
it: that link is where the state records it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

from softmaxlab.core.errors import UserError
from softmaxlab.core.processes import stop_group
from softmaxlab.team.services import check_port_free, last_lines, record, run, running_pid, start_ticks
from softmaxlab.team.state import DATABASES, DB_ROLE, HOST, OPTUNA_GROUP, TEAM, State

PG_BIN = Path(os.environ.get("SOFTMAXLAB_PG_BIN", "/usr/lib/postgresql/15/bin"))


def as_postgres(cmd: list) -> list[str]:
    """initdb refuses to run as root: as root, run PostgreSQL's programs as user postgres (in
    the folder `/`, which it may enter: every path we give them is absolute)."""
    cmd = [str(c) for c in cmd]
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def pg_home(state: State) -> Path:
    """PostgreSQL's folder (data/, run/, postgres.log): .team/pg, or where its link points."""
    return state.path("pg").resolve()


def pg_dirs(state: State) -> tuple[Path, Path, Path]:
    home = pg_home(state)
    return home / "data", home / "run", home / "postgres.log"


def _place_for_postgres(state: State) -> None:
    """As root, a new cluster's folder in postgres's home, linked from .team/pg (see above); a
    .team/pg that exists (a real folder from before, or the link) stays."""
    link = state.path("pg")
    if link.is_dir() and not link.is_symlink() and not (link / "data" / "PG_VERSION").exists():
        shutil.rmtree(link)  # what a start that failed before initdb left
    if os.geteuid() != 0 or link.exists() or link.is_symlink():
        return
    home = Path(pwd.getpwnam("postgres").pw_dir)
    if subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(home)]).returncode != 0:
        raise UserError(
            f"PostgreSQL runs as user postgres, which cannot write to its home {home}: "
            f"make it postgres's (`chown postgres: {home}`)"
        )
    place = home / "softmaxlab" / uuid.uuid4().hex
    for d in (place.parent, place):
        d.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(d, "postgres", "postgres")
    link.symlink_to(place, target_is_directory=True)


def remove_data(state: State) -> None:
    """Delete the cluster's files (a stopped cluster): .team/pg, and its folder elsewhere if
    .team/pg links to one. For throwaway stacks (the tests); `team down` keeps them."""
    link = state.path("pg")
    if link.is_symlink():
        shutil.rmtree(link.resolve(), ignore_errors=True)
        link.unlink()
    else:
        shutil.rmtree(link, ignore_errors=True)


def answers(state: State) -> bool:
    return (
        subprocess.run(
            [str(PG_BIN / "pg_isready"), "-q", "-h", HOST, "-p", str(state.ports["postgres"])],
            capture_output=True,
        ).returncode
        == 0
    )


def _psql(state: State, sql: str, db: str = "postgres") -> str:
    """SQL through psql's stdin on the state's own socket (so a password in it is never in argv)."""
    _, run_dir, _ = pg_dirs(state)
    cmd = [PG_BIN / "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", run_dir,
           "-p", state.ports["postgres"], "-U", "postgres", "-d", db, "-f", "-"]  # fmt: skip
    return run(as_postgres(cmd), "psql", input=sql, cwd="/").stdout


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _role_sql(role: str, password: str) -> list[str]:
    """A login role (its password set each time) in the Optuna group, its sessions in `optuna`
    running as the group."""
    return [
        f"SELECT 'CREATE ROLE {_ident(role)} LOGIN' WHERE NOT EXISTS "
        f"(SELECT FROM pg_roles WHERE rolname = {_literal(role)})\\gexec",
        f"ALTER ROLE {_ident(role)} LOGIN PASSWORD {_literal(password)};",
        f"GRANT {OPTUNA_GROUP} TO {_ident(role)};",
        f"ALTER ROLE {_ident(role)} IN DATABASE optuna SET role = {_literal(OPTUNA_GROUP)};",
    ]


def add_role(state: State, role: str, password: str) -> None:
    """Login role `role` that reaches the `optuna` database and no other."""
    _psql(state, "\n".join(_role_sql(role, password)) + "\n")


def set_password(state: State, role: str, password: str) -> None:
    _psql(state, f"ALTER ROLE {_ident(role)} PASSWORD {_literal(password)};\n")


def drop_role(state: State, role: str) -> None:
    """Role `role` gone, its open sessions ended (a dropped role's session would live on)."""
    _psql(state, "\n".join([
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {_literal(role)};",
        f"DROP ROLE IF EXISTS {_ident(role)};",
    ]) + "\n")  # fmt: skip


def start(state: State) -> str:
    _place_for_postgres(state)
    data, run_dir, log = pg_dirs(state)
    created = False
    if not (data / "PG_VERSION").exists():
        for d in (data.parent, data, run_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(d, "postgres", "postgres")
        run(
            as_postgres([PG_BIN / "initdb", "-D", data, "-U", "postgres", "--auth-local=trust",
                         "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
                         "--no-instructions"]),
            "initdb", cwd="/",
        )  # fmt: skip
        created = True
    check_port_free(state, "postgres")
    # The socket lives in run/ (0700, owned by postgres): the local `trust` login is open to
    # nobody else; TCP on 127.0.0.1 needs the role's password.
    options = f"-c listen_addresses={HOST} -p {state.ports['postgres']} -k {run_dir}"
    subprocess.run(
        as_postgres([PG_BIN / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start"]),
        capture_output=True, start_new_session=True, cwd="/",
    )  # fmt: skip
    if not answers(state):
        raise UserError(f"PostgreSQL did not start: {last_lines(log)}")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    record(state, "postgres", pid)
    roles_and_databases(state)
    return "created and started" if created else "started"


def roles_and_databases(state: State) -> None:
    """Idempotent, on every `team up` (a stack made by an older version gets what it lacks):
    the owner role (its password set from secrets.json each time), the databases, who may
    connect to which, the Optuna group and the `team` role."""
    password = state.secrets["pg_password"]
    sql = [
        f"SELECT 'CREATE ROLE {DB_ROLE} LOGIN' WHERE NOT EXISTS "
        f"(SELECT FROM pg_roles WHERE rolname = '{DB_ROLE}')\\gexec",
        f"ALTER ROLE {DB_ROLE} LOGIN PASSWORD '{password}';",
    ]
    for db in DATABASES:
        sql.append(
            f"SELECT 'CREATE DATABASE {db} OWNER {DB_ROLE}' WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = '{db}')\\gexec"
        )
    # Only owners (and the superuser) connect, except to `optuna`: the Optuna group's.
    sql += [
        f"SELECT 'CREATE ROLE {OPTUNA_GROUP} NOLOGIN' WHERE NOT EXISTS "
        f"(SELECT FROM pg_roles WHERE rolname = '{OPTUNA_GROUP}')\\gexec",
        f"REVOKE CONNECT, TEMPORARY ON DATABASE postgres, template1, {', '.join(DATABASES)} FROM PUBLIC;",
        f"GRANT CONNECT ON DATABASE optuna TO {OPTUNA_GROUP};",
        *_role_sql(TEAM, state.secrets["team_db_password"]),
    ]
    _psql(state, "\n".join(sql) + "\n")
    # In `optuna`, the group may create Optuna's tables; tables an older stack made as the
    # owner become the group's.
    _psql(state, "\n".join([
        f"GRANT USAGE, CREATE ON SCHEMA public TO {OPTUNA_GROUP};",
        "DO $$ DECLARE r record; BEGIN",
        "  FOR r IN SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace",
        f"    WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = '{DB_ROLE}' AND c.relkind IN ('r', 'S')",
        "  LOOP",
        f"    EXECUTE format('ALTER %s %I OWNER TO {OPTUNA_GROUP}',"
        " CASE r.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.relname);",
        "  END LOOP; END $$;",
    ]) + "\n", db="optuna")  # fmt: skip


def stop(state: State) -> None:
    data, _, _ = pg_dirs(state)
    pid = running_pid(state, "postgres")
    subprocess.run(
        as_postgres([PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop"]),
        capture_output=True, cwd="/",
    )  # fmt: skip
    if pid and start_ticks(pid):  # pg_ctl could not stop it: our PID, so stop its group
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:  # it stopped just now
            return
        stop_group(pgid)
