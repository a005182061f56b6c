"""A sweep's parent run and its bookkeeping: the ids its jobs find in the environment, the
failed jobs it counts (recorded as FAILED child runs, even when the job never opened one or its
worker was lost), and its end, FINISHED or FAILED, never RUNNING, after a failing store.

The parent run and the experiment are created once in the launching process, before the jobs
fan out (parallel jobs racing to create them on a fresh sqlite store is a known failure), and
the jobs find the parent's id in the environment, which joblib's worker processes inherit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from softmaxlab.core.errors import first_line
from softmaxlab.sweeps.summary import search_children, sweep_filter
from softmaxlab.tracking.provenance import git_state
from softmaxlab.tracking.server import credentials_error, is_tracking_error, redact, redact_text
from softmaxlab.tracking.store import retry_locked
from softmaxlab.tracking.tracker import end_stranded, server_lost, stranded_runs

ENV_PARENT = "SOFTMAXLAB_PARENT_RUN_ID"
ENV_SWEEP = "SOFTMAXLAB_SWEEP_ID"
ENV_STORE = "SOFTMAXLAB_SWEEP_STORE"  # "<experiment id> <tracking uri>" of the parent run
STORE_WAIT_S = 120  # how long the end of a sweep waits for a failing store (a restart) to return
# In the launching process: the parent run (tracker, run id, sweep dir), the failed jobs' count,
# and the failed jobs the store could not record at the time.
_state: dict = {"parent": None, "failed": 0, "unrecorded": []}


def parent_run_id() -> str | None:
    return os.environ.get(ENV_PARENT)


def sweep_id() -> str:
    return os.environ.get(ENV_SWEEP, "")


def failed_jobs() -> int:
    """The sweep's failed jobs counted so far in this process (lost ones, then the sweep's end)."""
    return _state["failed"]


def set_failed_jobs(count: int) -> None:
    _state["failed"] = count


def current_parent() -> tuple | None:
    """(tracker, run id, sweep dir) of this process's open parent run, or None."""
    return _state["parent"]


def forget_parent() -> None:
    """Leave the parent run to others (sync completes it once its server is back)."""
    _state["parent"] = None


def open_parent(config: DictConfig, cfg, tracker, sid: str) -> None:
    """Create the sweep's parent run and hand its id and store to the jobs (the environment)."""
    tags = {
        "sweep_id": sid,
        "sweep_dir": str(Path(config.hydra.sweep.dir).resolve()),
        "sweep_overrides": " ".join(config.hydra.overrides.task),
        **git_state(Path.cwd()),
    }
    try:
        run = tracker.client.create_run(tracker.experiment_id, run_name=f"sweep {sid}", tags=tags)
    except Exception as err:  # refused by the server: before any job runs, in one line
        if refused := credentials_error(err, tracker.uri, cfg.tracking.experiment):
            raise refused from None
        raise
    tracker.log_params(run.info.run_id, cfg)
    os.environ[ENV_PARENT] = run.info.run_id
    os.environ[ENV_STORE] = f"{tracker.experiment_id} {tracker.uri}"
    _state["parent"] = (tracker, run.info.run_id, Path(config.hydra.sweep.dir))
    print(f"softmaxlab: sweep {sid}, MLflow parent run {run.info.run_id}", file=sys.stderr)


def _parent_store():
    """(MlflowClient, experiment id, URI) of the parent run's store, from the environment a
    job inherits; None outside a sweep with a parent run."""
    store = os.environ.get(ENV_STORE)
    if not store or not parent_run_id():
        return None
    from mlflow.tracking import MlflowClient

    experiment_id, uri = store.split(" ", 1)
    return MlflowClient(uri), experiment_id, uri


def record_failed_job(job_num: int, overrides: str, error: str) -> None:
    """A job whose own config is invalid never opens a run: record it as a FAILED child so
    the summary, the parent's status and the exit code all see it."""
    if (store := _parent_store()) is None:
        return
    client, experiment_id, uri = store
    tags = {
        "mlflow.parentRunId": parent_run_id(), "sweep_id": sweep_id(), "job_num": str(job_num),
        "overrides": overrides or "(defaults)", "error": redact_text(error, uri)[:5000],
    }  # fmt: skip
    run = retry_locked(client.create_run, experiment_id, run_name=overrides or None, tags=tags)
    retry_locked(client.set_terminated, run.info.run_id, "FAILED")


def fail_lost_job(job_num: int, overrides: str, error: str) -> None:
    """A job whose process died under it (a cluster launcher lost its worker): its run, if it
    had opened one, cannot end itself and would stay RUNNING; end it FAILED with the reason.
    Without a run, record the job as a FAILED child, as record_failed_job does."""
    _state["failed"] += 1  # in this (the launching) process: counted with tracking off too
    if (store := _parent_store()) is None:
        return
    client, experiment_id, uri = store
    found = retry_locked(
        client.search_runs, [experiment_id],
        f"{sweep_filter(sweep_id())} and tags.job_num = '{job_num}' and attributes.status = 'RUNNING'",
    )  # fmt: skip
    if not found:
        record_failed_job(job_num, overrides, error)
    for run in found:
        retry_locked(client.set_tag, run.info.run_id, "error", redact_text(error, uri)[:5000])
        retry_locked(client.set_terminated, run.info.run_id, "FAILED")


def defer_failed_job(job_num: int, overrides: str, error: str) -> None:
    """record_failed_job failed (the store was failing too): settle() records it later."""
    _state["unrecorded"].append((job_num, overrides, error))


def settle(tracker) -> bool:
    """Before the sweep reads or ends its runs: wait (up to STORE_WAIT_S) while the store fails,
    say, its database restarting; then end the runs it could not end at the time (with their
    errors) and record the jobs it could not record. False if it is still failing: then one
    line says which runs stay RUNNING."""
    deadline, said = time.monotonic() + STORE_WAIT_S, False
    while True:
        try:
            tracker.client.get_experiment(tracker.experiment_id)  # reads the database
            break
        except Exception as err:
            if not is_tracking_error(err):
                raise
            why = first_line(err)
            if time.monotonic() > deadline:
                return _still_failing(tracker, why)
            if not said:
                print(f"softmaxlab: warning: tracking store {redact(tracker.uri)} fails ({why}); "
                      f"waiting up to {STORE_WAIT_S} s for it to end the sweep's runs", file=sys.stderr, flush=True)  # fmt: skip
                said = True
            time.sleep(3)
    end_stranded()
    while _state["unrecorded"]:
        job = _state["unrecorded"][0]
        try:
            record_failed_job(*job)
        except Exception as err:  # still failing: the job stays on the list, for the next try
            if not is_tracking_error(err):
                raise
            return _still_failing(tracker, first_line(err), f"failed job {job[0]} is not recorded there; ")
        _state["unrecorded"].pop(0)  # recorded: only now off the list
    return True


def _still_failing(tracker, why: str, also: str = "") -> bool:
    """settle's last word on a store that still fails: which runs stay RUNNING. False."""
    left = stranded_runs() + ([_state["parent"][1]] if _state["parent"] else [])
    print(f"softmaxlab: warning: tracking store {redact(tracker.uri)} still fails ({why}): {also}"
          f"runs {', '.join(left)} stay RUNNING; end them FAILED in the UI or with "
          "MlflowClient().set_terminated", file=sys.stderr, flush=True)  # fmt: skip
    return False


def close_parent(error: str | None = None) -> None:
    """End the parent run: FINISHED if every child finished, else FAILED (with `error`, why the
    sweep stopped, as its tag). Also runs when the sweep itself was aborted, so the parent is
    never left RUNNING."""
    parent = _state["parent"]
    if parent is None:
        end_stranded()  # a sweep without a parent run (it fell back before it began)
        return
    tracker, run_id, _ = parent
    if error is not None:
        tracker.set_tags(run_id, {"error": error})

    if server_lost(tracker):  # nothing can be told; sync completes it later (complete_parents)
        _state["parent"] = None
        return
    if not settle(tracker):
        _state["parent"] = None
        return
    children = search_children(tracker, sweep_id())
    ok = len(children) > 0 and (children["status"] == "FINISHED").all()
    tracker.client.set_terminated(run_id, "FINISHED" if ok and not _state["failed"] else "FAILED")
    _state["parent"] = None
