"""`softmaxlab promote [--dry-run]`: point the registered model's `champion` alias at its best
version, by a stated rule.

Every run registers its calibrated model as a new version of `tracking.registered_model`.
The rule ranks the versions on the validation split only — the split the temperature was
fitted on and that training never stepped on; the test split is shown beside the ranking,
never used for it, so that it stays an honest estimate of the champion's performance.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
from dataclasses import dataclass

from tabulate import tabulate

from softmaxlab.core import metrics as names
from softmaxlab.core.errors import UserError

ALIAS = "champion"
# The run metrics the rule reads, all of the saved (registered) model: evaluate's validation
# accuracy and NLL (with early stopping, of the kept weights, not the last epoch's), and
# whether the temperature fit stopped at its search bound.
VAL_ACCURACY, VAL_NLL, AT_BOUND = names.VAL_ACCURACY, names.VAL_NLL, names.TEMPERATURE_AT_BOUND
SHOWN = (names.TEMPERATURE, names.test("accuracy"), names.test("nll"))
RULE = (
    f"highest {VAL_ACCURACY}, then lowest {VAL_NLL} (both of the saved model), then newest version; "
    "only versions whose run FINISHED and whose temperature is not at its search bound; "
    "test metrics are not used"
)


@dataclass
class Candidate:
    version: int
    run_id: str
    status: str
    metrics: dict[str, float]
    excluded: str = ""  # why the rule skips it; empty if it qualifies

    def key(self) -> tuple[float, float, int]:
        return (-self.metrics[VAL_ACCURACY], self.metrics[VAL_NLL], -self.version)


def why_excluded(status: str, metrics: dict[str, float]) -> str:
    if status != "FINISHED":
        return f"run {status}"
    missing = [m for m in (VAL_ACCURACY, VAL_NLL, AT_BOUND) if m not in metrics]
    if missing:
        return f"run has no {', '.join(missing)}"
    if not all(math.isfinite(metrics[m]) for m in (VAL_ACCURACY, VAL_NLL)):
        return "non-finite validation metrics"
    if metrics[AT_BOUND]:
        return "temperature at its search bound"
    return ""


def candidates(client, name: str) -> list[Candidate]:
    """Every version of `name` with its run's status and metrics, best first; excluded last."""
    from mlflow.exceptions import MlflowException

    versions = client.search_model_versions(f"name = '{name}'")
    out = []
    for v in versions:
        try:
            run = client.get_run(v.run_id)
            status, metrics = run.info.status, dict(run.data.metrics)
            if run.info.lifecycle_stage == "deleted":
                status = "deleted"
        except MlflowException:
            status, metrics = "missing", {}
        out.append(Candidate(int(v.version), v.run_id, status, metrics, why_excluded(status, metrics)))
    ok = sorted((c for c in out if not c.excluded), key=Candidate.key)
    return ok + sorted((c for c in out if c.excluded), key=lambda c: -c.version)


def table(cands: list[Candidate], current: int | None) -> str:
    def num(c: Candidate, key: str) -> str:
        v = c.metrics.get(key)
        return "-" if v is None else f"{v:.4f}"

    head = ["rank", "version", "run", VAL_ACCURACY, VAL_NLL, *SHOWN, "note"]
    rows = []
    rank = 0
    for c in cands:
        if not c.excluded:
            rank += 1
        note = c.excluded and f"excluded: {c.excluded}"
        if c.version == current:
            note = ", ".join(filter(None, [f"current {ALIAS}", note]))
        cells = [str(rank) if not c.excluded else "-", str(c.version), c.run_id[:12]]
        rows.append(cells + [num(c, k) for k in (VAL_ACCURACY, VAL_NLL, *SHOWN)] + [note])
    # Plain: no rules, one line a row, cells as written (numparse would make 0.9700 0.97). The
    # header goes in as the first row: as `headers` tabulate would pad its columns 2 wider.
    return tabulate([head, *rows], tablefmt="plain", disable_numparse=True)


def current_champion(client, name: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, ALIAS).version)
    except MlflowException:
        return None


def promote(client, name: str, dry_run: bool = False) -> tuple[str, Candidate | None]:
    """(what to print, the best version or None if none qualifies): the ranking, then the
    alias move. Raises UserError when the registered model does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        raise UserError(
            f"no registered model {name!r} in this tracking store: run the pipeline first (`make run`) "
            "with tracking.log_model=true"
        ) from err
    cands = candidates(client, name)
    current = current_champion(client, name)
    lines = [f"{name}: {len(cands)} version(s); rule: {RULE}", table(cands, current)]
    best = next((c for c in cands if not c.excluded), None)
    if best is None:
        pass
    elif dry_run:
        lines.append(f"dry run: would point {ALIAS} at version {best.version} (now: {current or 'none'})")
    elif current == best.version:
        lines.append(f"{ALIAS} is already version {best.version}; unchanged")
    else:
        client.set_registered_model_alias(name, ALIAS, str(best.version))
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        tags = {
            f"{ALIAS}.promoted_at": now,
            f"{ALIAS}.rule": RULE,
            f"{ALIAS}.{names.short(VAL_ACCURACY)}": repr(best.metrics[VAL_ACCURACY]),
            f"{ALIAS}.{names.short(VAL_NLL)}": repr(best.metrics[VAL_NLL]),
            f"{ALIAS}.previous_version": str(current or "none"),
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, str(best.version), key, value)
        lines.append(f"{ALIAS}: {name} version {best.version} (run {best.run_id}), was {current or 'none'}")
    return "\n".join(lines), best


def open_store(cfg) -> tuple[object, str]:
    """(MlflowClient, URI) of the project's tracking store, or a one-line UserError: a local
    store that does not exist yet is not created (MLflow would, empty), a silent server is
    not waited on for minutes (MLflow's client retries)."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from softmaxlab.tracking.server import reachable, redact
    from softmaxlab.tracking.store import resolve_uri

    uri = resolve_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow tracking store at {uri}: run the pipeline first (`make run`)")
    why = reachable(uri) if uri.startswith(("http://", "https://")) else None
    if why:
        raise UserError(f"MLflow server {redact(uri)} is unreachable ({why})")
    return MlflowClient(uri), uri


def promote_cli(args: list[str]) -> None:
    from softmaxlab.core.config import load_params, project_root
    from softmaxlab.tracking.server import unusable_store

    parser = argparse.ArgumentParser(
        prog="softmaxlab promote",
        description=f"Point the {ALIAS} alias at the best registered version. Rule: {RULE}.",
    )
    parser.add_argument("--dry-run", action="store_true", help="show the ranking, move nothing")
    opts = parser.parse_args(args)
    cfg = load_params(project_root() / "params.yaml")
    name = cfg.tracking.registered_model
    client, uri = open_store(cfg)
    try:
        text, best = promote(client, name, opts.dry_run)
    except UserError:
        raise
    except Exception as err:  # a damaged store, a server error: say which, in one line
        raise unusable_store(err, uri) from err
    print(text, flush=True)
    if best is None:
        raise UserError(
            f"no version of {name!r} qualifies (see the notes above); the {ALIAS} alias is unchanged "
            "(to serve one anyway: `softmaxlab serve --version N`)"
        )
