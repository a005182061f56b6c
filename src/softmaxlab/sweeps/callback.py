"""Sweeps: one MLflow parent run per `-m` sweep, one child run per job, and the summary.

SweepCallback is Hydra's hook into a sweep (conf/config.yaml registers it): at the start it
checks every job, connects to the store and opens the parent run (sweeps.parent); after each
job it says how far the sweep is; at the end it writes the summary (sweeps.summary) and ends
the parent run.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from softmaxlab.core.errors import UserError
from softmaxlab.sweeps import cluster
from softmaxlab.sweeps.jobs import check_direction, check_jobs, job_config, planned_jobs
from softmaxlab.sweeps.parent import (
    ENV_PARENT,
    ENV_STORE,
    ENV_SWEEP,
    close_parent,
    current_parent,
    failed_jobs,
    forget_parent,
    open_parent,
    set_failed_jobs,
    settle,
    sweep_id,
)
from softmaxlab.sweeps.summary import sweep_id_for

ENV_PROGRESS = "SOFTMAXLAB_SWEEP_PROGRESS"  # "<planned jobs> <start time>" for the k/N lines
# In the sweep directory, one empty file per job, named by its number: the jobs done (for the
# k/N lines) and the jobs that failed (for the exit code). Jobs may run in other processes
# (joblib, Ray, Slurm), so they are counted in files, not in memory.
DONE_MARKS, FAILED_MARKS = ".jobs_done", ".jobs_failed"


class SweepCallback(Callback):
    """Registered in conf/config.yaml under hydra.callbacks."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from softmaxlab.core.errors import fail
        from softmaxlab.model import backend
        from softmaxlab.tracking.tracker import connect

        try:
            cfg = job_config(config)
            check_direction(cfg.objective, config.hydra.sweeper.get("direction"))
            backend.check_sweep(
                list(config.hydra.overrides.task), config.hydra.sweeper.get("params"), cfg.train.backend
            )
            check_jobs(config)
            storage = config.hydra.sweeper.get("storage")
            if storage:  # Optuna's shared study: its database made ready before the sweeper opens it
                cluster.prepare_optuna_storage(str(storage))
            tracker = connect(cfg)
        except UserError as err:  # before any job and any run: the sweep is misconfigured
            fail(str(err))
        sid = sweep_id_for(Path(config.hydra.sweep.dir).name, uuid.uuid4().hex[:6])
        os.environ[ENV_SWEEP] = sid
        for kind in (DONE_MARKS, FAILED_MARKS):  # an earlier sweep's, in a sweep dir used again
            shutil.rmtree(Path(config.hydra.sweep.dir) / kind, ignore_errors=True)
        total = planned_jobs(config)
        if total:
            os.environ[ENV_PROGRESS] = f"{total} {time.time()}"
        if tracker is not None:
            try:
                open_parent(config, cfg, tracker, sid)
            except UserError as err:  # the server refused the parent run: no job has run
                fail(str(err))
        # For launchers whose jobs do not inherit this process's environment (Ray).
        job_env = {
            k: os.environ[k] for k in (ENV_SWEEP, ENV_PROGRESS, ENV_PARENT, ENV_STORE) if k in os.environ
        }
        if tracker is not None:
            job_env["MLFLOW_TRACKING_URI"] = tracker.uri  # the parent's store, wherever the job runs
        try:
            cluster.prepare_launcher(config, job_env, cfg.train.device)
        except UserError as err:  # no job ran: the parent ends FAILED, saying why
            close_parent(error=str(err))
            fail(str(err))

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        """A failed job leaves its marker (the sweep's exit code counts them, tracking on or
        off), and `sweep: 3/12 jobs done, 41 s so far, about 2 min left` follows every job:
        the count is of markers; the estimate is wall time per finished job."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if _job_failed(job_return):
            _mark(config, FAILED_MARKS)
        progress = os.environ.get(ENV_PROGRESS)
        if not progress:
            return
        total, start = int(progress.split()[0]), float(progress.split()[1])
        done = _mark(config, DONE_MARKS)
        elapsed = time.time() - start
        left = elapsed / done * max(total - done, 0)
        print(
            f"sweep: {done}/{total} jobs done, {_duration(elapsed)} so far"
            + (f", about {_duration(left)} left" if done < total else ""),
            file=sys.stderr,
            flush=True,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        # Counted from the jobs' own markers, whatever MLflow can still say: with tracking off,
        # or its server gone by now, the exit code still says that jobs failed.
        set_failed_jobs(failed_jobs() + _marks(config, FAILED_MARKS))
        try:
            self._end_parent(config)
        finally:
            if failed_jobs():
                print(f"sweep {sweep_id()}: {failed_jobs()} job(s) failed (their errors are above)",
                      file=sys.stderr, flush=True)  # fmt: skip

    def _end_parent(self, config: DictConfig) -> None:
        from softmaxlab.sweeps.summary import table_text, write_summary
        from softmaxlab.tracking.server import redact
        from softmaxlab.tracking.store import runs_table_url
        from softmaxlab.tracking.tracker import server_lost

        parent = current_parent()
        if parent is None:
            return
        tracker, run_id, sweep_dir = parent
        if why := server_lost(tracker):
            # Jobs after it went away are in the local store; the parent run is on the server.
            print(
                f"softmaxlab: warning: MLflow server {redact(tracker.uri)} is unreachable ({why}): "
                f"the sweep's summary is not recorded there; once it is back, `softmaxlab sync` sends "
                f"the jobs that fell back and completes the parent run, then `softmaxlab summarize "
                f"{sweep_id()}` writes the summary",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            forget_parent()
            return
        if not settle(tracker):
            # settle said which runs stay RUNNING: close_parent does not wait for the store again.
            set_failed_jobs(failed_jobs() or 1)  # unknown how many: not a success
            forget_parent()
            return
        table = write_summary(tracker, sweep_id(), sweep_dir, run_id, job_config(config).objective)
        set_failed_jobs(max(failed_jobs(), int((table["status"] != "FINISHED").sum())))
        print(f"\nsweep {sweep_id()}: {len(table)} jobs\n{table_text(table)}")
        print(f"summary: {sweep_dir / 'summary.csv'}; runs table: "
              f"{runs_table_url(tracker.experiment_id)}")  # fmt: skip
        close_parent()


def _job_failed(job_return) -> bool:
    """A job that raised, or returned no objective: softmaxlab.cli.app.job returns NaN for a
    job that failed alone (its error printed, its run FAILED)."""
    from hydra.core.utils import JobStatus

    if job_return is None or job_return.status != JobStatus.COMPLETED:
        return True
    value = job_return.return_value
    return isinstance(value, float) and math.isnan(value)


def _mark(config: DictConfig, kind: str) -> int:
    """This job's marker of `kind`; how many jobs have one now."""
    marks = Path(config.hydra.sweep.dir) / kind
    marks.mkdir(parents=True, exist_ok=True)
    (marks / str(config.hydra.job.num)).touch()
    return _marks(config, kind)


def _marks(config: DictConfig, kind: str) -> int:
    marks = Path(config.hydra.sweep.dir) / kind
    return len(list(marks.iterdir())) if marks.is_dir() else 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
