"""`softmaxlab team up|down|status|add-user|remove-user|grant|rotate|join`: the command line of
the team's services (team/stack.py starts, stops and re-keys them, team/users.py has the users
and the DVC remote)."""

from __future__ import annotations

import sys

from softmaxlab.core.errors import UserError
from softmaxlab.team.stack import down, rotate, status, up
from softmaxlab.team.state import check_name, default_dir, load
from softmaxlab.team.users import add_user, configure_dvc, grant, remove_user

USAGE = """\
usage: softmaxlab team up [--auth|--no-auth] | down | status | add-user NAME [READ|EDIT] | remove-user NAME | grant NAME EXPERIMENT PERMISSION | rotate | join
  up           start PostgreSQL, Ceph radosgw (S3) and the MLflow server on 127.0.0.1 (state in .team/);
               --auth: MLflow's basic-auth app (admin password: MLFLOW_AUTH_ADMIN_PASSWORD or generated),
               kept on later `up`s until --no-auth
  down         stop them (data stays in .team/)
  status       each service, its URL, whether it answers and its memory
  add-user     (auth mode) a teammate's MLflow user, S3 key and, at EDIT (the default), database role
               for Optuna; READ reads runs and pulls data only. All in .team/users/NAME.env: hand it over
  remove-user  (auth mode) revoke all a teammate holds: MLflow user, S3 key, database role
  grant        give a user READ, EDIT, MANAGE or NO_PERMISSIONS on an experiment (auth mode)
  rotate       new admin and owner secrets and new `team` keys (.team/env is rewritten)
  join         set this clone's DVC remote from the sourced env file (a teammate's clone)"""


def team_cli(args: list[str]) -> None:
    from softmaxlab.core.config import project_root

    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "up" and rest in ([], ["--auth"], ["--no-auth"]):
        up(default_dir(), auth={"--auth": True, "--no-auth": False}.get(rest[0]) if rest else None,
           project=project_root())  # fmt: skip
    elif command == "down" and not rest:
        down(default_dir())
    elif command == "status" and not rest:
        services = status(default_dir())
        for s in services:
            where = f"pid {s.pid}, {s.rss_mb:.0f} MB" if s.pid else "not running"
            print(f"{s.name:<9} {s.url:<40} {'answers' if s.answers else 'DOWN':<8} ({where})")
        print(f"total     {sum(s.rss_mb for s in services):.0f} MB resident")
        if not all(s.answers for s in services):
            sys.exit(1)
    elif command == "add-user" and len(rest) in (1, 2):
        path = add_user(load(default_dir()), *rest)
        print(f"team: user {rest[0]!r} created; hand over {path} (theirs alone: `source` it)")
    elif command == "remove-user" and len(rest) == 1:
        state = load(default_dir())
        if check_name(rest[0]) not in state.users:
            raise UserError(f"no user {rest[0]!r}: the users are {', '.join(sorted(state.users)) or 'none'}")
        remove_user(state, rest[0])
        print(f"team: user {rest[0]!r} removed: MLflow user, S3 key, database role and join file")
    elif command == "rotate" and not rest:
        print(f"team: {rotate(default_dir())}")
    elif command == "grant" and len(rest) == 3:
        grant(load(default_dir()), *rest)
        print(f"team: {rest[0]!r} has {rest[2].upper()} on experiment {rest[1]!r}")
    elif command == "join" and not rest:
        print(f"team: {configure_dvc(project_root())}")
    else:
        raise UserError(USAGE.splitlines()[0])
