"""MLflow at the edges: the run tracker, which opens a run, records into it and never leaves it
RUNNING, and connect(), which picks the store it writes to (falling back to the local one).

Stages and the Hydra app compute first and hand their results here. Metrics go in batches
(one call per stage, not one per number) through an explicit run id, so the DVC stages, which
run in separate processes, can all add to the one run the train stage opened.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from softmaxlab.core.config import Config, flatten, project_root
from softmaxlab.core.errors import UserError
from softmaxlab.tracking.provenance import (
    dataset_inputs,
    dataset_insert_race,
    default_run_name,
    environment_tags,
    git_state,
)
from softmaxlab.tracking.server import (
    credentials_error,
    is_remote,
    reachable,
    redact,
    redact_text,
    unusable_store,
)
from softmaxlab.tracking.store import ensure_experiment, local_uri, resolve_uri, retry_locked, use_uri

# Under `dvc repro` a run is opened by train and completed by report, in separate processes.
# Until report is done it is FAILED (never RUNNING, so no exit can strand it) and tagged with
# what is still to run; report marks it FINISHED, a failing later stage adds its error.
PENDING_TAG = "pipeline.pending"
DVC_LATER_STAGES = ("evaluate", "report")
ERROR_TAG, FAILED_STAGE_TAG = "error", "pipeline.failed_stage"
# On a run that fell back mid-sweep: the unfinished run on the server it replaces (sync retires it).
REPLACES_TAG = "tracking.replaces_run"
NOTE_TAG = "mlflow.note.content"  # the run's description on its MLflow page


class Tracker:
    """One tracking store and experiment. Thin: every call names its run explicitly."""

    def __init__(self, uri: str, experiment_id: str, cfg: Config, fallback_from: str | None = None):
        from mlflow.tracking import MlflowClient

        if redact(uri) != uri:
            # MLflow prints "View run … at: <tracking URI>/#/…" when a run ends, with the user
            # info in it, whichever stage ends it. Our own messages give the redacted link.
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.uri = uri
        self.experiment_id = experiment_id
        self.cfg = cfg
        self.fallback_from = fallback_from
        self.client = MlflowClient(uri)
        self.last_run_id: str | None = None  # the run run() opened last

    # -- runs ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def run(
        self,
        cfg: Config,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        later_stages: tuple[str, ...] = (),
    ) -> Iterator[str]:
        """Open a run with the config as params and provenance tags; close it FINISHED,
        FAILED (exception) or KILLED (Ctrl-C) — never leave it RUNNING. With later_stages
        (stages in other processes still to add to it), success closes it FAILED and tagged
        PENDING_TAG until the last of them calls finish()."""
        import mlflow

        all_tags = {**git_state(project_root()), **environment_tags(), **(tags or {})}
        all_tags["entry_point"] = Path(sys.argv[0]).name or "python"
        if os.environ.get("DVC_EXP_NAME"):  # set by DVC in `dvc exp run`'s stage processes
            all_tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
            all_tags["dvc_exp_baseline_rev"] = os.environ.get("DVC_EXP_BASELINE_REV", "")
        if self.fallback_from:
            all_tags["tracking.fallback_from"] = redact(self.fallback_from)
            if parent_run_id:
                # A sweep's parent may be on the server that went away, not in this store:
                # start_run would look it up and fail. The tag alone nests the run, and sync
                # copies it to the server, where the parent is.
                all_tags["mlflow.parentRunId"], parent_run_id = parent_run_id, None
        # The fluent API (start_run, log_model) follows the process-wide URI, which other code
        # in the process may have moved since connect(): pin it to this tracker's store.
        use_uri(self.uri)
        try:
            run = retry_locked(
                mlflow.start_run,
                experiment_id=self.experiment_id,
                run_name=run_name or default_run_name(cfg),
                parent_run_id=parent_run_id,
                nested=parent_run_id is not None,
                tags=all_tags,
            )
        except Exception as err:  # a server that lets us read the experiment may not let us write
            if refused := credentials_error(err, self.uri, cfg.tracking.experiment):
                raise refused from None
            raise
        self.last_run_id = run.info.run_id
        status, message, body_done = "FINISHED", None, False
        try:
            self.log_params(run.info.run_id, cfg)
            yield run.info.run_id
            body_done = True
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException as err:
            status = "FAILED"
            message = redact_text(str(err).strip() or type(err).__name__, self.uri)[:5000]
            with contextlib.suppress(Exception):  # the store may be what failed
                self.set_tags(run.info.run_id, {ERROR_TAG: message})
                message = None  # recorded
            raise
        finally:
            # Guarded: whatever the store does, the run is ended or queued to be ended
            # (end_stranded), and an error of the block is never replaced by the store's.
            unrecorded = {ERROR_TAG: message} if message else {}
            end_error = None
            if status == "FINISHED" and later_stages:
                pending = ", ".join(later_stages)
                marks = {
                    PENDING_TAG: pending,
                    NOTE_TAG: f"Not complete: {pending} still to run (FAILED until report is done).",
                }
                status = "FAILED"
                try:
                    self.set_tags(run.info.run_id, marks)
                except Exception as err:
                    unrecorded, end_error = marks, err
            active = mlflow.active_run()
            first = {"fluent": active is not None and active.info.run_id == run.info.run_id}

            def end() -> None:
                # mlflow.end_run forgets the run before it ends it: tried again (after "database
                # is locked") it would do nothing and leave the run RUNNING. Only once, then.
                if first.pop("fluent", False):
                    mlflow.end_run(status)
                else:
                    self.client.set_terminated(run.info.run_id, status)

            try:
                retry_locked(end)
            except Exception as err:
                end_error = end_error or err
            if end_error is not None:
                # The store did not take the run's end or its tags (say, its database was down
                # for longer than the client's retries): end_stranded() tries again when the
                # sweep ends.
                _stranded.append((self.uri, run.info.run_id, status, unrecorded))
                if body_done:
                    raise end_error

    # -- logging ------------------------------------------------------------------------
    def log_params(self, run_id: str, cfg: Config) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow's per-batch limit for params
            retry_locked(self.client.log_batch, run_id, params=params[i : i + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        retry_locked(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str) -> None:
        """The last stage is done: the run is complete, whatever an earlier attempt said."""
        stale = [
            t
            for t in (PENDING_TAG, ERROR_TAG, FAILED_STAGE_TAG)
            if t in self.client.get_run(run_id).data.tags
        ]
        for tag in stale:
            retry_locked(self.client.delete_tag, run_id, tag)
        retry_locked(self.client.set_terminated, run_id, "FINISHED")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metric_objects(run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def _log_metric_objects(self, run_id: str, metrics: list) -> None:
        for i in range(0, len(metrics), 1000):  # MLflow's per-batch limit for metrics
            retry_locked(self.client.log_batch, run_id, metrics=metrics[i : i + 1000])

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p), artifact_path)

    def log_data(self, run_id: str, cfg: Config, root: Path, frames: dict[str, Any]) -> None:
        """The data splits as MLflow input datasets (provenance.dataset_inputs)."""
        inputs = dataset_inputs(cfg, root, frames)
        # Parallel jobs (joblib, Ray) on the same data log the same dataset at once, and the
        # store checks for it before inserting: one of them can hit the dataset's unique key
        # (seen on a 2-node Ray sweep). Asked again, the store finds the row and links it.
        for attempt in range(4):
            try:
                return retry_locked(self.client.log_inputs, run_id, datasets=inputs)
            except Exception as err:
                if attempt == 3 or not dataset_insert_race(err):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_training(self, run_id: str, result: Any, cfg: Config) -> None:
        """Per-epoch curves (step = epoch), training time and device. The model is logged by
        the report stage, calibrated (report.log_calibrated_model), once T is fitted."""
        from mlflow.entities import Metric

        from softmaxlab.core.metrics import CURVES, TRAIN_SECONDS

        now = int(time.time() * 1000)
        curves = [
            Metric(name, float(row[col]), now, int(row["epoch"]))
            for _, row in result.history.iterrows()
            for col, name in CURVES.items()
        ]
        self._log_metric_objects(run_id, curves)
        self.log_metrics(run_id, {TRAIN_SECONDS: result.train_seconds})
        # train.run fills result.info (backend version, shortfall warning) before logging.
        tags = {
            "device": result.device,
            "backend": result.backend,
            "backend_version": result.info["backend_version"],
        }
        if result.info.get("warning"):
            tags["warning"] = result.info["warning"]
        self.set_tags(run_id, tags)


# Runs whose end the store did not take: (uri, run id, status, tags not yet recorded).
_stranded: list[tuple[str, str, str, dict[str, str]]] = []


def end_stranded() -> list[str]:
    """End the runs the store could not end at the time (see Tracker.run), with their tags
    (error, pending stages); returns the ids still not ended (the store is still failing)."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    pending, _stranded[:] = list(_stranded), []
    for entry in pending:
        uri, run_id, status, tags = entry
        client = MlflowClient(uri)
        try:
            if tags:
                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            client.set_terminated(run_id, status)
        except Exception:
            _stranded.append(entry)  # the next call tries again
    return stranded_runs()


def stranded_runs() -> list[str]:
    """The ids of the runs still waiting for end_stranded()."""
    return [run_id for _, run_id, _, _ in _stranded]


def connect(cfg: Config) -> Tracker | None:
    """The tracker for cfg, or None when tracking is off.

    An http(s) server that does not answer within a few seconds is not waited on: the run
    goes to the local default store instead (tagged `tracking.fallback_from`), so nothing
    computed is lost; `softmaxlab sync` copies such runs to the server later.
    """
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg)
    fallback_from = None
    if is_remote(uri):
        # MLflow retries a failed request 7 times with exponential backoff (about 4 minutes)
        # before giving up. 4 retries (about 30 s) still ride out a server or database restart,
        # and a job whose server died mid-run falls back in seconds, not minutes (see
        # softmaxlab.cli.app.job). A value the user set wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
        why = reachable(uri)
        if why:
            fallback_from = uri
            uri = local_uri()
            print(
                f"softmaxlab: warning: MLflow server {redact(fallback_from)} unreachable ({why}); "
                f"logging to {uri} instead (copy the runs there later: `softmaxlab sync`)",
                file=sys.stderr,
                flush=True,
            )

    use_uri(uri)
    try:
        experiment_id = retry_locked(ensure_experiment, uri, cfg.tracking.experiment)
    except UserError:
        raise
    except Exception as err:
        if refused := credentials_error(err, uri, cfg.tracking.experiment):
            raise refused from None
        raise unusable_store(err, uri) from err
    return Tracker(uri, experiment_id, cfg, fallback_from)


@contextlib.contextmanager
def maybe_run(
    tracker: Tracker | None, cfg: Config, later_stages: tuple[str, ...] = DVC_LATER_STAGES, **kwargs
) -> Iterator[str | None]:
    """tracker.run, or nothing when tracking is off. By default for the train stage under
    `dvc repro`: evaluate and report still follow, and report completes the run. The in-process
    pipeline, which runs every stage inside the block, passes later_stages=()."""
    if tracker is None:
        yield None
        return
    with tracker.run(cfg, later_stages=later_stages, **kwargs) as run_id:
        yield run_id


@contextlib.contextmanager
def failure_recorded(cfg: Config, stage: str) -> Iterator[None]:
    """Around a later stage's work under `dvc repro` (evaluate, report): if it fails, the run
    train opened gets the error and stays FAILED. Only a run still pending is touched: a stage
    re-run by hand after the pipeline completed leaves that complete run as it was. MLflow is
    imported only on failure, so evaluate still starts without it."""
    try:
        yield
    except BaseException as err:
        with contextlib.suppress(Exception):  # recording must never hide the error itself
            _record_failure(cfg, stage, err)
        raise


def _record_failure(cfg: Config, stage: str, err: BaseException) -> None:
    from softmaxlab.core.io import read_json

    info_path = Path(cfg.paths.train_info)  # the stage's own workspace: DVC runs it there
    if not info_path.is_file():
        return
    tracker, run_id = reopen(cfg, read_json(info_path))
    if tracker is None or PENDING_TAG not in tracker.client.get_run(run_id).data.tags:
        return
    # The error may quote the store's URI (MLflow's own messages do), credentials and all.
    message = redact_text(f"{stage}: {str(err).strip() or type(err).__name__}", tracker.uri)
    tracker.set_tags(
        run_id, {ERROR_TAG: message[:5000], FAILED_STAGE_TAG: stage, NOTE_TAG: f"Failed in {message}"}
    )
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    retry_locked(tracker.client.set_terminated, run_id, status)


def reopen(cfg: Config, train_info: dict) -> tuple[Tracker | None, str | None]:
    """The store and run the train stage logged to (read from its train.json), so later
    stages add to that same run — even if it went to the fallback store."""
    if not cfg.tracking.enabled or not train_info.get("run_id"):
        return None, None

    uri = train_info["tracking_uri"]
    configured = resolve_uri(cfg)
    if redact(configured) == uri:  # train.json holds the redacted form; credentials come from the env
        uri = configured
    use_uri(uri)
    return Tracker(uri, train_info["experiment_id"], cfg), train_info["run_id"]


def server_lost(tracker: Tracker | None) -> str | None:
    """After an error: why the tracker's server no longer answers (it is then treated as down
    for the rest of this process), or None if it still answers or the store is local."""
    if tracker is None or not is_remote(tracker.uri):
        return None
    return reachable(tracker.uri, fresh=True)
