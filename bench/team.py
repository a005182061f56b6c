"""Team stack bench (issue 12 item 7): logging to the team's MLflow server against local sqlite,
and DVC push / pull through its S3 remote.

    .venv/bin/python bench/team.py                 # starts its own team stack, stops it at the end
    .venv/bin/python bench/team.py --repeats 1 --sweep-repeats 0 --skip-data   # one repro pair

Rows, each pair on the same machine in the same run, interleaved (the order alternates):
  repro   `dvc repro` from clean outputs (data, models, predictions, reports, dvc.lock and the
          DVC cache removed; the local store mlflow.db kept, as a user's would be), logging to
          sqlite:///mlflow.db vs to the server (MLFLOW_TRACKING_URI from the stack's env)
  sweep   the 24-job sweep (bench/run.py's SWEEP, one process) to a sqlite store vs the server
  data    `dvc push` of a 10^6-sample data set (data.n_samples=1e6: data/{train,test}.parquet)
          to a fresh prefix of the team bucket, then `dvc pull` of it into a fresh git clone
          (empty cache): MB/s = the files' bytes / wall seconds
The load average is recorded around every measurement: the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: measure, make_project, SWEEP, interleave)

from softmaxlab.core.processes import free_port  # noqa: E402
from softmaxlab.team import stack  # noqa: E402
from softmaxlab.team.state import DEFAULT_PORTS, DVC_BUCKET  # noqa: E402
from softmaxlab.team.users import configure_dvc  # noqa: E402

RESULTS = bench.ROOT / "bench" / "results"
# Outputs a run leaves; unlike bench/run.py's clean, the local store stays (a user's would).
REPRO_OUTPUTS = ["data", "models", "predictions", "reports", "dvc.lock", ".dvc/cache", "dvc_plots"]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def measured(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    before = load()
    r = bench.measure(cmd, cwd, env, log)
    return {**r, "load_before": before, "load_after": load()}


def clean(project: Path) -> None:
    for rel in REPRO_OUTPUTS:
        p = project / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def repro_rows(work: Path, env: dict, repeats: int) -> dict:
    projects = {k: bench.make_project(work / f"proj-{k}") for k in ("sqlite", "server")}
    envs = {"sqlite": bench.ENV, "server": env}
    out = {"sqlite": [], "server": []}

    def one(kind: str):
        def step(i: int) -> None:
            clean(projects[kind])
            r = measured(["dvc", "repro"], projects[kind], envs[kind], work / "logs" / f"repro-{kind}{i}.log")
            out[kind].append(r)
            bench.say(
                f"  dvc repro -> {kind}: {r['wall']:.1f} s (load {r['load_before']} -> {r['load_after']})"
            )

        return step

    for i in range(repeats):
        for step in bench.interleave(i, one("sqlite"), one("server")):
            step(i)
    return out


def sweep_rows(work: Path, env: dict, repeats: int) -> dict:
    proj = bench.make_project(work / "proj-sweep")
    out = {"sqlite": [], "server": []}

    def one(kind: str):
        def step(i: int) -> None:
            store = [f"tracking.uri=sqlite:///{work / f'sweep{i}.db'}"] if kind == "sqlite" else []
            cmd = [sys.executable, "-m", "softmaxlab", "-m", *bench.SWEEP, *store,
                   f"hydra.sweep.dir={work / f'sweep-{kind}{i}'}"]  # fmt: skip
            r = measured(
                cmd, proj, bench.ENV if kind == "sqlite" else env, work / "logs" / f"sweep-{kind}{i}.log"
            )
            r.update(bench.sweep_summary(work / f"sweep-{kind}{i}"))
            out[kind].append(r)
            bench.say(f"  24-job sweep -> {kind}: {r['wall']:.1f} s, {r.get('finished')} finished "
                      f"(load {r['load_before']} -> {r['load_after']})")  # fmt: skip

        return step

    for i in range(repeats):
        for step in bench.interleave(i, one("sqlite"), one("server")):
            step(i)
    return out


def data_rows(work: Path, env: dict, repeats: int) -> dict:
    proj = bench.make_project(work / "proj-big", {"data.n_samples": 1_000_000, "data.n_test": 250_000})
    bench.measure(["dvc", "repro", "generate"], proj, bench.ENV, work / "logs" / "generate-1e6.log")
    files = [proj / "data" / "train.parquet", proj / "data" / "test.parquet"]
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    bench.git(proj, "add", "-A")
    bench.git(proj, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "data")
    out = {"size_mb": size_mb, "push": [], "pull": []}
    for i in range(repeats):
        # A prefix of its own each time: DVC sends nothing the remote already has.
        run_env = {**env, "SOFTMAXLAB_DVC_REMOTE": f"s3://{DVC_BUCKET}/bench-{time.time_ns()}"}
        configure_dvc(proj, run_env)
        r = measured(["dvc", "push", "generate"], proj, run_env, work / "logs" / f"push{i}.log")
        out["push"].append(r)
        clone = work / f"clone{i}"
        shutil.rmtree(clone, ignore_errors=True)
        subprocess.run(["git", "clone", "-q", str(proj), str(clone)], check=True, env=bench.ENV)
        configure_dvc(clone, run_env)
        p = measured(["dvc", "pull", "generate"], clone, run_env, work / "logs" / f"pull{i}.log")
        same = all(
            (clone / f.relative_to(proj)).read_bytes() == f.read_bytes() for f in files
        )  # the bench checks what it measured arrived whole
        out["pull"].append({**p, "identical": same})
        bench.say(f"  dvc push {size_mb:.1f} MB: {r['wall']:.1f} s ({size_mb / r['wall']:.1f} MB/s); "
                  f"dvc pull: {p['wall']:.1f} s ({size_mb / p['wall']:.1f} MB/s), identical: {same}")  # fmt: skip
    return out


def markdown(raw: dict, info: dict) -> str:
    med = bench.median
    lines = [
        f"# Team stack bench, {info['date']} ({info['host']}, git {info['git']})",
        "",
        f"Team stack: PostgreSQL 15, Ceph radosgw (BlueStore), MLflow {info['mlflow']} server with proxied S3 "
        f"artifacts, all on 127.0.0.1; `team up` from nothing took {info['team_up_s']:.1f} s in this run. "
        f"Machine: {info['cores']} cores shared with other agents' work; load average (1 min) given per row.",
        *(
            [
                f"The `dvc repro` and sweep rows come from an earlier run of this script on this machine "
                f"(git {info['previous']['git']}, `team up` {info['previous']['team_up_s']:.1f} s), the data rows "
                f"from this one."
            ]
            if "previous" in info
            else []
        ),  # fmt: skip
        "",
        "| row | local sqlite | team server | ratio (server / sqlite) | runs each | load (min-max) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, label in (("repro", "`dvc repro` from clean outputs"), ("sweep", "24-job sweep, one process")):
        if raw.get(key) and raw[key]["sqlite"] and raw[key]["server"]:
            s, v = med([r["wall"] for r in raw[key]["sqlite"]]), med([r["wall"] for r in raw[key]["server"]])
            loads = [
                x
                for r in raw[key]["sqlite"] + raw[key]["server"]
                for x in (r["load_before"], r["load_after"])
            ]
            n = len(raw[key]["sqlite"])
            lines.append(f"| {label} | {s:.1f} s | {v:.1f} s | {v / s:.2f}× | {n} ({'median' if n > 1 else 'one run'}) "
                         f"| {min(loads):.1f}-{max(loads):.1f} |")  # fmt: skip
    if raw.get("data"):
        d = raw["data"]
        for op in ("push", "pull"):
            w = med([r["wall"] for r in d[op]])
            loads = [x for r in d[op] for x in (r["load_before"], r["load_after"])]
            lines.append(f"| `dvc {op}` of the 10^6-sample data set ({d['size_mb']:.1f} MB) | | {w:.1f} s = "
                         f"{d['size_mb'] / w:.1f} MB/s | | {len(d[op])} | {min(loads):.1f}-{max(loads):.1f} |")  # fmt: skip
        lines.append("")
        lines.append(
            f"Pulled files byte-identical to the pushed ones: {all(r['identical'] for r in d['pull'])}."
        )
    lines += ["", "Raw timings: the .json beside this file. Seconds move with the machine's load; the ratios "
              "(same machine, same run, interleaved) are the result."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="dvc repro pairs (median)")
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--data-repeats", type=int, default=2)
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / f"team-{dt.date.today().isoformat()}")
    ap.add_argument(
        "--previous",
        type=Path,
        help="a .json of an earlier run on this machine: its rows are "
        "kept where this run measures none (say, --repeats 0 --sweep-repeats 0 for the data rows)",
    )
    args = ap.parse_args()
    work = bench.ROOT / "bench" / "work" / "team"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    state_dir = Path(tempfile.mkdtemp(prefix="softmaxlab-team-bench-"))  # PostgreSQL's user must reach it
    import mlflow

    info = {
        "date": dt.date.today().isoformat(), "host": os.uname().nodename, "cores": os.cpu_count(),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=bench.ROOT).stdout.strip(),
        "mlflow": mlflow.__version__,
    }  # fmt: skip
    raw: dict = {}
    # One snapshot of the code for the whole bench (as bench/run.py): every run imports
    # softmaxlab from it, so edits to src/ while the bench runs change nothing measured.
    snapshot = bench.make_project(work / "snapshot")
    bench.ENV["PYTHONPATH"] = str(snapshot / "src")
    try:
        start = time.perf_counter()
        state = stack.up(state_dir, ports={n: free_port() for n in DEFAULT_PORTS}, say=bench.say)
        info["team_up_s"] = time.perf_counter() - start
        env = {**bench.ENV, **state.env}
        if args.previous:
            previous = json.loads(args.previous.read_text())
            raw.update(previous["raw"])
            info["previous"] = previous["info"]
        if args.repeats:
            bench.say("dvc repro: sqlite vs server")
            raw["repro"] = repro_rows(work, env, args.repeats)
        if args.sweep_repeats:
            bench.say("24-job sweep: sqlite vs server")
            raw["sweep"] = sweep_rows(work, env, args.sweep_repeats)
        if not args.skip_data:
            bench.say("dvc push / pull of 10^6 samples")
            raw["data"] = data_rows(work, env, args.data_repeats)
    finally:
        stack.down(state_dir, say=bench.say)
        shutil.rmtree(state_dir, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"info": info, "raw": raw}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(raw, info))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
