"""Stage `report`: the figures a person looks at, one self-contained HTML page, and the
evaluation recorded in the MLflow run.

Images are embedded (base64), so reports/report.html opens from disk in any browser and
reads the same as an MLflow artifact or an e-mail attachment. MLflow is used at the two ends
of the pipeline only: train opens the run, report adds evaluate's metrics and tables (first,
before any drawing) and then the figures and the page.
"""

from __future__ import annotations

import base64
import contextlib
import html
import os
from pathlib import Path

import numpy as np
import pandas as pd

from softmaxlab.core import metrics as names
from softmaxlab.core import timing
from softmaxlab.core.config import Config, as_dict, load_params
from softmaxlab.core.errors import entry_point
from softmaxlab.core.io import (
    FEATURES,
    prob_columns,
    read_grid,
    read_history,
    read_predictions,
    read_split,
    read_train_info,
    save_figure,
    write_text,
)
from softmaxlab.stages import evaluate


def _interval(m: dict[str, float], key: str, scaled: bool = False) -> str:
    """`0.0123 [0.0040, 0.0250]`: a test metric and its bootstrap interval, if there is one."""
    value = m[names.test(key, scaled)]
    lo, hi = (m.get(names.test_ci(key, end, scaled)) for end in names.CI_ENDS)
    return f"{value:.4f} [{lo:.4f}, {hi:.4f}]" if lo is not None else f"{value:.4f}"


def train_figures(cfg: Config, root: Path) -> dict:
    """The figures drawn from the train stage's files alone: in a sweep they are drawn while
    the job evaluates and records (pipeline.run)."""
    from softmaxlab.stages import plots

    k = len(cfg.data.centers)
    train = read_split(root / cfg.paths.train_data, k)
    test = read_split(root / cfg.paths.test_data, k)
    history = read_history(root / cfg.paths.history)
    _, probs, labels = read_predictions(root / cfg.paths.predictions / "test.parquet")
    grid = read_grid(root / cfg.paths.predictions / "grid.parquet")
    acc = float(np.mean(probs.argmax(axis=1) == labels))
    last = history.iloc[-1]
    return {
        "data.png": plots.data(train, test, f"{cfg.data.name}: {len(train)} train, {len(test)} test samples"),
        "training_curves.png": plots.training_curves(
            history,
            f"model {cfg.model.name}, {cfg.optimizer.name} lr {cfg.optimizer.lr}: final val_loss "
            f"{last['val_loss']:.4f}, val_accuracy {last['val_accuracy']:.4f}",
        ),
        "confusion.png": plots.confusion(labels, probs.argmax(axis=1), k, f"test accuracy {acc:.4f}"),
        "landscape.png": plots.landscape(
            grid, train, "confidence landscape: colour = predicted class, pale = unsure"
        ),
    }


def evaluation_figures(metrics: dict[str, float], tables: dict[str, pd.DataFrame], ci: float) -> dict:
    """The figures of evaluate's reliability tables and metrics."""
    from softmaxlab.stages import plots

    m, pct, t = metrics, f"{ci:.0%} CI", metrics[names.TEMPERATURE]
    reliability_titles = {
        "reliability": f"before scaling: acc {m[names.test('accuracy')]:.3f}\nECE {_interval(m, 'ece')} ({pct})",
        "reliability_ts": f"after scaling (T = {t:.2f})\nECE {_interval(m, 'ece', scaled=True)} ({pct})",
    }
    return {
        "reliability.png": plots.reliability({n: tables[n] for n in reliability_titles}, reliability_titles),
        "classwise.png": plots.classwise_reliability(
            tables["classwise"], f"per-class reliability (classwise ECE {m[names.test('ece_classwise')]:.4f})"
        ),
    }


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _metrics_table(m: dict[str, float], ci: float) -> str:
    def cell(key: str, scaled: bool) -> str:
        if names.test(key, scaled) not in m:
            return "<td>–</td>"
        value, _, interval = _interval(m, key, scaled).partition(" ")
        if interval:
            value += f' <span class="ci">{interval}</span>'
        return f"<td>{value}</td>"

    rows = "".join(
        f"<tr><th>{label}</th>{cell(key, False)}{cell(key, True)}<td class='note'>{note}</td></tr>"
        for key, (label, note) in names.CALIBRATION.items()
    )
    return (
        f"<table><thead><tr><th>test metric</th><th>as trained ({ci:.0%} bootstrap CI)</th>"
        f"<th>after temperature scaling</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _temperature_warning(m: dict[str, float]) -> str:
    if not m.get(names.TEMPERATURE_AT_BOUND):
        return ""
    return (
        f'<p class="warn"><strong>Temperature at its bound (T = {m[names.TEMPERATURE]:.3f}).</strong> '
        "The validation split is classified perfectly, so its NLL keeps falling as T moves to the "
        "bound: the fit is degenerate and the after-scaling column says little. Calibration is "
        "worth studying where classes overlap, e.g. <code>data=overlap</code>.</p>"
    )


def _training_warning(info: dict) -> str:
    """The train stage's shortfall warning (training.shortfall): training far below what the data allows."""
    if not info.get("warning"):
        return ""
    return f'<p class="warn"><strong>Training failed.</strong> {html.escape(str(info["warning"]))}.</p>'


def render(cfg: Config, metrics: dict[str, float], info: dict, images: list[tuple[Path, str]]) -> str:
    import yaml

    h = {short: metrics[full] for short, full in names.HEADLINE.items()}
    head = (
        f"accuracy {h['accuracy']:.4f} · NLL {h['nll']:.4f} · "
        f"ECE {h['ece']:.4f} → {h['ece_ts']:.4f} at T = {h['temperature']:.3f}"
    )
    run = info.get("run_id") or "not tracked"
    facts = (
        f"MLflow run <code>{html.escape(str(run))}</code> · device {html.escape(str(info.get('device')))} "
        f"({html.escape(str(info.get('backend', 'tensorflow')))} {html.escape(str(info.get('backend_version', '')))}) · "
        f"training {info.get('train_seconds', 0):.2f} s · data md5 <code>{html.escape(str(info.get('data_md5')))}</code>"
    )
    # What shapes the results; paths and tracking do not (and are not report params in dvc.yaml).
    shown = {k: v for k, v in as_dict(cfg).items() if k not in ("paths", "tracking")}
    config_yaml = html.escape(yaml.safe_dump(shown, sort_keys=False, default_flow_style=None, width=100))
    figures = "\n".join(_img(p, alt) for p, alt in images)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>softmaxlab report: {html.escape(cfg.model.name)} on {html.escape(cfg.data.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: .2em; }} .key {{ font-size: 1.15em; color: #333; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; }}
.ci {{ color: #777; font-size: .9em; }} .warn {{ background: #fff4e5; border-left: 4px solid #f0a030; padding: .6em 1em; }} .note {{ color: #777; font-size: .85em; }}
figure {{ display: inline-block; margin: .5em; vertical-align: top; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: .9em; }} pre {{ background: #f6f8fa; padding: 1em; overflow: auto; }}
</style></head><body>
<h1>softmaxlab: model <em>{html.escape(cfg.model.name)}</em> on <em>{html.escape(cfg.data.name)}</em>, seed {cfg.seed}</h1>
<p class="key">{head}</p>
{_training_warning(info)}
<p>{facts}</p>
<h2>Test metrics</h2>
{_metrics_table(metrics, cfg.evaluate.ci)}
<p class="note">Temperature T is fitted on the validation split by minimising NLL; T &gt; 1 means the
raw model was over-confident. Intervals: {cfg.evaluate.n_bootstrap} bootstrap resamples of the
{cfg.data.n_test} test samples.</p>
{_temperature_warning(metrics)}
<h2>Figures</h2>
{figures}
<h2>Configuration</h2>
<pre>{config_yaml}</pre>
</body></html>
"""


CAPTIONS = {
    "data.png": "training data coloured by class (circles: test points)",
    "training_curves.png": "training curves",
    "reliability.png": "reliability diagram and samples per confidence bin, before and after temperature scaling",
    "classwise.png": "per-class reliability curves",
    "confusion.png": "confusion matrix on the test split",
    "landscape.png": "confidence landscape over the input plane",
}


def draw_train_figures(cfg: Config, root: Path) -> None:
    fig_dir = root / cfg.paths.figures
    for name, fig in train_figures(cfg, root).items():
        save_figure(fig, fig_dir / name)


def draw_rest(
    cfg: Config, root: Path, metrics: dict[str, float], tables: dict[str, pd.DataFrame], info: dict
) -> Path:
    """Evaluate's figures and the HTML page, once draw_train_figures is done; the page's path."""
    fig_dir = root / cfg.paths.figures
    for name, fig in evaluation_figures(metrics, tables, cfg.evaluate.ci).items():
        save_figure(fig, fig_dir / name)
    images = [(fig_dir / name, caption) for name, caption in CAPTIONS.items()]
    report_path = root / cfg.paths.report
    write_text(report_path, render(cfg, metrics, info, images))
    return report_path


def draw(
    cfg: Config, root: Path, metrics: dict[str, float], tables: dict[str, pd.DataFrame], info: dict
) -> Path:
    """The figures and the HTML page under `root` (`info`: the train stage's train.json);
    returns the page's path."""
    draw_train_figures(cfg, root)
    return draw_rest(cfg, root, metrics, tables, info)


def description(cfg: Config, metrics: dict[str, float]) -> str:
    """The run's description in MLflow (the note on its page): what ran and how it did."""
    return (
        f"model {cfg.model.name} {list(cfg.model.hidden)}, {cfg.optimizer.name} lr {cfg.optimizer.lr}, "
        f"{cfg.train.epochs} epochs, data {cfg.data.name}: {evaluate.summary_line(metrics)}"
    )


# The run's logged model: calibrated probabilities, see serve_model.py.
CALIBRATED_MODEL = "calibrated"
# What the logged model's requirements pin for each train.backend.
BACKEND_PACKAGES = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib")}


def log_calibrated_model(
    tracker, run_id: str, model_path: Path, temperature: float, example: pd.DataFrame, n_classes: int
) -> str:
    """The run's model as served: softmax(logits / T) from serve_model.py (MLflow's
    "models from code"), saved under the run's artifacts as `calibrated` and registered
    as a new version of tracking.registered_model. `example` is a one-row frame of real
    inputs. Returns the new version's number.

    Saved and logged as artifacts rather than with log_model: log_model loads the model
    to check the input example, which imports Keras and TensorFlow into the report stage
    (about 7 s, in a stage that otherwise needs neither). The tests serve the logged
    model and check its answers instead."""
    import tempfile
    from importlib.metadata import version

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from softmaxlab.serving import serve_model
    from softmaxlab.tracking.store import retry_locked

    classes = prob_columns(n_classes)
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", f) for f in FEATURES]),
        outputs=Schema(
            [*(ColSpec("double", c) for c in classes), ColSpec("long", serve_model.PREDICTED_CLASS)]
        ),
    )
    # Pinned from the running versions: inferring requirements costs seconds. The backend is
    # the one the model was trained on (this process may not have it loaded: report imports
    # no Keras).
    backend_packages = BACKEND_PACKAGES[tracker.cfg.train.backend]
    reqs = [f"{p}=={version(p)}" for p in ("mlflow", "keras", *backend_packages, "numpy", "pandas")]
    with tempfile.TemporaryDirectory() as tmp, _mlflow_quiet():
        local = Path(tmp) / CALIBRATED_MODEL
        mlflow.pyfunc.save_model(
            local,
            python_model=str(Path(serve_model.__file__)),
            artifacts={serve_model.KERAS_ARTIFACT: str(model_path)},
            model_config={
                "temperature": float(temperature),
                "features": list(FEATURES),
                "classes": classes,
            },
            signature=signature,
            input_example=example,
            pip_requirements=reqs,
        )
        retry_locked(tracker.client.log_artifacts, run_id, str(local), CALIBRATED_MODEL)
    from mlflow.exceptions import MlflowException

    from softmaxlab.tracking.server import registry_refusal

    name = tracker.cfg.tracking.registered_model
    try:
        with _mlflow_quiet():
            registered = retry_locked(mlflow.register_model, f"runs:/{run_id}/{CALIBRATED_MODEL}", name)
    except MlflowException as err:
        if refused := registry_refusal(err, tracker.uri, name):
            raise refused from None
        raise
    print(
        f"report: calibrated model (T={temperature:.3f}) registered as "
        f"{tracker.cfg.tracking.registered_model} version {registered.version}"
    )
    return registered.version


@contextlib.contextmanager
def _mlflow_quiet():
    """MLflow narrates saving and registering a model ("Validating input example", a
    download progress bar for a local file, "Successfully registered model", "Created
    version"): the stage says it in one line of its own instead. Errors still raise."""
    from mlflow.utils import logging_utils

    from softmaxlab.core.processes import restored_env

    with restored_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        logging_utils.disable_logging()
        try:
            yield
        finally:
            logging_utils.enable_logging()


def record_evaluation(tracker, run_id: str, cfg: Config, root: Path, metrics: dict[str, float]) -> None:
    """Evaluate's metrics and tables, then the calibrated model (it needs the temperature)."""
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(run_id, {"mlflow.note.content": description(cfg, metrics)})
    tracker.log_artifacts(run_id, [root / cfg.paths.calibration], "calibration")
    if cfg.tracking.log_model:
        k = len(cfg.data.centers)
        example = read_split(root / cfg.paths.test_data, k)[list(FEATURES)].iloc[:1]
        with timing.phase("log model"):
            log_calibrated_model(
                tracker, run_id, root / cfg.paths.model, metrics[names.TEMPERATURE], example, k
            )


def record_report(tracker, run_id: str, cfg: Config, root: Path) -> None:
    tracker.log_artifacts(run_id, [root / cfg.paths.figures], "figures")
    tracker.log_artifacts(run_id, [root / cfg.paths.report])


def run(
    cfg: Config, root: Path, tracker=None, run_id: str | None = None, stage: bool = False,
    drawer=None, train_figures_drawn=None,
) -> Path:  # fmt: skip
    """Record evaluate's results in the run (first: they count even if drawing fails), draw
    the figures and the HTML page under `root`, and log those too.

    The figures are drawn in another process while this one records (matplotlib's rendering
    and MLflow's logging each take seconds; on two cores they overlap):
    - stage=True is `dvc repro`'s report stage (main): a process forked for it draws while
      this one imports MLflow and reopens the run train opened; the run is marked FINISHED at
      the end: report is the pipeline's last stage;
    - `drawer` (background_drawer, the in-process pipeline): its process has drawn, or is
      drawing, the train stage's figures (`train_figures_drawn`, a future) and then draws the
      rest.
    Otherwise they are drawn here, after recording."""
    from softmaxlab.tracking.tracker import reopen

    metrics, tables = evaluate.read(cfg, root)
    info_path = root / cfg.paths.train_info
    info = train_info(cfg, root) if stage or info_path.is_file() else {}
    with _drawing(in_background=stage) as submit:
        if drawer is not None:
            drawn = drawer.submit(draw_rest, cfg, root, metrics, tables, info)
        else:
            drawn = submit(draw, cfg, root, metrics, tables, info)
        with timing.phase("tracking"):
            if stage:
                tracker, run_id = reopen(cfg, info)
            if tracker:
                record_evaluation(tracker, run_id, cfg, root, metrics)
        with timing.phase("figures"):  # in the stage: what is left to wait for
            if drawer is None:
                report_path = drawn.result()
            else:
                report_path = _drawn_beside(drawn, train_figures_drawn, cfg, root, metrics, tables, info)
    if tracker:
        with timing.phase("tracking"):
            record_report(tracker, run_id, cfg, root)
            if stage:
                tracker.finish(run_id)
    return report_path


def _drawn_beside(drawn, train_figures_drawn, cfg, root, metrics, tables, info) -> Path:
    """The page the drawing process drew; should that process have died (killed, say, by
    the machine running out of memory), this process draws everything itself, and stops
    using it."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        if train_figures_drawn is not None:
            train_figures_drawn.result()
        return drawn.result()
    except BrokenProcessPool:
        _drawer[:] = [None]
        return draw(cfg, root, metrics, tables, info)


# One drawing process per process that runs in-process pipelines (a sweep's jobs one after the
# other): it draws one job's figures while that job evaluates and records.
_drawer: list = []


def warm_up() -> None:
    """The drawing process's first task: import what drawing needs while the first job trains."""
    from softmaxlab.stages import plots  # noqa: F401  (matplotlib, ~1 s)


def background_drawer():
    """The process that draws for the in-process pipeline (a ProcessPoolExecutor of one),
    started on first use, or None where no process can be started (then pipeline.run draws
    in-process). Spawned, not forked: this process may hold TensorFlow's threads by then.
    It ignores Ctrl-C (this process answers it) and ends with this process."""
    if _drawer:
        return _drawer[0]  # None once it broke: drawn in-process from then on
    import atexit
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor

    try:
        pool = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=signal.signal,
            initargs=(signal.SIGINT, signal.SIG_IGN),
        )  # fmt: skip
        pool.submit(warm_up)
    except (OSError, RuntimeError):  # no process to be had: draw in-process
        return None
    atexit.register(pool.shutdown)
    _drawer.append(pool)
    return pool


class _Later:
    """A call made when its result is asked for: in-process drawing keeps run()'s order
    (record first, then draw) with the same code as the forked one."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


@contextlib.contextmanager
def _drawing(in_background: bool):
    """submit(fn, *args) -> an object with .result(): a forked process, or a later call."""
    if not in_background:
        yield _Later
        return
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor

    # fork where there is one: nothing heavy is imported yet in the stage process (no
    # TensorFlow, no MLflow), and the child needs nothing re-imported. Elsewhere spawn.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # The drawing process ignores Ctrl-C: this one answers it, after the figure being saved
    # (atomically) is done.
    ignore_sigint = (signal.SIGINT, signal.SIG_IGN)
    with ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context(method), initializer=signal.signal, initargs=ignore_sigint
    ) as pool:
        yield pool.submit


def train_info(cfg: Config, root: Path = Path(".")) -> dict:
    return read_train_info(root / cfg.paths.train_info)


@entry_point
def main() -> None:
    """The DVC stage: run() as the pipeline's last stage; a failure is recorded in the run."""
    # Through the module by its name, not __main__'s copy: the drawing process is handed
    # `draw` by reference, and under `python -m cProfile -m softmaxlab.stages.report`
    # (bench/profile.py) __main__ is cProfile, where there is no `draw` to look up.
    from softmaxlab.stages import report
    from softmaxlab.tracking.tracker import failure_recorded

    cfg = load_params()
    with failure_recorded(cfg, "report"):
        path = report.run(cfg, Path("."), stage=True)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
