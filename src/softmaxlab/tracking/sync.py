"""`softmaxlab sync [URI]`: copy runs that fell back to the local store to the team server.

When the configured tracking server is unreachable, runs go to the local default store,
tagged `tracking.fallback_from` (see tracking.tracker.connect). Once the server is back, this copies
each such run — params, tags, every metric's full history, its input datasets, artifacts and the logged model's
files, and its registered model versions — into the same experiment there, and tags the local run `tracking.synced_to` so a second
sync copies nothing twice.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from softmaxlab.core.errors import UserError, first_line

SYNCED_TAG = "tracking.synced_to"
FALLBACK_TAG = "tracking.fallback_from"


COPY_TAG = "tracking.synced_from_run"
COMPLETE_TAG = "tracking.sync_complete"


def _copy_run(src, dst, run, experiment_id: str) -> str:
    """Copy one run; the copy is ended with the run's status, then marked complete, last. A
    copy that fails half-way (its end included) is ended FAILED and deleted on the server (if
    it still answers), and the next sync replaces it."""
    skip = {FALLBACK_TAG, SYNCED_TAG, "mlflow.runName"}
    tags = {k: v for k, v in run.data.tags.items() if k not in skip}
    tags[COPY_TAG] = run.info.run_id
    new = dst.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
    rid = new.info.run_id
    try:
        _copy_contents(src, dst, run, rid)
        _register_copy(src, dst, run, rid)
        # Ended before it is marked complete: a complete copy, which later syncs reuse, is
        # never one left RUNNING.
        dst.set_terminated(rid, run.info.status, end_time=run.info.end_time)
        dst.set_tag(rid, COMPLETE_TAG, "true")
    except BaseException:
        _discard(dst, rid)
        raise
    return rid


def _discard(dst, run_id: str) -> None:
    # Best effort: the server may be what failed. What stays behind is found and replaced by
    # the next sync (_previous_copy).
    with contextlib.suppress(Exception):
        dst.set_terminated(run_id, "FAILED")
        dst.delete_run(run_id)


def _copy_contents(src, dst, run, rid: str) -> None:
    from mlflow.entities import Metric, Param

    params = [Param(k, v) for k, v in run.data.params.items()]
    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in run.data.metrics
        for m in src.get_metric_history(run.info.run_id, key)
    ]
    for i in range(0, len(params), 100):
        dst.log_batch(rid, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        dst.log_batch(rid, metrics=metrics[i : i + 1000])
    if run.inputs and run.inputs.dataset_inputs:  # the data it used (tracking.tracker.Tracker.log_data)
        dst.log_inputs(rid, datasets=run.inputs.dataset_inputs)
    with tempfile.TemporaryDirectory() as tmp:
        if src.list_artifacts(run.info.run_id):
            local = src.download_artifacts(run.info.run_id, "", tmp)
            dst.log_artifacts(rid, local)
        # MLflow 3 keeps logged models beside the run, not under its artifacts: copy their files.
        import mlflow

        for model in mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        ):
            files = mlflow.artifacts.download_artifacts(model.model_uri, dst_path=os.path.join(tmp, "m"))
            dst.log_artifacts(rid, files, model.name)


def _register_copy(src, dst, run, rid: str) -> None:
    """The run's calibrated model was registered in the local store when it fell back: register
    the copy's on the server too, under the same name, so `softmaxlab promote` there sees it.
    (A copy that fails later is deleted; its version then points at a deleted run, which
    promote never picks.)"""
    from mlflow.exceptions import MlflowException

    for version in src.search_model_versions(f"run_id = '{run.info.run_id}'"):
        artifact_path = version.source.rstrip("/").rsplit("/", 1)[-1]  # .../artifacts/calibrated
        try:
            dst.create_registered_model(version.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{dst.get_run(rid).info.artifact_uri}/{artifact_path}"
        dst.create_model_version(version.name, source, rid)


def _previous_copy(dst, experiment_id: str, local_run_id: str) -> str | None:
    """The server's complete copy of a local run from an earlier sync (whose local tag was not
    written, e.g. the local store failed), else None; incomplete copies are deleted. (A copy
    marked complete but still RUNNING, left by a sync before its end came first, is one.)"""
    complete = None
    for r in dst.search_runs([experiment_id], filter_string=f"tags.`{COPY_TAG}` = '{local_run_id}'"):
        if r.data.tags.get(COMPLETE_TAG) == "true" and r.info.status != "RUNNING" and complete is None:
            complete = r.info.run_id
        else:
            _discard(dst, r.info.run_id)
    return complete


def sync(target_uri: str, local_uri: str) -> list[tuple[str, str]]:
    """Copy every not-yet-synced fallback run for target_uri; returns (local, remote) ids.
    Safe to repeat: a run is copied once, a half-done copy is replaced."""
    from mlflow.tracking import MlflowClient

    from softmaxlab.tracking.server import is_remote, reachable, redact
    from softmaxlab.tracking.store import ensure_experiment, use_uri

    # Not the cached answer: the point of sync is that the server is back.
    why = reachable(target_uri, fresh=True) if is_remote(target_uri) else None
    if why:
        raise UserError(f"MLflow server {redact(target_uri)} is still unreachable ({why}); try again later")
    src, dst = MlflowClient(local_uri), MlflowClient(target_uri)
    copied = []
    for exp in src.search_experiments():
        runs = src.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{FALLBACK_TAG}` = '{redact(target_uri)}'",
            max_results=50_000,
        )
        pending = [r for r in runs if SYNCED_TAG not in r.data.tags]
        if not pending:
            continue
        use_uri(local_uri)  # model lookups below read the local store
        remote_exp = ensure_experiment(target_uri, exp.name)
        for run in pending:
            try:
                rid = _previous_copy(dst, remote_exp, run.info.run_id) or _copy_run(src, dst, run, remote_exp)
            except UserError:
                raise
            except Exception as err:  # the server or the network went away half-way
                first = first_line(err)
                raise UserError(
                    f"sync stopped at run {run.info.run_id} ({first}); {len(copied)} run(s) copied before it; "
                    "run `softmaxlab sync` again: it replaces a half-done copy, and copies no run twice"
                ) from err
            src.set_tag(run.info.run_id, SYNCED_TAG, rid)
            copied.append((run.info.run_id, rid))
            _retire_replaced(dst, run, rid)
        _complete_parents(dst, remote_exp, {r.data.tags.get("mlflow.parentRunId") for r in pending} - {None})
    return copied


def _retire_replaced(dst, run, rid: str) -> None:
    """A job that fell back mid-sweep replaced the run it had begun on the server (which went
    away before it could be ended): end that run FAILED, say what replaced it, and delete it,
    so the sweep counts each job once."""
    from mlflow.exceptions import MlflowException

    from softmaxlab.tracking.tracker import REPLACES_TAG

    replaced = run.data.tags.get(REPLACES_TAG)
    if not replaced:
        return
    try:
        if dst.get_run(replaced).info.lifecycle_stage == "deleted":
            return
    except MlflowException:  # never reached the server
        return
    dst.set_tag(replaced, "tracking.replaced_by", rid)
    dst.set_terminated(replaced, "FAILED")
    dst.delete_run(replaced)


def _complete_parents(dst, experiment_id: str, parent_ids: set[str]) -> None:
    """A sweep's parent run left RUNNING on the server, because the server was down when the
    sweep ended: now that its jobs are all there, end it as the sweep would have (FINISHED if
    every job finished, else FAILED)."""
    from mlflow.exceptions import MlflowException

    for pid in parent_ids:
        try:
            if dst.get_run(pid).info.status != "RUNNING":
                continue
        except MlflowException:
            continue
        children = dst.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pid}'")
        statuses = {c.info.status for c in children}
        if "RUNNING" not in statuses:
            dst.set_terminated(pid, "FINISHED" if statuses == {"FINISHED"} else "FAILED")


def sync_cli(args: list[str]) -> None:
    """softmaxlab sync [URI]: URI defaults to tracking.uri / $MLFLOW_TRACKING_URI."""
    from softmaxlab.core.config import load_params, project_root
    from softmaxlab.tracking.server import is_remote, redact
    from softmaxlab.tracking.store import local_uri, resolve_uri

    if len(args) > 1:
        raise UserError("usage: softmaxlab sync [TRACKING_SERVER_URI]")
    cfg = load_params(project_root() / "params.yaml")
    target = args[0] if args else resolve_uri(cfg)
    if not is_remote(target):
        raise UserError(
            f"sync target {redact(target)!r} is not an http(s) MLflow server; pass one or set MLFLOW_TRACKING_URI"
        )
    copied = sync(target, local_uri())
    for local_id, remote_id in copied:
        print(f"synced run {local_id} -> {redact(target)} run {remote_id}")
    print(f"sync: {len(copied)} run(s) copied to {redact(target)}", file=sys.stderr)
