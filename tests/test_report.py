"""The HTML report is one self-contained page that renders in a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from softmaxlab.core import metrics as names
from softmaxlab.core.config import as_dict

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# In CI a missing browser is a failure, not a skip (.ci/run installs it).
IN_CI = os.environ.get("CI", "").lower() == "true"


def test_report_embeds_every_figure_and_references_nothing_outside(trained):
    page = (trained["root"] / trained["cfg"].paths.report).read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert len(images) == 6
    for needle in [
        "training data",
        "training curves",
        "reliability diagram",
        "per-class",
        "confusion",
        "landscape",
    ]:
        assert any(needle in alt for alt in images), needle
    # No external resource: opened from disk, offline, it is complete.
    assert not re.search(r'(src|href)="(?!data:)', page)
    for label, _ in names.CALIBRATION.values():
        assert f"<th>{label}</th>" in page


def test_report_states_the_key_numbers(trained):
    m = trained["metrics"]
    page = (trained["root"] / trained["cfg"].paths.report).read_text()
    assert f"accuracy {m['test/accuracy']:.4f}" in page
    assert f"T = {m['test_ts/temperature']:.3f}" in page
    ece, lo, hi = m["test/ece"], m["test_ci/ece_low"], m["test_ci/ece_high"]
    assert f'{ece:.4f} <span class="ci">[{lo:.4f}, {hi:.4f}]</span>' in page
    assert trained["run_id"] in page


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(trained, tmp_path):
    from matplotlib.image import imread

    assert CHROMIUM, "CI=true but chromium is not installed (apt-get install -y chromium)"

    def screenshot(page: Path) -> np.ndarray:
        shot = tmp_path / f"{page.stem}.png"
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'prof'}", "--hide-scrollbars", "--window-size=1200,4000",
             f"--screenshot={shot}", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return imread(shot)[..., :3]

    def coloured(img: np.ndarray) -> float:
        return float((img.max(axis=2) - img.min(axis=2) > 0.3).mean())

    report = trained["root"] / trained["cfg"].paths.report
    img = screenshot(report)
    assert img.shape[0] >= 3000 and img.shape[1] >= 1000
    # The figures are drawn: the page shows far more colour than the same page without its
    # images (measured here: 0.15 of the pixels non-white with figures, ~0.03 text only).
    bare = tmp_path / "no-figures.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", report.read_text()))
    text_only = screenshot(bare)
    assert coloured(img) > 0.05 > coloured(text_only), (coloured(img), coloured(text_only))
    assert (img < 0.95).any(axis=2).mean() > 3 * (text_only < 0.95).any(axis=2).mean()
    shutil.copy(tmp_path / f"{report.stem}.png", trained["root"] / "report-screenshot.png")


def test_evaluation_is_recorded_in_the_run_even_when_drawing_fails(trained, tmp_path):
    # report records evaluate's metrics and tables before it draws anything: a figure that
    # cannot be drawn must not cost the run its test metrics.
    from softmaxlab.core.errors import UserError
    from softmaxlab.stages import report

    cfg, tracker = trained["cfg"], trained["tracker"]
    root = tmp_path / "run"
    shutil.copytree(trained["root"], root)
    (root / cfg.paths.predictions / "grid.parquet").write_bytes(b"not a parquet file")
    damaged = pytest.raises(UserError, match="grid.parquet: not a readable Parquet file")
    with damaged, tracker.run(cfg, run_name="drawing-fails") as run_id:
        report.run(cfg, root, tracker, run_id)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["test/accuracy"] == trained["metrics"]["test/accuracy"]
    assert set(names.evaluate_names()) <= set(run.data.metrics)
    artifacts = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert "calibration" in artifacts and "report.html" not in artifacts


@pytest.mark.slow
def test_report_stage_draws_under_cprofile_as_bench_profile_runs_it(trained, tmp_path):
    # `python -m cProfile -m softmaxlab.stages.report` (bench/profile.py): __main__ is cProfile's,
    # so the drawing process must get `draw` from softmaxlab.stages.report, not from __main__.
    from conftest import env_with_venv, run_cmd
    from omegaconf import OmegaConf

    root = tmp_path / "proj"
    shutil.copytree(trained["root"], root)
    params = as_dict(trained["cfg"])
    params["tracking"]["enabled"] = False  # the drawing is the point; the run is not reopened
    (root / "params.yaml").write_text(OmegaConf.to_yaml(params))
    (root / "reports" / "report.html").unlink()
    cmd = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        str(tmp_path / "report.prof"),
        "-m",
        "softmaxlab.stages.report",
    ]
    proc = run_cmd(cmd, root, env_with_venv())
    assert "report: reports/report.html" in proc.stdout and (root / "reports" / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.jax
def test_the_logged_model_requires_the_backend_it_was_trained_on(tmp_path):
    # A JAX-trained run: its model's requirements pin jax, not TensorFlow (report imports no
    # Keras, so this comes from train.backend, not from what this process has loaded).
    import mlflow
    from conftest import make_project, run_cmd, tiny_overrides
    from mlflow.tracking import MlflowClient

    project = make_project(tmp_path / "proj")
    run_cmd([sys.executable, "-m", "softmaxlab", *tiny_overrides("train.backend=jax", "tracking.log_model=true")],
            project)  # fmt: skip
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("softmaxlab").experiment_id])
    assert run.data.tags["backend"] == "jax"
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="calibrated/requirements.txt", dst_path=str(tmp_path / "m"),
        tracking_uri=uri,
    )  # fmt: skip
    pinned = {line.split("==")[0] for line in Path(path).read_text().splitlines() if "==" in line}
    assert {"jax", "jaxlib", "keras", "mlflow"} <= pinned and "tensorflow" not in pinned, pinned
