"""`python -m softmaxlab [overrides]` / `softmaxlab [overrides]`: the Hydra app.

One composed config runs the four stages in-process into Hydra's run directory and logs one
MLflow run; `-m` sweeps, one child run per job under a parent run for the sweep.
Other commands (summarize, sync, ui, adopt, promote, serve, team) and the config groups: `softmaxlab --help`.
"""

from __future__ import annotations

import difflib
import io
import re
import sys
from pathlib import Path

from softmaxlab.errors import UserError, debug, fail

_state = {"entered": False}


class _HeldStderr(io.TextIOBase):
    """stderr held back while Hydra composes: a compose error is then reported as one line
    instead of Hydra's multi-line block. Released (and passed through) once a job starts."""

    def __init__(self, real):
        self.real, self.held, self.released = real, [], False

    def write(self, s: str) -> int:
        if self.released:
            return self.real.write(s)
        self.held.append(s)
        return len(s)

    def flush(self) -> None:
        if self.released:
            self.real.flush()

    def fileno(self) -> int:
        return self.real.fileno()

    def isatty(self) -> bool:
        return self.real.isatty()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.real.write("".join(self.held))
            self.held = []

    def text(self) -> str:
        return "".join(self.held)

    def discard(self) -> None:
        self.held, self.released = [], True


def one_line(hydra_error: str) -> str:
    """Fold Hydra's compose error (message, OmegaConf details, available options, search
    path) into one line that keeps the key, the value and what is allowed."""
    keep, options, head = [], [], ""
    for line in hydra_error.splitlines():
        s = line.strip()
        skip = ("Set the environment variable", "reference_type", "object_type", "To append to your config")
        if not s or s.startswith(skip):
            continue
        if s.startswith("Config search path"):
            break
        if s.startswith("Available options"):
            head = s.rstrip(":").lower()
            continue
        (options if head else keep).append(s.rstrip("."))
    missing_key = re.search(r"Could not override '([^']+)'", hydra_error)
    if missing_key and "not in" in hydra_error:
        from softmaxlab.config import unknown_key_error

        return str(unknown_key_error(missing_key.group(1)))
    missing_option = re.search(r"Could not find '([^']+)/([^'/]+)'", hydra_error)
    if missing_option and options:
        group, option = missing_option.groups()
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
        hint = f"did you mean `{group}={close[0]}`? " if close else ""
        return f"{group}={option}: no such option; {hint}choose one of {', '.join(options)}"
    msg = "; ".join(keep) or "bad command line"
    return msg + (f" ({head}: {', '.join(options)})" if options else "")


def _config_dir() -> str:
    from softmaxlab.config import project_root

    conf = project_root() / "conf"
    if not conf.is_dir():
        fail(f"no conf/ directory found from {Path.cwd()}: run softmaxlab inside the project")
    return str(conf)


def job(dcfg) -> float:
    """One Hydra job: validate, run the pipeline, return the sweep objective."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from softmaxlab import cluster, evaluate, pipeline, sweep, tracking, train
    from softmaxlab.config import to_config

    _state["entered"] = True
    if isinstance(sys.stderr, _HeldStderr):
        sys.stderr.release()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # A sweep preset (`sweep=optuna`) and the launcher (`launcher=ray`) are the parent run's,
    # not each job's: what a job changed is the rest.
    sweep_wide = ("sweep=", "launcher=")
    overrides = " ".join(o for o in hc.overrides.task if not (multirun and o.startswith(sweep_wide)))

    def failed(err: UserError) -> float:
        if debug():
            raise err
        if not multirun:
            fail(str(err))
        # In a sweep one bad job (say, a learning rate that diverges) must not stop the
        # others: say so, leave its run FAILED, and let the summary count it.
        print(f"softmaxlab: error: job {hc.job.num} ({overrides}): {err}", file=sys.stderr)
        return float("nan")

    if multirun:
        tracking.end_stranded()  # an earlier job's run the store could not end then
    try:
        cfg = to_config(dcfg)
        tracker = tracking.connect(cfg)
    except UserError as err:
        if multirun:
            try:
                sweep.record_failed_job(hc.job.num, overrides, str(err))
            except Exception as record_err:  # the store is what fails: recorded at the sweep's end
                if not tracking.is_tracking_error(record_err):
                    raise
                sweep.defer_failed_job(hc.job.num, overrides, str(err))
        return failed(err)
    tags = {"overrides": overrides or "(defaults)"}
    if multirun:
        tags.update({"sweep_id": sweep.sweep_id(), "job_num": str(hc.job.num), **cluster.job_tags()})

    def run(tracker):
        return pipeline.run(
            cfg, Path(hc.runtime.output_dir), tracker, run_name=overrides or None,
            parent_run_id=sweep.parent_run_id() if multirun else None, tags=tags,
            progress=not multirun and train.show_progress(),  # a sweep's jobs: one line each
        )  # fmt: skip

    try:
        try:
            metrics = run(tracker)
        except Exception as err:
            why = tracking.server_lost(tracker) if tracking.is_tracking_error(err) else None
            if not why:
                raise
            # The tracking server went away during this job: run it again into the local
            # store, as a job that starts with the server down would (`softmaxlab sync` sends
            # it later and retires the unfinished run on the server, named in the tag).
            print(
                f"softmaxlab: warning: MLflow server {tracking.redact(tracker.uri)} stopped answering "
                f"during job {hc.job.num} ({why}); running it again into the local store",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            tags[tracking.REPLACES_TAG] = tracker.last_run_id or ""
            metrics = run(tracking.connect(cfg))
    except UserError as err:  # its run, if it had one, is already marked FAILED
        return failed(err)
    except Exception as err:
        if not (multirun and tracking.is_tracking_error(err)):
            raise
        # The store failed this job (say, its database restarted for longer than MLflow's
        # retries): the job fails alone, its run FAILED with the error where the store allows.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return failed(UserError(f"tracking store {tracking.redact(tracker.uri)}: {first}"))
    value = metrics.get(cfg.objective, float("nan"))
    print(f"softmaxlab: {evaluate.summary_line(metrics)}; outputs in {hc.runtime.output_dir}")
    if metrics.get("warning"):
        print(f"softmaxlab: warning: {metrics['warning']}", file=sys.stderr)
    return float(value)


def _hydra_main() -> None:
    import hydra

    from softmaxlab import sweep
    from softmaxlab.config import register_configs

    register_configs()
    app = hydra.main(version_base=None, config_path=_config_dir(), config_name="config")(job)
    real_stderr = sys.stderr
    held = sys.stderr = _HeldStderr(real_stderr)
    try:
        app()
    except SystemExit as exc:
        # Hydra reports a bad override (unknown group option, wrong type, unknown key) and
        # exits 1 before any job starts: a user error, said in one line.
        if exc.code == 1 and not _state["entered"] and not debug():
            sys.stderr = real_stderr
            message = one_line(held.text())
            held.discard()
            fail(message)
        raise
    except KeyboardInterrupt:
        print("softmaxlab: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        held.release()
        sys.stderr = real_stderr
        sweep.close_parent()
    if sweep.failed_jobs():
        sys.exit(1)


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

    from softmaxlab.config import Config

    conf = Path(_config_dir())
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


def cli() -> None:
    args = sys.argv[1:]
    if args and args[0] in ("--help", "-h"):
        print(help_text(), end="")
        return
    if args and args[0] in ("summarize", "sync", "ui", "adopt", "promote", "serve", "team", "push", "pull"):
        from softmaxlab import adopt, promote, remote, serve, sweep, sync, team, ui

        commands = {
            "summarize": sweep.summarize_cli,
            "sync": sync.sync_cli,
            "ui": ui.ui_cli,
            "adopt": adopt.adopt_cli,
            "promote": promote.promote_cli,
            "serve": serve.serve_cli,
            "team": team.team_cli,
            "push": lambda rest: remote.dvc_cli("push", rest),
            "pull": lambda rest: remote.dvc_cli("pull", rest),
        }
        try:
            commands[args[0]](args[1:])
        except UserError as err:
            fail(str(err))
        return
    _hydra_main()


if __name__ == "__main__":
    cli()
