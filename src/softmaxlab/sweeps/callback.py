"""Sweeps: one MLflow parent run per `-m` sweep, one child run per job, and the summary.

The parent run and the experiment are created once in the launching process, before the
jobs fan out (parallel jobs racing to create them on a fresh sqlite store is a known
failure), and the jobs find the parent's id in the environment, which joblib's worker
processes inherit.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from softmaxlab.core import metrics as names
from softmaxlab.core.errors import UserError, first_line
from softmaxlab.sweeps import cluster

ENV_PARENT = "SOFTMAXLAB_PARENT_RUN_ID"
ENV_SWEEP = "SOFTMAXLAB_SWEEP_ID"
ENV_STORE = "SOFTMAXLAB_SWEEP_STORE"  # "<experiment id> <tracking uri>" of the parent run
ENV_PROGRESS = "SOFTMAXLAB_SWEEP_PROGRESS"  # "<planned jobs> <start time>" for the k/N lines
# The summary's columns: the validation metrics a sweep may optimise, then the headline.
_METRIC_COLUMNS = [*names.OBJECTIVES, *(m for m in names.HEADLINE.values() if m not in names.OBJECTIVES)]
SUMMARY_COLUMNS = {
    "tags.job_num": "job",
    "tags.overrides": "overrides",
    "status": "status",
    **{f"metrics.{m}": names.short(m) for m in _METRIC_COLUMNS},
    f"metrics.{names.TRAIN_SECONDS}": "train_s",
    "run_id": "run_id",
}
_state: dict = {"parent": None, "failed": 0, "unrecorded": []}


def parent_run_id() -> str | None:
    return os.environ.get(ENV_PARENT)


def sweep_id() -> str:
    return os.environ.get(ENV_SWEEP, "")


def failed_jobs() -> int:
    return _state["failed"]


def record_failed_job(job_num: int, overrides: str, error: str) -> None:
    """A job whose own config is invalid never opens a run: record it as a FAILED child so
    the summary, the parent's status and the exit code all see it."""
    store = os.environ.get(ENV_STORE)
    if not store or not parent_run_id():
        return
    from mlflow.tracking import MlflowClient

    from softmaxlab.tracking.store import retry_locked

    experiment_id, uri = store.split(" ", 1)
    client = MlflowClient(uri)
    tags = {
        "mlflow.parentRunId": parent_run_id(), "sweep_id": sweep_id(), "job_num": str(job_num),
        "overrides": overrides or "(defaults)", "error": error[:5000],
    }  # fmt: skip
    run = retry_locked(client.create_run, experiment_id, run_name=overrides or None, tags=tags)
    retry_locked(client.set_terminated, run.info.run_id, "FAILED")


def fail_lost_job(job_num: int, overrides: str, error: str) -> None:
    """A job whose process died under it (a cluster launcher lost its worker): its run, if it
    had opened one, cannot end itself and would stay RUNNING; end it FAILED with the reason.
    Without a run, record the job as a FAILED child, as record_failed_job does."""
    store = os.environ.get(ENV_STORE)
    if not store or not parent_run_id():
        return
    from mlflow.tracking import MlflowClient

    from softmaxlab.tracking.store import retry_locked

    experiment_id, uri = store.split(" ", 1)
    client = MlflowClient(uri)
    found = retry_locked(
        client.search_runs, [experiment_id],
        f"tags.sweep_id = '{sweep_id()}' and tags.job_num = '{job_num}' and attributes.status = 'RUNNING'",
    )  # fmt: skip
    if not found:
        record_failed_job(job_num, overrides, error)
    for run in found:
        retry_locked(client.set_tag, run.info.run_id, "error", error[:5000])
        retry_locked(client.set_terminated, run.info.run_id, "FAILED")


def _job_config(config: DictConfig):
    from softmaxlab.core.config import to_config

    return to_config({k: v for k, v in config.items() if k != "hydra"})


class SweepCallback(Callback):
    """Registered in conf/config.yaml under hydra.callbacks."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from softmaxlab.core.errors import fail
        from softmaxlab.model import backend
        from softmaxlab.tracking.tracker import connect

        try:
            cfg = _job_config(config)
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
        sid = f"{Path(config.hydra.sweep.dir).name}-{uuid.uuid4().hex[:6]}"
        os.environ[ENV_SWEEP] = sid
        total = planned_jobs(config)
        if total:
            os.environ[ENV_PROGRESS] = f"{total} {time.time()}"
        if tracker is not None:
            try:
                self._open_parent(config, cfg, tracker, sid)
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
            if _state["parent"] is not None:
                tracker.set_tags(_state["parent"][1], {"error": str(err)})
            close_parent()
            fail(str(err))

    @staticmethod
    def _open_parent(config: DictConfig, cfg, tracker, sid: str) -> None:
        from softmaxlab.tracking.provenance import git_state
        from softmaxlab.tracking.server import credentials_error

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

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        """`sweep: 3/12 jobs done, 41 s so far, about 2 min left` after every job. Jobs may
        run in other processes (joblib), so each finished job leaves a marker in the sweep
        directory and the count is of markers; the estimate is wall time per finished job."""
        progress = os.environ.get(ENV_PROGRESS)
        if not progress or config.hydra.mode != RunMode.MULTIRUN:
            return
        total, start = int(progress.split()[0]), float(progress.split()[1])
        marks = Path(config.hydra.sweep.dir) / ".jobs_done"
        marks.mkdir(parents=True, exist_ok=True)
        (marks / str(config.hydra.job.num)).touch()
        done = len(list(marks.iterdir()))
        elapsed = time.time() - start
        left = elapsed / done * max(total - done, 0)
        print(
            f"sweep: {done}/{total} jobs done, {_duration(elapsed)} so far"
            + (f", about {_duration(left)} left" if done < total else ""),
            file=sys.stderr,
            flush=True,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from softmaxlab.tracking.server import redact
        from softmaxlab.tracking.tracker import server_lost

        parent = _state["parent"]
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
            _state["parent"] = None
            return
        if not settle(tracker):
            _state["failed"] = _state["failed"] or 1  # unknown how many: not a success
            return
        table = write_summary(tracker, sweep_id(), sweep_dir, run_id, _job_config(config).objective)
        _state["failed"] = int((table["status"] != "FINISHED").sum())
        print(
            f"\nsweep {sweep_id()}: {len(table)} jobs\n"
            f"{table.drop(columns='run_id').to_string(index=False, float_format=format_number)}"
        )
        print(f"summary: {sweep_dir / 'summary.csv'}; runs table: "
              f"{tracking_link(tracker)}")  # fmt: skip
        close_parent()


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides. For the basic sweeper these are exactly its jobs (every
    combination); for a sampling one (Optuna) every choice and both ends of every interval."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    values: dict[str, list[str]] = {}  # the command line wins over a preset's params
    for o in OverridesParser.create().parse_overrides(args):
        key = o.get_key_element()
        if isinstance(o.value(), IntervalSweep):
            values[key] = [repr(o.value().start), repr(o.value().end)]
        elif o.is_sweep_override():
            values[key] = list(o.sweep_string_iterator())
        else:
            values[key] = [o.get_value_element_as_str()]
    return [
        [f"{k}={v}" for k, v in zip(values, combo, strict=True)]
        for combo in itertools.product(*values.values())
    ]


def check_jobs(config: DictConfig) -> None:
    """Compose and validate every job before the first one trains: a bad value or a typo in
    job 5 fails the sweep at once, in one line, and leaves no run behind."""
    from hydra.core.global_hydra import GlobalHydra

    from softmaxlab.core.compose_errors import one_line

    loader = GlobalHydra.instance().config_loader()
    for num, job in enumerate(sweep_jobs(config)):
        where = f"sweep job {num} ({' '.join(job) or 'defaults'})"
        try:
            composed = loader.load_sweep_config(config, job)
        except Exception as err:  # Hydra's composition errors: unknown option, key or type
            text = f"{err}\n{err.__cause__ or ''}"  # Hydra puts the key's details in the cause
            raise UserError(f"{where}: {one_line(text)}; no job was run") from err
        try:
            _job_config(composed)
        except UserError as err:
            raise UserError(f"{where}: {err}; no job was run") from err


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will run: Optuna's n_trials, or every combination of the
    basic sweeper's values (sweep_jobs); None if unknown."""
    sweeper = config.hydra.sweeper
    if sweeper.get("n_trials") is not None:
        return int(sweeper.n_trials)
    try:
        return len(sweep_jobs(config))
    except Exception:  # a sweeper or syntax we do not know: no estimate, no k/N lines
        return None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def check_direction(objective: str, direction) -> None:
    """An optimising sweeper (Optuna) must go the objective's way: minimising accuracy, or
    maximising NLL, would search for the worst model."""
    wanted = names.OBJECTIVES[objective]
    if direction is not None and str(direction) != wanted:
        raise UserError(
            f"hydra.sweeper.direction={direction} is not allowed with objective={objective}: "
            f"it must be {wanted}"
        )


def tracking_link(tracker) -> str:
    from softmaxlab.tracking.store import runs_table_url

    return runs_table_url(tracker.experiment_id)


STORE_WAIT_S = 120  # how long the end of a sweep waits for a failing store (a restart) to return


def settle(tracker) -> bool:
    """Before the sweep reads or ends its runs: wait (up to STORE_WAIT_S) while the store fails,
    say, its database restarting; then end the runs it could not end at the time (with their
    errors) and record the jobs it could not record. False if it is still failing: then one
    line says which runs stay RUNNING."""
    from softmaxlab.tracking.server import is_tracking_error, redact
    from softmaxlab.tracking.tracker import end_stranded, stranded_runs

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
                left = stranded_runs() + ([_state["parent"][1]] if _state["parent"] else [])
                print(f"softmaxlab: warning: tracking store {redact(tracker.uri)} still fails ({why}): "
                      f"runs {', '.join(left)} stay RUNNING; end them FAILED in the UI or with "
                      "MlflowClient().set_terminated", file=sys.stderr, flush=True)  # fmt: skip
                return False
            if not said:
                print(f"softmaxlab: warning: tracking store {redact(tracker.uri)} fails ({why}); "
                      f"waiting up to {STORE_WAIT_S} s for it to end the sweep's runs", file=sys.stderr, flush=True)  # fmt: skip
                said = True
            time.sleep(3)
    end_stranded()
    while _state["unrecorded"]:
        record_failed_job(*_state["unrecorded"].pop(0))
    return True


def defer_failed_job(job_num: int, overrides: str, error: str) -> None:
    """record_failed_job failed (the store was failing too): settle() records it later."""
    _state["unrecorded"].append((job_num, overrides, error))


def close_parent() -> None:
    """End the parent run: FINISHED if every child finished, else FAILED. Also runs when the
    sweep itself was aborted, so the parent is never left RUNNING."""
    from softmaxlab.tracking.tracker import end_stranded, server_lost

    parent = _state["parent"]
    if parent is None:
        end_stranded()  # a sweep without a parent run (it fell back before it began)
        return
    tracker, run_id, _ = parent

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


def search_children(tracker, sid: str) -> pd.DataFrame:
    import mlflow

    from softmaxlab.tracking.store import use_uri

    use_uri(tracker.uri)  # a job that fell back moved the process-wide URI
    df = mlflow.search_runs(
        experiment_ids=[tracker.experiment_id],
        filter_string=f"tags.sweep_id = '{sid}' and tags.job_num != ''",
        output_format="pandas",
    )
    return df


def summary_table(children: pd.DataFrame) -> pd.DataFrame:
    cols = {src: dst for src, dst in SUMMARY_COLUMNS.items() if src in children.columns}
    table = children[list(cols)].rename(columns=cols)
    if "overrides" in table:
        tokens = [[short_value(t) for t in o.split()] for o in table["overrides"].fillna("")]
        # Show what varies between jobs, not the settings every job shares.
        common = set.intersection(*(set(t) for t in tokens)) if len(tokens) > 1 else set()
        table["overrides"] = [" ".join(x for x in t if x not in common) for t in tokens]
    if "job" in table:
        table["job"] = table["job"].astype(int)
        table = table.sort_values("job")
    return table.reset_index(drop=True)


SIGNIFICANT = 4  # digits of every number the summary shows


def short_value(token: str) -> str:
    """`optimizer.lr=0.0012345678901234567` (Optuna samples floats) -> `optimizer.lr=0.001235`."""
    key, eq, value = token.partition("=")
    try:
        number = float(value)
    except ValueError:
        return token
    if not eq or value.lstrip("+-").isdigit():
        return token
    return f"{key}={number:.{SIGNIFICANT}g}"


def format_number(v) -> str:
    return f"{v:.{SIGNIFICANT}g}"


def accuracy_vs_ece(table: pd.DataFrame, title: str):
    import matplotlib.pyplot as plt

    from softmaxlab.stages import plots  # noqa: F401  (sets the Agg backend)

    fig, ax = plt.subplots(figsize=(7, 5))
    done = table.dropna(subset=["accuracy", "ece"])
    ax.scatter(done["ece"], done["accuracy"], color="#4c72b0")
    # One label per point: jobs that tie (same accuracy and ECE, common on easy data) share
    # it, instead of stacking their labels on top of each other. Labels name jobs only; the
    # summary table beside the figure says what each job changed.
    groups = done.groupby([done["ece"].round(6), done["accuracy"].round(6)])["job"]
    x_mid = (done["ece"].min() + done["ece"].max()) / 2 if len(done) else 0.0
    for (ece, acc), jobs in groups:
        label = "job " + ", ".join(str(j) for j in sorted(jobs)) if len(jobs) < 6 else f"{len(jobs)} jobs"
        right_half = ece > x_mid
        # Points in the right half are labelled to their left: nothing runs off the edge.
        ax.annotate(label, (ece, acc), fontsize=7, xytext=(-4 if right_half else 4, 4),
                    textcoords="offset points", ha="right" if right_half else "left")  # fmt: skip
    ax.margins(x=0.12, y=0.08)
    ax.set(xlabel="test ECE (lower is better)", ylabel="test accuracy (higher is better)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_summary(
    tracker, sid: str, out_dir: Path, parent_run_id: str | None, objective: str = names.DEFAULT_OBJECTIVE
) -> pd.DataFrame:
    from softmaxlab.core.io import save_figure, write_table, write_text
    from softmaxlab.tracking.server import redact

    children = search_children(tracker, sid)
    if children.empty:
        raise UserError(
            f"sweep {sid!r}: no runs found in experiment {tracker.experiment_id} of {redact(tracker.uri)}"
        )
    table = summary_table(children)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / "summary.csv", table)
    write_text(out_dir / "summary.md", table.to_markdown(index=False, floatfmt=f".{SIGNIFICANT}g") + "\n")
    save_figure(accuracy_vs_ece(table, f"sweep {sid}: {len(table)} jobs"), out_dir / "accuracy_vs_ece.png")
    if parent_run_id:
        tracker.log_artifacts(
            parent_run_id,
            [out_dir / "summary.csv", out_dir / "summary.md", out_dir / "accuracy_vs_ece.png"],
            "summary",
        )
        record_best(tracker, parent_run_id, table, objective)
    return table


def best_job(table: pd.DataFrame, objective: str) -> pd.Series | None:
    """The job the sweep picks: the best validation objective (ties: the lower job number).
    Its test metrics are reported, never used to choose."""
    col = names.short(objective)
    if col not in table:
        return None
    done = table[table["status"] == "FINISHED"].dropna(subset=[col])
    if done.empty:
        return None
    ascending = names.OBJECTIVES[objective] == "minimize"
    return done.sort_values([col, "job"], ascending=[ascending, True]).iloc[0]


def record_best(tracker, parent_run_id: str, table: pd.DataFrame, objective: str) -> None:
    """The parent run's result: the picked job (by the validation objective), with its
    objective and its headline test metrics as reported numbers."""
    metrics = {"n_jobs": len(table)}
    best = best_job(table, objective)
    if best is not None:
        metrics.update(
            {f"best/{m}": best[names.short(m)] for m in _METRIC_COLUMNS if pd.notna(best[names.short(m)])}
        )
        tracker.set_tags(parent_run_id, {
            "best.objective": objective, "best.job": str(best["job"]), "best.run_id": best["run_id"],
            "best.overrides": best["overrides"],
        })  # fmt: skip
    tracker.log_metrics(parent_run_id, metrics)


def summarize_cli(args: list[str]) -> None:
    """softmaxlab summarize SWEEP_ID [OUT_DIR]: rebuild a past sweep's summary."""
    from softmaxlab.core.config import load_params, project_root
    from softmaxlab.tracking.tracker import connect

    if not args or len(args) > 2:
        raise UserError("usage: softmaxlab summarize SWEEP_ID [OUT_DIR]")
    sid = args[0]
    # Sweep ids are `<time>-<hex>` (on_multirun_start); anything else cannot be one, and a
    # quote would break MLflow's search filter.
    if not re.fullmatch(r"[\w.:-]+", sid):
        raise UserError(f"sweep id {sid!r} is not valid: it has letters, digits, '-', '_', '.' and ':' only")
    cfg = load_params(project_root() / "params.yaml")
    tracker = connect(cfg)
    if tracker is None:
        raise UserError("tracking.enabled is false: there are no runs to summarize")
    out = Path(args[1]) if len(args) > 1 else project_root() / "outputs" / "summaries" / sid
    parent = _find_parent(tracker, sid)
    # The sweep's own objective (its parent run's param), else this project's.
    objective = tracker.client.get_run(parent).data.params.get("objective") if parent else None
    table = write_summary(
        tracker, sid, out, parent, objective if objective in names.OBJECTIVES else cfg.objective
    )
    print(table.drop(columns="run_id").to_string(index=False, float_format=format_number))
    print(f"summary: {out / 'summary.csv'}")


def _find_parent(tracker, sid: str) -> str | None:
    import mlflow

    df = mlflow.search_runs(
        experiment_ids=[tracker.experiment_id],
        filter_string=f"tags.sweep_id = '{sid}' and tags.sweep_overrides != ''",
        output_format="pandas",
    )
    return None if df.empty else df.iloc[0]["run_id"]
