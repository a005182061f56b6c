"""MLflow at the edges: where runs go, what they record, and that none is left RUNNING.

Stages and the Hydra app compute first and hand their results here. Metrics go in batches
(one call per stage, not one per number) through an explicit run id, so the DVC stages, which
run in separate processes, can all add to the one run the train stage opened.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from softmaxlab.core.config import Config, flatten, project_root
from softmaxlab.core.errors import UserError, first_line

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# Under `dvc repro` a run is opened by train and completed by report, in separate processes.
# Until report is done it is FAILED (never RUNNING, so no exit can strand it) and tagged with
# what is still to run; report marks it FINISHED, a failing later stage adds its error.
PENDING_TAG = "pipeline.pending"
DVC_LATER_STAGES = ("evaluate", "report")
ERROR_TAG, FAILED_STAGE_TAG = "error", "pipeline.failed_stage"
# On a run that fell back mid-sweep: the unfinished run on the server it replaces (sync retires it).
REPLACES_TAG = "tracking.replaces_run"
NOTE_TAG = "mlflow.note.content"  # the run's description on its MLflow page
# How long a remote tracking server may take to answer before we fall back (see connect).
REACHABLE_TIMEOUT_S = 5.0
# MLflow's dataset contexts for the data splits (cfg.paths keys).
DATA_CONTEXTS = {"train_data": "training", "test_data": "test"}
VERSIONED_PACKAGES = ("softmaxlab", "tensorflow", "jax", "keras", "numpy", "scikit-learn", "mlflow", "dvc")


def redact(uri: str) -> str:
    """The URI without user:password@, for anything written to disk or logged."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def retry_locked(fn, *args, attempts: int = 12, **kwargs):
    """Call fn, retrying while sqlite says "database is locked": parallel sweep jobs share
    one sqlite file, and a write can collide with another job's for a moment."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if "database is locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def dataset_insert_race(err: Exception) -> bool:
    """Whether err is another job having inserted the same dataset (experiment, name, digest)
    a moment earlier: sqlite's "UNIQUE constraint failed: datasets…", PostgreSQL's "duplicate
    key value violates unique constraint "dataset_pk"" (through a server, in its message)."""
    msg = str(err)
    return "dataset" in msg and ("UNIQUE constraint failed" in msg or "violates unique constraint" in msg)


def resolve_uri(cfg: Config) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else MLflow's own default store,
    sqlite:///mlflow.db, anchored at the project root so that runs started from Hydra's
    output directories or DVC's experiment copies land in one store."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{project_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///"))
        return f"sqlite:///{(project_root() / path).resolve()}"
    return uri


def use_uri(uri: str) -> None:
    """mlflow.set_tracking_uri for this process's fluent calls, without the side effect it has
    since MLflow 3: exporting MLFLOW_TRACKING_URI. resolve_uri reads that variable as what the
    user configured; after a fallback to the local store, a sweep's later jobs (and joblib's
    workers) would take the local store for the configured one, untagged, and sync would
    never send their runs."""
    import mlflow

    from softmaxlab.core.processes import restored_env

    with restored_env("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(uri)


def redact_text(text: str, uri: str) -> str:
    """`text` (an error message) with the URI's credentials taken out."""
    from urllib.parse import unquote, urlsplit

    text = text.replace(uri, redact(uri))
    password = urlsplit(uri).password
    return text.replace(unquote(password), "***").replace(password, "***") if password else text


def _health_probe(uri: str) -> tuple[str, dict[str, str]]:
    """<uri>/health and the Authorization header MLflow itself would send: user info in the
    URI, else MLFLOW_TRACKING_USERNAME/PASSWORD, else MLFLOW_TRACKING_TOKEN. urllib refuses a
    URL with user info, so it goes in the header instead."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    url = urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health"
    headers = {}
    if user:
        basic = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {basic}"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    return url, headers


# Servers found unreachable in this process, with why: a sweep's jobs do not each wait on a
# silent server, and once one goes away mid-sweep the remaining jobs go straight to the local
# store. A server that answered is asked again by each connect() (a few ms).
_down: dict[str, str] = {}


def reachable(uri: str, fresh: bool = False) -> str | None:
    """None if an http(s) tracking server answers /health in time, else why not. A server
    found down stays down for this process unless `fresh` (sync: the point is that it's back)."""
    from softmaxlab.core.probe import http_status

    if uri in _down and not fresh:
        return _down[uri]
    url, headers = _health_probe(uri)
    status = http_status(url, REACHABLE_TIMEOUT_S, headers)
    # A string: nothing answered, and why; a number: the server's HTTP status.
    why = (
        redact_text(status, uri) if isinstance(status, str) else (None if status == 200 else f"HTTP {status}")
    )
    if why:
        _down[uri] = why
    else:
        _down.pop(uri, None)
    return why


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_lost(tracker: Tracker | None) -> str | None:
    """After an error: why the tracker's server no longer answers (it is then treated as down
    for the rest of this process), or None if it still answers or the store is local."""
    if tracker is None or not is_remote(tracker.uri):
        return None
    return reachable(tracker.uri, fresh=True)


def is_tracking_error(err: BaseException) -> bool:
    """An error from talking to the tracking store (MLflow's, or the HTTP connection's)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return isinstance(err, MlflowException | RequestException)


def refusal(err: BaseException) -> int | None:
    """401 or 403 when `err` is an MLflow server's refusal of the credentials (the status MLflow
    mapped, or the one its message quotes from the HTTP answer), else None."""
    import re

    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return None
    code = err.get_http_status_code()
    if code in (401, 403):
        return code
    quoted = re.search(r"\b(401|403)\b", str(err))
    return int(quoted.group(1)) if quoted else None


def credentials_error(err: BaseException, uri: str, experiment: str) -> UserError | None:
    """A tracking server's refusal (HTTP 401 or 403) as one line naming what to set, or None
    for any other error. Never shows the password."""
    from urllib.parse import unquote, urlsplit

    code = refusal(err)
    if code is None:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or unquote(urlsplit(uri).username or "")
    server = f"MLflow server {redact(uri)}"
    if code == 401 and not user:
        return UserError(
            f"{server} wants a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(a team user's, from `softmaxlab team add-user`)"
        )
    if code == 401:
        return UserError(
            f"{server} refused MLFLOW_TRACKING_USERNAME={user} with its password (HTTP 401): "
            "check MLFLOW_TRACKING_PASSWORD"
        )
    return UserError(
        f"{server}: user {user or '(none)'} may not write to experiment {experiment!r} (HTTP 403): "
        f"its owner or an admin grants it (`softmaxlab team grant {user or 'USER'} {experiment} EDIT`), "
        "or choose another tracking.experiment"
    )


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}
    return {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}


def default_run_name(cfg: Config) -> str:
    """A run name that says what ran (the runs table shows it), instead of MLflow's random
    one: the DVC experiment's name where DVC runs it, else model, optimizer, lr and seed."""
    what = f"{cfg.model.name} {cfg.optimizer.name} lr={cfg.optimizer.lr:g} seed={cfg.seed}"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{exp}: {what}" if exp else what


def environment_tags() -> dict[str, str]:
    tags = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"versions.{pkg}"] = metadata.version(pkg)
    return tags


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
        status, message = "FINISHED", None
        try:
            self.log_params(run.info.run_id, cfg)
            yield run.info.run_id
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
            if status == "FINISHED" and later_stages:
                pending = ", ".join(later_stages)
                self.set_tags(run.info.run_id, {
                    PENDING_TAG: pending,
                    NOTE_TAG: f"Not complete: {pending} still to run (FAILED until report is done).",
                })  # fmt: skip
                status = "FAILED"
            try:
                if mlflow.active_run() and mlflow.active_run().info.run_id == run.info.run_id:
                    retry_locked(mlflow.end_run, status)
                else:
                    retry_locked(self.client.set_terminated, run.info.run_id, status)
            except Exception:
                # The store did not take the run's end (say, its database was down for longer
                # than the client's retries): end_stranded() tries again when the sweep ends.
                _stranded.append((self.uri, run.info.run_id, status, message))
                raise

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
        """The data splits as MLflow input datasets (the run page's "Datasets used", the runs
        table's Dataset column): `frames` maps a cfg.paths key (train_data, test_data) to its
        frame. Digest: the file's md5, which is DVC's hash of it; source: where DVC keeps that
        version (data_location)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from softmaxlab.core.io import file_md5

        inputs = []
        with warnings.catch_warnings():
            # MLflow warns that a local path matches its two local sources (same class) and that
            # the integer label column cannot hold missing values: both true, neither something
            # a user of this run can act on.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
            for key, df in frames.items():
                rel = getattr(cfg.paths, key)
                md5 = file_md5(root / rel)
                dataset = mlflow.data.from_pandas(
                    df, source=data_location(root, rel, md5), targets="label",
                    name=f"{cfg.data.name}-{key.removesuffix('_data')}", digest=md5,
                )  # fmt: skip
                tags = [InputTag(MLFLOW_DATASET_CONTEXT, DATA_CONTEXTS[key]), InputTag("dvc.path", rel)]
                inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags))
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


def data_location(root: Path, rel: str, md5: str) -> str:
    """Where a teammate finds this version of a data file: DVC's object for it in the default
    remote (`<remote url>/files/md5/ab/cdef…`, the address `dvc pull` fetches) when `root` is a
    DVC project with a default remote and dvc.lock records this very content; else the file.
    Under `dvc repro` the generate stage's lock entry is written before train runs."""
    path = (root / rel).resolve()
    if not (root / ".dvc").is_dir():
        return str(path)  # the in-process pipeline writes its data into a run directory
    try:
        import dvc.api
        from dvc.config import Config as DvcConfig

        if not DvcConfig(dvc_dir=str(root / ".dvc"))["core"].get("remote"):
            return str(path)
        url = dvc.api.get_url(rel, repo=str(root))
    except Exception:  # not DVC-tracked (yet), or DVC cannot read its config: the file itself
        return str(path)
    return redact(url) if url.endswith(f"{md5[:2]}/{md5[2:]}") else str(path)


# Runs whose end the store did not take: (uri, run id, status, error message not yet recorded).
_stranded: list[tuple[str, str, str, str | None]] = []


def end_stranded() -> list[str]:
    """End the runs the store could not end at the time (see Tracker.run), with their error;
    returns the ids still not ended (the store is still failing)."""
    from mlflow.tracking import MlflowClient

    pending, _stranded[:] = list(_stranded), []
    for entry in pending:
        uri, run_id, status, message = entry
        client = MlflowClient(uri)
        try:
            if message:
                client.set_tag(run_id, ERROR_TAG, message)
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
        # __main__.job). A value the user set wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
        why = reachable(uri)
        if why:
            fallback_from = uri
            uri = f"sqlite:///{project_root() / 'mlflow.db'}"
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
        first = first_line(err)
        raise UserError(
            f"MLflow tracking store {redact(uri)} is not usable: {redact_text(first, uri)}"
        ) from err
    return Tracker(uri, experiment_id, cfg, fallback_from)


def ensure_experiment(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(
                f"tracking.experiment={name!r} is deleted in {redact(uri)}: restore it "
                "(`mlflow experiments restore`) or choose another name"
            )
        return exp.experiment_id
    try:
        # The tag makes `mlflow ui` treat it as a classic ML experiment (runs table).
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    except Exception:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def prepare_store(cfg: Config) -> subprocess.Popen | None:
    """Start creating a new local sqlite store in a background process, or None if there is
    nothing to create.

    A new store costs seconds of MLflow's schema migrations. The train stage starts this
    before importing TensorFlow, so the two run side by side on two cores; connect() then
    finds the store ready (and reports any error itself). The process has its own session:
    Ctrl-C in the terminal does not cut a migration in half.
    """
    if not cfg.tracking.enabled:
        return None
    uri = resolve_uri(cfg)
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists():
        return None
    code = "import sys; from softmaxlab.tracking.tracker import ensure_experiment; ensure_experiment(*sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, uri, cfg.tracking.experiment],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


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
    message = f"{stage}: {str(err).strip() or type(err).__name__}"
    tracker.set_tags(
        run_id, {ERROR_TAG: message[:5000], FAILED_STAGE_TAG: stage, NOTE_TAG: f"Failed in {message}"}
    )
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    retry_locked(tracker.client.set_terminated, run_id, status)


def runs_table_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """`mlflow ui` opens on its GenAI view; this link goes straight to the runs table."""
    return f"{host}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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


def main() -> None:
    """Print where the runs are and how to look at them (the end of `make run`)."""
    from softmaxlab.core.config import load_params
    from softmaxlab.core.errors import fail

    try:
        cfg = load_params(project_root() / "params.yaml")
        tracker = connect(cfg)
    except UserError as err:
        fail(str(err))
    if tracker is None:
        print("tracking is off (tracking.enabled: false)")
        return
    print(f"MLflow store: {redact(tracker.uri)}")
    print("Look at the runs: `make ui` (it prints the link to the runs table once the UI answers)")


if __name__ == "__main__":
    main()
