"""The Hydra app behind `softmaxlab [overrides]` and `softmaxlab -m ...`.

One composed config runs the four stages in-process into Hydra's run directory and logs one
MLflow run; `-m` sweeps, one child run per job under a parent run for the sweep.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from softmaxlab.core.compose_errors import one_line
from softmaxlab.core.errors import UserError, debug, fail, first_line

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


def config_dir() -> str:
    from softmaxlab.core.config import project_root

    conf = project_root() / "conf"
    if not conf.is_dir():
        fail(f"no conf/ directory found from {Path.cwd()}: run softmaxlab inside the project")
    return str(conf)


def job(dcfg) -> float:
    """One Hydra job: validate, run the pipeline, return the sweep objective."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from softmaxlab.core.config import to_config
    from softmaxlab.model import training
    from softmaxlab.stages import evaluate, pipeline
    from softmaxlab.sweeps import cluster
    from softmaxlab.sweeps.parent import defer_failed_job, parent_run_id, record_failed_job, sweep_id
    from softmaxlab.tracking.server import is_tracking_error, redact
    from softmaxlab.tracking.tracker import REPLACES_TAG, connect, end_stranded, server_lost

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
        end_stranded()  # an earlier job's run the store could not end then
    try:
        cfg = to_config(dcfg)
        tracker = connect(cfg)
    except UserError as err:
        if multirun:
            try:
                record_failed_job(hc.job.num, overrides, str(err))
            except Exception as record_err:  # the store is what fails: recorded at the sweep's end
                if not is_tracking_error(record_err):
                    raise
                defer_failed_job(hc.job.num, overrides, str(err))
        return failed(err)
    tags = {"overrides": overrides or "(defaults)"}
    if multirun:
        tags.update({"sweep_id": sweep_id(), "job_num": str(hc.job.num), **cluster.job_tags()})

    def run(tracker):
        return pipeline.run(
            cfg, Path(hc.runtime.output_dir), tracker, run_name=overrides or None,
            parent_run_id=parent_run_id() if multirun else None, tags=tags,
            progress=not multirun and training.show_progress(),  # a sweep's jobs: one line each
            draw_beside=not multirun or hc.launcher._target_.endswith(".BasicLauncher"),  # this process
        )  # fmt: skip

    try:
        try:
            metrics = run(tracker)
        except Exception as err:
            why = server_lost(tracker) if is_tracking_error(err) else None
            if not why:
                raise
            # The tracking server went away during this job: run it again into the local
            # store, as a job that starts with the server down would (`softmaxlab sync` sends
            # it later and retires the unfinished run on the server, named in the tag).
            print(
                f"softmaxlab: warning: MLflow server {redact(tracker.uri)} stopped answering "
                f"during job {hc.job.num} ({why}); running it again into the local store",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            tags[REPLACES_TAG] = tracker.last_run_id or ""
            metrics = run(connect(cfg))
    except UserError as err:  # its run, if it had one, is already marked FAILED
        return failed(err)
    except Exception as err:
        if not (multirun and is_tracking_error(err)):
            raise
        # The store failed this job (say, its database restarted for longer than MLflow's
        # retries): the job fails alone, its run FAILED with the error where the store allows.
        first = first_line(err)
        return failed(UserError(f"tracking store {redact(tracker.uri)}: {first}"))
    value = metrics.get(cfg.objective, float("nan"))
    print(f"softmaxlab: {evaluate.summary_line(metrics)}; outputs in {hc.runtime.output_dir}")
    if metrics.get("warning"):
        print(f"softmaxlab: warning: {metrics['warning']}", file=sys.stderr)
    return float(value)


def refuse_passwords(args: list[str]) -> None:
    """Stop, before Hydra writes anything, on an override whose value holds a password
    (`tracking.uri=http://user:pw@host`): Hydra keeps the overrides in each output directory,
    and they become the run's name, its `overrides` tag and the sweep's `sweep_overrides`."""
    from softmaxlab.tracking.server import password_refusal

    for arg in args:
        key, is_override, value = arg.partition("=")
        if is_override and not key.startswith("-") and (refused := password_refusal(key, value)):
            fail(str(refused))


def hydra_main() -> None:
    import hydra

    from softmaxlab.core.config import register_configs
    from softmaxlab.sweeps.parent import close_parent, failed_jobs

    refuse_passwords(sys.argv[1:])
    register_configs()
    app = hydra.main(version_base=None, config_path=config_dir(), config_name="config")(job)
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
        close_parent()
    if failed_jobs():
        sys.exit(1)
