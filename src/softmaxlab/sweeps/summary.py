"""A sweep's summary: its jobs' runs as one table (summary.csv, summary.md), the accuracy vs
ECE figure, and the job it picks, recorded on the parent run; `softmaxlab summarize` rebuilds
a past sweep's."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from softmaxlab.core import metrics as names
from softmaxlab.core.errors import UserError

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
SIGNIFICANT = 4  # digits of every number the summary shows
# A sweep id (`<sweep dir's name>-<hex>`, on_multirun_start) has these characters only: it goes
# into MLflow filter strings between quotes, which MLflow's parser has no way to escape.
SWEEP_ID_CHARS = r"[\w.:-]"


def sweep_id_for(sweep_dir_name: str, suffix: str) -> str:
    """A sweep id from its directory's name, any other character as `_`."""
    return f"{re.sub(f'(?!{SWEEP_ID_CHARS}).', '_', sweep_dir_name)}-{suffix}"


def sweep_filter(sid: str) -> str:
    """The MLflow filter on a sweep's runs; a one-line UserError if `sid` cannot be a sweep id."""
    if not re.fullmatch(f"{SWEEP_ID_CHARS}+", sid):
        raise UserError(f"sweep id {sid!r} is not valid: it has letters, digits, '-', '_', '.' and ':' only")
    return f"tags.sweep_id = '{sid}'"


def _sweep_runs(tracker, sid: str, where: str) -> pd.DataFrame:
    """The sweep's runs in the tracker's experiment that match `where` (an MLflow filter)."""
    import mlflow

    from softmaxlab.tracking.store import use_uri

    use_uri(tracker.uri)  # a job that fell back moved the process-wide URI
    return mlflow.search_runs(
        experiment_ids=[tracker.experiment_id],
        filter_string=f"{sweep_filter(sid)} and {where}",
        output_format="pandas",
    )


def search_children(tracker, sid: str) -> pd.DataFrame:
    return _sweep_runs(tracker, sid, "tags.job_num != ''")


def _find_parent(tracker, sid: str) -> str | None:
    df = _sweep_runs(tracker, sid, "tags.sweep_overrides != ''")
    return None if df.empty else df.iloc[0]["run_id"]


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


def table_text(table: pd.DataFrame) -> str:
    """The summary as the terminal shows it (run ids left out)."""
    return table.drop(columns="run_id").to_string(index=False, float_format=format_number)


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
    sweep_filter(sid)  # refused here, before connecting, if it cannot be a sweep id
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
    print(table_text(table))
    print(f"summary: {out / 'summary.csv'}")
