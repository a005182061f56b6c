"""Where the seconds of a full `dvc repro` (seed config) go, stage by stage.

    python bench/profile.py            # writes bench/results/profile-<host>-<date>.txt (.prof files in bench/work)
    python bench/profile.py --py-spy   # also a py-spy flame graph of the train stage (svg)

In a scratch copy of the project (bench/work/profile), from a clean workspace:
1. `dvc repro` once, timed, then each stage's own process timed (the difference is DVC's own
   cost: hashing, lock file, its start-up);
2. each stage under `python -X importtime` (import cost per top-level package);
3. each stage under cProfile (top functions by cumulative time, plus our own functions);
4. optionally the train stage under py-spy (native frames off), as an SVG flame graph.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import pstats
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ENV, RESULTS, STAGES, clean, make_project  # noqa: E402

BENCH = Path(__file__).resolve().parent
TOP = 25
# Top-level packages whose import cost is worth naming.
WATCH = ["tensorflow", "keras", "mlflow", "sklearn", "matplotlib", "pandas", "pyarrow", "scipy", "numpy",
         "hydra", "omegaconf", "sqlalchemy", "alembic", "softmaxlab", "PIL", "google", "h5py", "ml_dtypes"]  # fmt: skip


def run(cmd: list[str], cwd: Path, stderr=subprocess.PIPE) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{(proc.stderr or '')[-3000:]}")
    return wall, proc


def import_times(stderr: str) -> dict[str, float]:
    """Cumulative import seconds per top-level package, from -X importtime (first import only:
    nested packages are counted inside the top-level one that pulled them in)."""
    out: dict[str, float] = defaultdict(float)
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if not m:
            continue
        cumulative, indent, name = int(m.group(2)), len(m.group(3)), m.group(4)
        if indent == 1:  # a top-level import statement of the stage's process
            out[name.split(".")[0]] += cumulative / 1e6
    return dict(out)


def ours(stats: pstats.Stats) -> list[tuple[float, str]]:
    """Cumulative seconds of softmaxlab's own functions and of a few named framework calls."""
    named = ("log_model", "savefig", "fit", "save", "infer_signature", "start_run", "connect", "to_parquet",
             "read_parquet", "bootstrap", "ensure_experiment")  # fmt: skip
    rows = []
    for (fname, line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        if "softmaxlab" in fname or (func in named and ("mlflow" in fname or "matplotlib" in fname)):
            short = fname.split("site-packages/")[-1].split("src/")[-1]
            rows.append((ct, f"{short}:{line}({func})"))
    rows.sort(reverse=True)
    return rows[:TOP]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--py-spy", action="store_true", help="also record the train stage with py-spy (SVG)")
    ap.add_argument("--work", type=Path, default=BENCH / "work")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    host, date = socket.gethostname(), dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    proj = make_project(args.work / "profile")
    ENV["PYTHONPATH"] = str(proj / "src")  # profile this snapshot of src/, not later edits
    py = sys.executable
    lines = [f"# Where a full `dvc repro` goes (seed config) — {host}, {date}", ""]

    clean(proj)
    repro_wall, _ = run(["dvc", "repro"], proj)
    stage_wall = {}
    clean(proj)
    for s in STAGES:
        stage_wall[s], _ = run([py, "-m", f"softmaxlab.stages.{s}"], proj)
    lines.append(f"dvc repro from clean: {repro_wall:.2f} s; the same stages as plain processes: "
                 + ", ".join(f"{s} {t:.2f} s" for s, t in stage_wall.items())
                 + f" = {sum(stage_wall.values()):.2f} s; so DVC itself ~{repro_wall - sum(stage_wall.values()):.2f} s")  # fmt: skip
    lines.append("")

    imports = {}
    clean(proj)
    for s in STAGES:
        _, proc = run([py, "-X", "importtime", "-m", f"softmaxlab.stages.{s}"], proj)
        imports[s] = import_times(proc.stderr)
    lines.append("## Import time per stage (python -X importtime, cumulative s per top-level package)")
    lines.append("")
    for s in STAGES:
        top = sorted(imports[s].items(), key=lambda kv: -kv[1])
        total = sum(v for _, v in top)
        shown = ", ".join(f"{k} {v:.2f}" for k, v in top if v >= 0.05 or k in WATCH[:4])
        lines.append(
            f"- {s}: {total:.2f} s of imports ({total / stage_wall[s]:.0%} of the stage's {stage_wall[s]:.2f} s): {shown}"
        )
    lines.append("")

    clean(proj)
    for s in STAGES:
        prof = args.work / "profile-stats" / f"{s}.prof"  # binary: kept out of results/
        prof.parent.mkdir(parents=True, exist_ok=True)
        wall, _ = run([py, "-m", "cProfile", "-o", str(prof), "-m", f"softmaxlab.stages.{s}"], proj)
        stats = pstats.Stats(str(prof))
        buf = io.StringIO()
        stats.stream = buf
        stats.sort_stats("cumulative").print_stats(TOP)
        body = buf.getvalue()
        body = body[body.find("   ncalls") :] if "   ncalls" in body else body
        lines.append(f"## Stage {s}: {wall:.2f} s under cProfile ({stage_wall[s]:.2f} s without)")
        lines.append("")
        lines.append("Our functions and named framework calls, cumulative seconds:")
        for ct, name in ours(stats):
            lines.append(f"  {ct:8.3f}  {name}")
        lines.append("")
        lines.append(f"Top {TOP} by cumulative time:")
        lines.append(body.rstrip())
        lines.append("")

    if args.py_spy:
        spy = Path(sys.executable).parent / "py-spy"
        svg = args.out / f"profile-train-{host}-{date}.svg"
        clean(proj)
        for s in STAGES[:1]:
            run([py, "-m", f"softmaxlab.stages.{s}"], proj)
        try:
            run([str(spy), "record", "-o", str(svg), "--", py, "-m", "softmaxlab.stages.train"], proj)
            lines.append(f"py-spy flame graph of the train stage: {svg.name}")
        except (RuntimeError, OSError) as err:
            lines.append(f"py-spy failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")

    text = "\n".join(lines) + "\n"
    path = args.out / f"profile-{host}-{date}.txt"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")
    shutil.rmtree(proj, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
