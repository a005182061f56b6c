"""The stages as `dvc repro` runs them: each stage process's start-up, imports, work and
tracking, and DVC's own time before, between and after them.

    python bench/stages.py                 # 3 rounds of `dvc repro` from clean and `dvc repro -f`
    python bench/stages.py --repeats 5

In a scratch copy of the project (bench/work/stages), each round runs `dvc repro` from a clean
workspace (a new sqlite store, an empty DVC cache) and then `dvc repro -f` (the store and
cache exist: what a person re-running the pipeline waits for), with SOFTMAXLAB_TIMINGS set:
every stage process writes where its seconds went (softmaxlab/core/timing.py). The bench
times `dvc repro` from outside and lines the stages up inside it. Medians of the rounds go to
bench/results/stages-<host>-<date>.md and .json (every round's raw records).

Columns: *start* is from the process's creation to its main() (the interpreter and the
imports at the top of the stage's modules); *imports* are the imports made after that (Keras,
MLflow, scikit-learn...); *tracking* is MLflow work in the stage's own process (the train
stage's other MLflow half runs in a process beside it and shows only as what train waits for);
*other* is the rest of the stage's own work; *exit* is the interpreter's teardown after the
record is written (the process is watched every 20 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BENCH, ENV, RESULTS, clean, machine_info, make_project, say  # noqa: E402

STAGES = ["check", "generate", "train", "evaluate", "report"]
MODES = {"clean": ["dvc", "repro"], "forced": ["dvc", "repro", "-f"]}


def one_repro(project: Path, mode: str) -> dict:
    """One `dvc repro` (from clean, or forced), timed outside; the stages' records inside."""
    if mode == "clean":
        clean(project)
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as records:
        env = dict(ENV, SOFTMAXLAB_TIMINGS=records.name)
        load = os.getloadavg()[0]
        start = time.time()
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen(MODES[mode], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
            gone = watch_children(proc)
            end = time.time()
            if proc.returncode != 0:
                log.seek(0)
                raise RuntimeError(f"{' '.join(MODES[mode])} failed:\n{log.read()[-3000:]}")
        stages = [json.loads(line) for line in Path(records.name).read_text().splitlines()]
    for rec in stages:  # when the process was last seen: its exit, after the interpreter's teardown
        rec["gone"] = gone.get(rec["pid"], rec["exit"])
    return {"mode": mode, "start": start, "end": end, "load": load, "stages": stages}


def watch_children(proc: subprocess.Popen) -> dict[int, float]:
    """pid -> the last moment (every 20 ms) each process under proc was seen alive: a stage's
    record is written at exit, but the interpreter's teardown (TensorFlow's, say) comes after."""
    import threading

    import psutil

    seen: dict[int, float] = {}

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                now = time.time()
                for child in root.children(recursive=True):
                    seen[child.pid] = now
            except psutil.Error:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    proc.wait()
    watcher.join()
    return seen


def breakdown(run: dict) -> dict[str, float]:
    """One run as named seconds: per stage start/imports/phases/other/exit, DVC's gaps."""
    out: dict[str, float] = {"total": run["end"] - run["start"]}
    previous_end, dvc = run["start"], 0.0
    for rec in run["stages"]:
        s = rec["stage"]
        gap = rec["created"] - previous_end
        out[f"dvc before {s}"] = gap
        dvc += gap
        recorded = rec["exit"] - rec["created"]
        start = rec["main"] - rec["created"]
        imports = sum(rec["imports"].values())
        phases = rec["phases"]
        out[f"{s}.teardown"] = max(rec["gone"] - rec["exit"], 0.0)
        out[f"{s}"] = recorded + out[f"{s}.teardown"]
        out[f"{s}.start"] = start
        out[f"{s}.imports"] = imports
        for pkg, secs in rec["imports"].items():
            out[f"{s}.import {pkg}"] = secs
        for name, secs in phases.items():
            out[f"{s}.{name}"] = secs
        out[f"{s}.other"] = recorded - start - imports - sum(phases.values())
        out[f"{s}.peak_rss_mib"] = rec["peak_rss_mib"]
        previous_end = max(rec["gone"], rec["exit"])
    out["dvc after the last stage"] = run["end"] - previous_end
    out["dvc"] = dvc + out["dvc after the last stage"]
    return out


def medians(runs: list[dict]) -> dict[str, float]:
    values: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for k, v in breakdown(run).items():
            values[k].append(v)
    return {k: statistics.median(v) for k, v in values.items()}


def imports_cell(m: dict[str, float], stage: str, top: int = 3) -> str:
    prefix = f"{stage}.import "
    pkgs = sorted(
        ((k[len(prefix) :], v) for k, v in m.items() if k.startswith(prefix)), key=lambda kv: -kv[1]
    )
    named = ", ".join(f"{p} {v:.2f}" for p, v in pkgs[:top] if v >= 0.05)
    return f"{m.get(f'{stage}.imports', 0):.2f}" + (f" ({named})" if named else "")


def phases_cell(m: dict[str, float], stage: str) -> str:
    skip = {"start", "imports", "other", "peak_rss_mib", "teardown"}
    names = [
        k.split(".", 1)[1] for k in m if k.startswith(f"{stage}.") and not k.startswith(f"{stage}.import")
    ]
    return ", ".join(f"{n} {m[f'{stage}.{n}']:.2f}" for n in names if n not in skip) or "—"


def table(m: dict[str, float]) -> str:
    rows = [
        "| | process s | start | imports (largest) | phases | other | exit | peak RSS |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for s in STAGES:
        if s not in m:
            continue
        rows.append(f"| DVC before {s} | {m[f'dvc before {s}']:.2f} | | | | | | |")
        rows.append(
            f"| **{s}** | {m[s]:.2f} | {m[f'{s}.start']:.2f} | {imports_cell(m, s)} | {phases_cell(m, s)} | "
            f"{m[f'{s}.other']:.2f} | {m[f'{s}.teardown']:.2f} | {m[f'{s}.peak_rss_mib']:.0f} MiB |"
        )
    rows.append(f"| DVC after the last stage | {m['dvc after the last stage']:.2f} | | | | | | |")
    stage_sum = sum(m[s] for s in STAGES if s in m)
    rows.append(
        f"| **`dvc repro`, whole** | **{m['total']:.2f}** | stages {stage_sum:.2f}, DVC {m['dvc']:.2f} | | | | | |"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (median of them); default 3")
    ap.add_argument(
        "--work", type=Path, default=BENCH / "work", help="scratch directory (default bench/work)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    info = machine_info()
    project = make_project(args.work / "stages")
    ENV["PYTHONPATH"] = str(project / "src")  # the snapshot's code, whatever happens to src/ meanwhile
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for i in range(args.repeats):
        for mode in MODES:
            run = one_repro(project, mode)
            runs[mode].append(run)
            say(
                f"round {i + 1}/{args.repeats}: dvc repro ({mode}) {run['end'] - run['start']:.1f} s, load {run['load']:.2f}"
            )
    info["loadavg_end"] = os.getloadavg()
    stem = args.out / f"stages-{info['hostname']}-{info['date'][:10]}"
    loads = {mode: [round(r["load"], 2) for r in rs] for mode, rs in runs.items()}
    md = [
        "# The stages under `dvc repro`: where each process's seconds go",
        "",
        f"{info['date']}, {info['hostname']} ({info['cpu']}, {info['cores']} cores), git {info['git_commit']}; "
        f"`python bench/stages.py --repeats {args.repeats}`; medians of {args.repeats} rounds; "
        f"load average (1 min) before each run: {loads}; at the end {tuple(round(x, 2) for x in info['loadavg_end'])}.",
        "",
        "Seconds. *start*: process creation to main() (interpreter, module-level imports); *imports*: "
        "imports after that; phases: the stage's named work (*tracking* = MLflow in this process; the "
        "train stage's other MLflow half runs beside it, tracking.beside); *other*: the rest; *exit*: the "
        "interpreter's teardown after its record (the process watched every 20 ms). "
        "DVC rows: between one stage's exit and the next one's creation (DVC hashes outputs, rewrites "
        "dvc.lock, starts the next command).",
    ]
    for mode, title in (
        ("forced", "`dvc repro -f` (store and cache exist)"),
        ("clean", "`dvc repro` from clean (new store, empty cache)"),
    ):
        md += ["", f"## {title}", "", table(medians(runs[mode]))]
    args.out.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")
    Path(f"{stem}.json").write_text(json.dumps({"machine": info, "runs": runs}, indent=1, default=str))
    print("\n".join(md))
    say(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
