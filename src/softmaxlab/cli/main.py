"""`softmaxlab` / `python -m softmaxlab`: the entry point. Commands are imported only when run,
so `softmaxlab --help` and each command load only what they use."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from softmaxlab.core.errors import UserError, fail, quick_exit

COMMANDS = """\
softmaxlab: the Keras softmax classifier on make_blobs, end to end (generate -> train ->
evaluate -> report), tracked in MLflow. `python -m softmaxlab` is the same program.

Commands:
  softmaxlab [KEY=VALUE ...]             one run, in-process, into outputs/runs/<date>/<time>/
  softmaxlab -m KEY=A,B [KEY=C,D ...]    a sweep: one job per combination, one MLflow child
                                         run per job under a parent run, a summary at the end
  softmaxlab summarize SWEEP_ID [DIR]    rebuild a past sweep's summary from MLflow
  softmaxlab sync [URI]                  copy runs that fell back to the local store to the
                                         tracking server
  softmaxlab push|pull [DVC ARGS]        dvc push / dvc pull, after checking that the object
                                         store answers and takes your credentials (one line
                                         naming the variable if not)
  softmaxlab ui [PORT]                   MLflow's UI on 127.0.0.1 (default port 5000)
  softmaxlab adopt                       make params.yaml's values (an applied DVC experiment)
                                         conf/'s defaults
  softmaxlab promote [--dry-run]         point the registered model's `champion` alias at
                                         its best version (validation metrics only)
  softmaxlab serve [--port N] [--version N]
                                         serve the champion (or a version) on 127.0.0.1
  softmaxlab team up|down|status         the team's PostgreSQL, S3 (Ceph radosgw) and MLflow
                                         server on 127.0.0.1 (`softmaxlab team --help`)
  softmaxlab --cfg job [KEY=VALUE ...]   print the composed config and stop
  softmaxlab --hydra-help                Hydra's own flags (launchers, sweepers, ...)
The DVC pipeline runs the same stages: `dvc repro`, `dvc exp run -S KEY=VALUE`.

Config groups (GROUP=OPTION; * marks the default):
{groups}
Any value: KEY=VALUE, e.g. train.epochs=50, optimizer.lr=0.01, data.seed=1; top level: {top}.

Examples:
  softmaxlab model=wide optimizer=sgd optimizer.lr=0.01
  softmaxlab -m model=seed,wide optimizer.lr=0.001,0.01
  softmaxlab sweep=optuna
"""


def help_text() -> str:
    """The commands, conf/'s groups with their options (read from conf/), and examples."""
    import yaml

    from softmaxlab.cli.app import config_dir
    from softmaxlab.core.config import Config

    conf = Path(config_dir())
    defaults = {}
    for entry in yaml.safe_load((conf / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            ((key, value),) = entry.items()
            defaults[key.split()[-1]] = value
    lines = []
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in (conf / group).glob("*.yaml"))
        shown = ", ".join(o + ("*" if o == defaults.get(group) else "") for o in options)
        notes = {
            "sweep": "   (multirun presets: sweep=grid12 runs 12 jobs)",
            "launcher": "   (where a sweep's jobs run: launcher=ray)",
        }
        note = notes.get(group, "")
        lines.append(f"  {group:<10} {shown}{note}")
    groups = {p.name for p in conf.iterdir() if p.is_dir()}
    top = ", ".join(k for k in Config.__dataclass_fields__ if k not in groups and k != "paths")
    return COMMANDS.format(groups="\n".join(lines), top=top)


# Each command: (module, function taking the remaining arguments). Imported on use only.
COMMAND_TABLE = {
    "summarize": ("softmaxlab.sweeps.summary", "summarize_cli"),
    "sync": ("softmaxlab.tracking.sync", "sync_cli"),
    "ui": ("softmaxlab.cli.ui", "ui_cli"),
    "adopt": ("softmaxlab.cli.adopt", "adopt_cli"),
    "promote": ("softmaxlab.serving.promote", "promote_cli"),
    "serve": ("softmaxlab.serving.serve", "serve_cli"),
    "team": ("softmaxlab.team.cli", "team_cli"),
    "push": ("softmaxlab.team.remote", "push_cli"),
    "pull": ("softmaxlab.team.remote", "pull_cli"),
}


def cli() -> None:
    quick_exit()
    args = sys.argv[1:]
    if args and args[0] in ("--help", "-h"):
        print(help_text(), end="")
        return
    if args and args[0] in COMMAND_TABLE:
        module, function = COMMAND_TABLE[args[0]]
        try:
            getattr(importlib.import_module(module), function)(args[1:])
        except UserError as err:
            fail(str(err))
        return
    from softmaxlab.cli.app import hydra_main

    hydra_main()
