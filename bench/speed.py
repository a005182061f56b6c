"""`python bench/speed.py`: the speed table of the pipeline against the tutorial's own script.

One invocation measures every row side by side, on this machine, in the same minutes:

1. `dvc repro -f` at the default config (the store and DVC cache exist) vs the tutorial's
   script (one whole process);
2. `dvc repro` from a clean workspace (no outputs, no store, empty cache) vs the same;
3. `dvc repro` from clean with `train.backend=jax` vs the same (the tutorial on TensorFlow);
4. 10^6 samples end to end, tracked, in one process (`python -m softmaxlab`, batch 1024, 5 epochs,
   `evaluate.n_bootstrap=200`) vs the tutorial's script at the same size (make_blobs + fit +
   evaluate), with the peak RSS of each;
5. the 24-job in-process sweep (`python -m softmaxlab -m model=seed,tiny,wide,deep
   optimizer.lr=0.001,0.003,0.01 seed=0,1`) vs 24 × the median tutorial process of rows 1-3.

Each round runs the tutorial and ours in alternating order (A B, then B A); every figure is the
median of the rounds; the 1-minute load average is recorded before every measured run. Single-row
serving is measured by bench/serve.py (its own rounds and baseline).

    python bench/speed.py                  # 3 rounds (about 20 minutes on 2 cores)
    python bench/speed.py --repeats 1 --skip sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    BENCH,
    ENV,
    RESULTS,
    SWEEP,
    SWEEP_JOBS,
    clean,
    interleave,
    machine_info,
    make_project,
    measure,
    median,
    say,
    sweep_summary,
    tutorial_cmd,
    tutorial_env,
)

N_BIG = 1_000_000
BIG = {"data.n_samples": N_BIG, "data.n_test": N_BIG // 4, "train.batch_size": 1024, "train.epochs": 5,
       "evaluate.n_bootstrap": 200}  # fmt: skip


def timed(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> dict:
    load = os.getloadavg()[0]
    return {**measure(cmd, cwd, env=env, log=log), "load": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (median of them); default 3")
    ap.add_argument(
        "--skip", default="", help="comma-separated rows to skip: seed (rows 1-3), jax, big, sweep"
    )
    ap.add_argument(
        "--work", type=Path, default=BENCH / "work", help="scratch directory (default bench/work)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    info = machine_info()
    work, logs = args.work / "speed", args.work / "speed" / "logs"
    if work.exists():
        shutil.rmtree(work)
    proj = make_project(work / "proj")
    ENV["PYTHONPATH"] = str(proj / "src")  # the snapshot's code, whatever happens to src/ meanwhile
    jax = None if "jax" in skip else make_project(work / "jax", {"train.backend": "jax"}, source=proj)
    big = None if "big" in skip else make_project(work / "big", BIG, source=proj)
    raw: dict[str, list[dict]] = {
        k: [] for k in ("tutorial", "forced", "clean", "jax", "big", "tutorial_big", "sweep")
    }

    def ours(i: int) -> None:
        clean(proj)
        raw["clean"].append(timed(["dvc", "repro"], proj, logs / f"clean{i}.log"))
        raw["forced"].append(timed(["dvc", "repro", "-f"], proj, logs / f"forced{i}.log"))
        msg = f"  ours: dvc repro from clean {raw['clean'][-1]['wall']:.1f} s, -f {raw['forced'][-1]['wall']:.1f} s"
        if jax:
            clean(jax)
            raw["jax"].append(timed(["dvc", "repro"], jax, logs / f"jax{i}.log"))
            msg += f", jax from clean {raw['jax'][-1]['wall']:.1f} s"
        say(msg)

    def tutorial(i: int) -> None:
        raw["tutorial"].append(timed(tutorial_cmd(), BENCH, logs / f"tutorial{i}.log", tutorial_env()))
        say(
            f"  tutorial: {raw['tutorial'][-1]['wall']:.1f} s (fit {raw['tutorial'][-1]['fit_seconds']:.1f} s)"
        )

    def ours_big(i: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "softmaxlab",
            *(f"{k}={v}" for k, v in BIG.items()),
            f"hydra.run.dir=outputs/big{i}",
        ]
        raw["big"].append(timed(cmd, big, logs / f"big{i}.log"))
        say(
            f"  ours 10^6 in-process: {raw['big'][-1]['wall']:.1f} s, peak {raw['big'][-1]['peak_mib']:.0f} MiB"
        )

    def tutorial_big(i: int) -> None:
        # The plain script as a person would time it: no progress bar (verbose=0). With the
        # tutorial's verbose=1, its evaluate alone draws 7,813 progress updates at 10^6 rows.
        env = tutorial_env(n_samples=N_BIG, n_test=N_BIG // 4, batch_size=1024, epochs=5, verbose=0)
        raw["tutorial_big"].append(timed(tutorial_cmd(), BENCH, logs / f"tutorial_big{i}.log", env))
        r = raw["tutorial_big"][-1]
        say(f"  tutorial 10^6: {r['wall']:.1f} s, peak {r['peak_mib']:.0f} MiB")

    for i in range(args.repeats):
        say(f"round {i + 1}/{args.repeats}")
        if "seed" not in skip:
            for step in interleave(i, ours, tutorial):
                step(i)
        if big:
            for step in interleave(i, ours_big, tutorial_big):
                step(i)
        if "sweep" not in skip:
            sweep_dir, db = work / f"sweep{i}", work / f"sweep{i}.db"
            cmd = [sys.executable, "-m", "softmaxlab", "-m", *SWEEP, f"tracking.uri=sqlite:///{db}",
                   f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
            raw["sweep"].append({**timed(cmd, proj, logs / f"sweep{i}.log"), **sweep_summary(sweep_dir)})
            say(
                f"  sweep: {raw['sweep'][-1]['wall']:.1f} s, {raw['sweep'][-1].get('finished')} jobs finished"
            )
    info["loadavg_end"] = os.getloadavg()
    write(args, info, raw)
    return 0


def row(name: str, ours: list[dict], base: list[dict], scale: float = 1.0, base_note: str = "") -> dict:
    o, b = median([r["wall"] for r in ours]), scale * median([r["wall"] for r in base])
    loads = sorted(r["load"] for r in ours + base)
    return {
        "row": name, "ours_s": round(o, 2), "baseline_s": round(b, 2), "ratio": round(o / b, 3),
        "ours_runs": [round(r["wall"], 2) for r in ours], "baseline_runs": [round(r["wall"], 2) for r in base],
        "load": [round(loads[0], 2), round(loads[-1], 2)], "baseline_note": base_note,
        "ours_peak_mib": max((r["peak_mib"] or 0) for r in ours), "baseline_peak_mib": max((r["peak_mib"] or 0) for r in base),
    }  # fmt: skip


def write(args, info: dict, raw: dict) -> None:
    rows = []
    if raw["forced"]:
        rows.append(row("`dvc repro -f`, default config", raw["forced"], raw["tutorial"]))
        rows.append(row("`dvc repro` from clean", raw["clean"], raw["tutorial"]))
    if raw["jax"]:
        rows.append(row("`dvc repro` from clean, `train.backend=jax`", raw["jax"], raw["tutorial"]))
    if raw["big"]:
        rows.append(
            row("10^6 samples, tracked, in-process", raw["big"], raw["tutorial_big"], base_note="verbose=0")
        )
    if raw["sweep"]:
        rows.append(
            row(
                "24-job in-process sweep",
                raw["sweep"],
                raw["tutorial"],
                SWEEP_JOBS,
                "24 × the median tutorial process",
            )
        )
    stem = args.out / f"speed-{info['hostname']}-{info['date'][:10]}"
    for n in range(2, 100):  # a second run on the same day keeps the first one's files
        if not Path(f"{stem}.json").exists():
            break
        stem = args.out / f"speed-{info['hostname']}-{info['date'][:10]}-{n}"
    md = [
        "# Speed: the pipeline against the tutorial's script",
        "",
        f"{info['date']}, {info['hostname']} ({info['cpu']}, {info['cores']} cores), git {info['git_commit']}; "
        f"`python bench/speed.py --repeats {args.repeats}{' --skip ' + args.skip if args.skip else ''}`; "
        f"medians of {args.repeats} rounds, ours and the tutorial alternating; "
        f"load average at the start {tuple(round(x, 2) for x in info['loadavg_start'])}, "
        f"at the end {tuple(round(x, 2) for x in info['loadavg_end'])}.",
        "",
        "| row | ours | tutorial script | ratio | load (1 min) over the row's runs | peak RSS, ours / tutorial |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        base = f"{r['baseline_s']:.1f} s" + (f" ({r['baseline_note']})" if r["baseline_note"] else "")
        md.append(
            f"| {r['row']} | {r['ours_s']:.1f} s | {base} | {r['ratio']:.2f}× | {r['load'][0]:.2f}-{r['load'][1]:.2f} | "
            f"{r['ours_peak_mib']:.0f} / {r['baseline_peak_mib']:.0f} MiB |"
        )
    md += [
        "",
        "Every run's seconds: "
        + "; ".join(f"{r['row']}: ours {r['ours_runs']}, tutorial {r['baseline_runs']}" for r in rows),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")
    Path(f"{stem}.json").write_text(
        json.dumps({"machine": info, "rows": rows, "raw": raw}, indent=1, default=str)
    )
    print("\n".join(md))
    say(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
