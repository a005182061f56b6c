"""Sweeps on a cluster, measured on this machine (issue 13; docs/cluster.md).

    python bench/cluster.py [--repeats 3] [--trials 6]      # as root: Ray runs in a namespace

Rows, one round each, the order rotating from round to round:
- the 24-job sweep (bench/run.py's SWEEP, the default config): in one process; on Hydra's
  joblib launcher with one worker per core; on a Ray cluster of 1 node and of 2 nodes with
  one CPU each (tools/ray_local.sh: a head, plus one worker joined with `ray start
  --address`). For Ray the sweep is timed inside the cluster; starting the cluster is
  reported beside it.
- a shared Optuna study (sweep=optuna, sqlite storage): 1 process with --trials trials, and
  2 processes started at once with --trials each: trials per minute of wall time.
The load average (1 min) before and after each run goes beside it: the machine is shared.
Writes bench/results/cluster-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run as base  # noqa: E402  (bench/run.py: scratch projects, the sweep, machine info)

ROOT = base.ROOT
RAY_LOCAL = ROOT / "tools" / "ray_local.sh"


def timed(out: Path, cmd: list[str]) -> int:
    """Run cmd, write its wall seconds and exit code to out (used inside the Ray cluster)."""
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    out.write_text(json.dumps({"wall": time.perf_counter() - start, "rc": rc}))
    return rc


def run_logged(cmd: list[str], cwd: Path, log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, cwd=cwd, env=base.ENV, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}\n{tail}")
    return wall


def sweep_variant(work: Path, proj: Path, key: str, i: int) -> dict:
    sweep_dir, db = work / f"{key}{i}", work / f"{key}{i}.db"
    for p in (sweep_dir, db):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    sweep = [sys.executable, "-m", "softmaxlab", "-m", *base.SWEEP, f"tracking.uri=sqlite:///{db}",
             f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    log = work / "logs" / f"{key}{i}.log"
    load = os.getloadavg()[0]
    if key == "inproc":
        r = {"wall": run_logged(sweep, proj, log)}
    elif key == "joblib":
        r = {"wall": run_logged([*sweep, "hydra/launcher=joblib", f"hydra.launcher.n_jobs={os.cpu_count()}"],
                                proj, log)}  # fmt: skip
    else:
        workers = {"ray1": 0, "ray2": 1}[key]
        out = work / f"{key}{i}.json"
        total = run_logged(
            [str(RAY_LOCAL), "--workers", str(workers), "--cpus", "1", "--", sys.executable, __file__,
             "timed", str(out), "--", *sweep, "launcher=ray"],
            proj, log,
        )  # fmt: skip
        inner = json.loads(out.read_text())
        if inner["rc"] != 0:
            raise RuntimeError(f"{key}: the sweep exited {inner['rc']}: see {log}")
        r = {"wall": inner["wall"], "cluster_start_and_stop": total - inner["wall"]}
    r.update(base.sweep_summary(sweep_dir), load_before=load, load_after=os.getloadavg()[0])
    return r


def optuna_variant(work: Path, proj: Path, key: str, i: int, trials: int) -> dict:
    processes = {"optuna1": 1, "optuna2": 2}[key]
    storage = work / f"{key}{i}-optuna.db"
    storage.unlink(missing_ok=True)
    env = {
        **base.ENV,
        "SOFTMAXLAB_OPTUNA_STORAGE": f"sqlite:///{storage}",
        "SOFTMAXLAB_OPTUNA_STUDY": "bench",
    }
    load = os.getloadavg()[0]
    start = time.perf_counter()
    procs = []
    for k in range(processes):
        db, sweep_dir = work / f"{key}{i}-{k}.db", work / f"{key}{i}-{k}"
        shutil.rmtree(sweep_dir, ignore_errors=True)
        db.unlink(missing_ok=True)
        log = (work / "logs" / f"{key}{i}-{k}.log").open("w")
        cmd = [sys.executable, "-m", "softmaxlab", "sweep=optuna", f"hydra.sweeper.n_trials={trials}",
               f"hydra.sweeper.sampler.seed={k}", f"tracking.uri=sqlite:///{db}", f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=proj, env=env, stdout=log, stderr=subprocess.STDOUT))
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError(f"{key}: a sweep process failed: see {work / 'logs'}")
    wall = time.perf_counter() - start
    import optuna

    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{storage}")
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    return {"wall": wall, "trials": done, "trials_per_min": done / wall * 60, "processes": processes,
            "load_before": load, "load_after": os.getloadavg()[0]}  # fmt: skip


SWEEP_ROWS = {
    "inproc": "24-job sweep, one process",
    "joblib": f"24-job sweep, joblib, {os.cpu_count()} workers",
    "ray1": "24-job sweep, Ray, 1 node x 1 CPU",
    "ray2": "24-job sweep, Ray, 2 nodes x 1 CPU",
}


def write(raw: dict, info: dict, trials: int) -> Path:
    RESULTS = BENCH / "results"
    stem = f"cluster-{dt.date.today().isoformat()}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "runs": raw}, indent=2) + "\n")

    def med(runs, key="wall"):
        return statistics.median(r[key] for r in runs) if runs else float("nan")

    lines = [
        f"# Sweeps on a cluster, {info['date']} ({info['hostname']}, {info['cpu']}, {info['cores']} cores, "
        f"commit {info['git_commit']})",
        "",
        "Shared machine: other agents' work ran at the same time; the load average (1 min) before and after",
        "each run is given. Runs interleaved, the order rotating per round; medians.",
        "",
        "| sweep | runs | wall (median) | each run | vs one process | jobs finished | load avg before→after |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    base_wall = med(raw.get("inproc", []))
    for key, what in SWEEP_ROWS.items():
        runs = raw.get(key, [])
        if not runs:
            continue
        each = ", ".join(f"{r['wall']:.0f} s" for r in runs)
        if key.startswith("ray"):
            each += (
                " (+ cluster start/stop "
                + ", ".join(f"{r['cluster_start_and_stop']:.0f} s" for r in runs)
                + ")"
            )
        loads = ", ".join(f"{r['load_before']:.1f}→{r['load_after']:.1f}" for r in runs)
        finished = ", ".join(str(r.get("finished")) for r in runs)
        lines.append(f"| {what} | {len(runs)} | {med(runs):.0f} s | {each} | {med(runs) / base_wall:.2f}x | "
                     f"{finished} | {loads} |")  # fmt: skip
    if raw.get("ray1") and raw.get("ray2"):
        lines += ["", f"Ray scaling, 2 nodes vs 1: {med(raw['ray2']) / med(raw['ray1']):.2f}x the wall time."]
    lines += [
        "",
        f"Shared Optuna study (sweep=optuna, sqlite storage, default config), {trials} trials per process:",
        "",
        "| processes | runs | trials | wall (median) | trials/min (median) | each run | load avg before→after |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for key in ("optuna1", "optuna2"):
        runs = raw.get(key, [])
        if runs:
            each = ", ".join(f"{r['trials']} in {r['wall']:.0f} s" for r in runs)
            loads = ", ".join(f"{r['load_before']:.1f}→{r['load_after']:.1f}" for r in runs)
            lines.append(f"| {runs[0]['processes']} | {len(runs)} | {runs[0]['trials']} | {med(runs):.0f} s | "
                         f"{med(runs, 'trials_per_min'):.1f} | {each} | {loads} |")  # fmt: skip
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "timed":
        sys.exit(timed(Path(sys.argv[2]), sys.argv[sys.argv.index("--") + 1 :]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--only", nargs="*", help="run only these rows (inproc joblib ray1 ray2 optuna1 optuna2)")
    args = ap.parse_args()
    work = BENCH / "work" / "cluster"
    work.mkdir(parents=True, exist_ok=True)
    proj = base.make_project(work / "proj")
    info = base.machine_info()
    keys = args.only or ["ray2", "optuna2", "inproc", "ray1", "joblib", "optuna1"]
    raw: dict = {k: [] for k in keys}
    for i in range(args.repeats):
        order = keys[i % len(keys) :] + keys[: i % len(keys)]
        for key in order:
            if key.startswith("optuna"):
                r = optuna_variant(work, proj, key, i, args.trials)
                base.say(f"{key} {i + 1}/{args.repeats}: {r['trials']} trials in {r['wall']:.0f} s")
            else:
                r = sweep_variant(work, proj, key, i)
                base.say(f"{key} {i + 1}/{args.repeats}: {r['wall']:.0f} s, {r.get('finished')} finished")
            raw[key].append(r)
            write(raw, info, args.trials)  # after every run: an interrupted bench still reports
    print(write(raw, info, args.trials).read_text())


if __name__ == "__main__":
    main()
