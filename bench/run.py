"""`make bench`: softmaxlab against the tutorial's own script, on this machine.

Every measured thing is a fresh subprocess timed by wall clock from outside
(time.perf_counter around subprocess.run), repeated and summarised by its median, with ours
and the baseline's runs interleaved (A B B A A B ...) so that noise from a shared machine
falls on both sides. See bench/README.md for what each row means.

    python bench/run.py                 # full suite (about 15-20 minutes on 2 cores)
    python bench/run.py --quick         # 1 repeat, no 1e6 row (a few minutes)
    python bench/run.py --repeats 5 --sweep-repeats 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
BASELINE = BENCH / "tutorial_baseline.py"
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None
GIB = 1024**3

# What the scratch project needs to run `dvc repro` on its own.
PROJECT_FILES = ["dvc.yaml", "params.yaml", "conf", "src", ".dvc/config", ".dvcignore", ".gitignore"]
# Everything a run leaves behind; removed before each measured run so each starts alike
# (the DVC cache included: nothing may be restored from it).
OUTPUTS = ["data", "models", "predictions", "reports", "dvc.lock", "mlflow.db", "mlruns", "mlartifacts",
           "outputs", "dvc_plots", ".dvc/cache"]  # fmt: skip
STAGES = ["generate", "train", "evaluate", "report"]
SWEEP = ["model=seed,tiny,wide,deep", "optimizer.lr=0.001,0.003,0.01", "seed=0,1"]
SWEEP_JOBS = 4 * 3 * 2
SEED = 42  # params.yaml's seed: the baseline gets the very same make_blobs data

# Row a, ours: the default config composed from params.yaml, data from generate(), then the
# pure training function (no files, no MLflow); its in-process train_seconds is compared
# with the tutorial's in-process model.fit time.
OURS_TRAIN = r"""
import json, numpy as np
from softmaxlab.core.config import load_params
from softmaxlab.stages.generate import generate
from softmaxlab.model.training import train
cfg = load_params("params.yaml")
train_df, test_df = generate(cfg.data)
r = train(cfg, train_df, test_df)
t = r.predictions["test"]
k = len(cfg.data.centers)
acc = float((t[[f"p{i}" for i in range(k)]].to_numpy().argmax(1) == t["label"].to_numpy()).mean())
print("BENCH " + json.dumps({"train_seconds": r.train_seconds, "test_accuracy": acc, "device": r.device}))
"""


# --------------------------------------------------------------------------- running things


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)  # ours must log to the scratch project's own store
    env.setdefault("PYTHONHASHSEED", "0")
    return env


ENV = bench_env()


def measure(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, log: Path | None = None) -> dict:
    """Run cmd once; wall seconds (perf_counter around subprocess.run), peak RSS, the
    `BENCH {json}` line it printed, if any. stdout/stderr go to a log file (not a terminal)."""
    env = env or ENV
    log = log or Path(tempfile.mktemp(prefix="bench-", suffix=".log"))
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_kb = None
    with open(log, "w") as out:
        if GNU_TIME:
            with tempfile.NamedTemporaryFile("r", suffix=".rss", delete=False) as tf:
                rss_file = tf.name
            full = [GNU_TIME, "-f", "%M", "-o", rss_file, *cmd]
            start = time.perf_counter()
            proc = subprocess.run(full, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - start
            try:
                peak_kb = int(Path(rss_file).read_text().strip().splitlines()[-1])
            except (ValueError, IndexError):
                peak_kb = None
            os.unlink(rss_file)
        else:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
            peak_kb = _poll_peak(proc)
            wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-30:])
        raise RuntimeError(f"command failed (rc={proc.returncode}): {' '.join(cmd)} in {cwd}\n{tail}")
    payload = {}
    for line in text.splitlines():
        if line.startswith("BENCH "):
            payload = json.loads(line[len("BENCH ") :])
    return {"wall": wall, "peak_mib": None if peak_kb is None else peak_kb / 1024, **payload}


def _poll_peak(proc: subprocess.Popen) -> int | None:
    """Peak RSS in KB of the largest process in proc's tree (what GNU time's %M reports),
    sampled every 20 ms: the fallback where /usr/bin/time is missing."""
    try:
        import psutil
    except ImportError:
        proc.wait()
        return None
    peak = 0
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        proc.wait()
        return None
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                peak = max(peak, p.memory_info().rss // 1024)
        except psutil.Error:
            pass
        time.sleep(0.02)
    return peak


def tutorial_cmd() -> list[str]:
    return [sys.executable, str(BASELINE)]


def tutorial_env(**over: int) -> dict[str, str]:
    env = dict(ENV, TUTORIAL_BENCH="1", TUTORIAL_SEED=str(SEED))
    env.update({f"TUTORIAL_{k.upper()}": str(v) for k, v in over.items()})
    return env


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def interleave(i: int, a, b) -> list:
    """A B on even rounds, B A on odd ones: each side goes first equally often."""
    return [a, b] if i % 2 == 0 else [b, a]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- scratch projects


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=ENV)


def make_project(dest: Path, params_update: dict | None = None, source: Path = ROOT) -> Path:
    """A copy of the project that `dvc repro` can run in: its own git repo and DVC cache."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in PROJECT_FILES:
        src, dst = source / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    if params_update:
        import yaml

        params = yaml.safe_load((dest / "params.yaml").read_text())
        for dotted, value in params_update.items():
            node = params
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench scratch")
    return dest


def clean(project: Path) -> None:
    for rel in OUTPUTS:
        p = project / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# --------------------------------------------------------------------------- the rows


def seed_rows(work: Path, repeats: int, raw: dict) -> None:
    """Rows a, b, d: one round = tutorial script, our training, full `dvc repro` from a clean
    workspace, then a no-op `dvc repro`; the order of ours and the tutorial alternates."""
    proj = work / "proj"
    logs = work / "logs"
    raw.update(tutorial=[], ours_train=[], repro=[], noop=[])

    def ours(i: int) -> None:
        raw["ours_train"].append(
            measure([sys.executable, "-c", OURS_TRAIN], ROOT, log=logs / f"ours_train{i}.log")
        )
        clean(proj)
        raw["repro"].append(measure(["dvc", "repro"], proj, log=logs / f"repro{i}.log"))
        raw["noop"].append(measure(["dvc", "repro"], proj, log=logs / f"noop{i}.log"))
        say(
            f"  ours: train {raw['ours_train'][-1]['train_seconds']:.2f} s (process "
            f"{raw['ours_train'][-1]['wall']:.1f} s), dvc repro {raw['repro'][-1]['wall']:.1f} s, "
            f"no-op {raw['noop'][-1]['wall']:.2f} s"
        )

    def tutorial(i: int) -> None:
        r = measure(tutorial_cmd(), ROOT, env=tutorial_env(), log=logs / f"tutorial{i}.log")
        raw["tutorial"].append(r)
        say(
            f"  tutorial: fit {r['fit_seconds']:.2f} s, process {r['wall']:.1f} s, accuracy {r['test_accuracy']:.4f}"
        )

    for i in range(repeats):
        say(f"seed config, round {i + 1}/{repeats}")
        for step in interleave(i, ours, tutorial):
            step(i)


def sweep_rows(work: Path, repeats: int, raw: dict, parallel: bool = True) -> None:
    """Row c: the 24-job Hydra sweep in one process, from the scratch project; row c2 (with
    `parallel`): the same sweep on Hydra's joblib launcher, one worker per core."""
    proj = work / "proj"
    variants = {"sweep": []}
    if parallel:
        variants["sweep_joblib"] = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={os.cpu_count()}"]
    for key in variants:
        raw[key] = []
    for i in range(repeats):
        for key, extra_args in interleave(i, *variants.items()) if parallel else variants.items():
            db = work / f"{key}{i}.db"
            sweep_dir = work / f"{key}{i}"
            for p in (db, sweep_dir):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            cmd = [
                sys.executable,
                "-m",
                "softmaxlab",
                "-m",
                *SWEEP,
                *extra_args,
                f"tracking.uri=sqlite:///{db}",
                f"hydra.sweep.dir={sweep_dir}",
            ]
            r = measure(cmd, proj, log=work / "logs" / f"{key}{i}.log")
            r.update(sweep_summary(sweep_dir), workers=os.cpu_count() if extra_args else 1)
            raw[key].append(r)
            say(
                f"{key} {i + 1}/{repeats}: {r['wall']:.1f} s, {r.get('finished')} jobs finished, "
                f"min test accuracy {r.get('min_test_accuracy')}"
            )


def sweep_summary(sweep_dir: Path) -> dict:
    import csv

    path = sweep_dir / "summary.csv"
    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open()))
    col = "test_accuracy" if rows and "test_accuracy" in rows[0] else "accuracy"  # summary.csv says accuracy
    accs = [float(r[col]) for r in rows if r.get(col) not in (None, "", "nan")]
    return {
        "finished": sum(1 for r in rows if r.get("status") == "FINISHED"),
        "min_test_accuracy": min(accs) if accs else None,
    }


SCALE_PARAMS = {"train.batch_size": 1024, "train.epochs": 5, "evaluate.n_bootstrap": 200}


def scaling_rows(work: Path, sizes: list[int], repeats: int, raw: dict) -> None:
    """Row e: `dvc repro` from a clean workspace (wall time, peak RSS of the largest process),
    plus once per size each stage alone, for the breakdown; the tutorial script at the same size."""
    raw["scaling"] = {}
    for n in sizes:
        raw["scaling"][str(n)] = scaling_size(work, n, repeats)


def scaling_size(work: Path, n: int, repeats: int) -> dict:
    n_test = n // 4
    proj = make_project(
        work / f"scale-{n}",
        {"data.n_samples": n, "data.n_test": n_test, **SCALE_PARAMS},
        source=work / "proj",
    )
    entry: dict = {"ours": [], "tutorial": []}
    logs = work / "logs" / f"scale-{n}"

    def ours(i: int) -> None:
        clean(proj)
        whole = measure(["dvc", "repro"], proj, log=logs / f"repro{i}.log")
        metrics = json.loads((proj / "reports" / "metrics.json").read_text())
        acc = metrics.get("test_accuracy", metrics.get("accuracy"))
        rec = {"wall": whole["wall"], "peak_mib": whole["peak_mib"], "test_accuracy": acc}
        msg = f"  ours n={n}: {whole['wall']:.1f} s, peak {whole['peak_mib'] or 0:.0f} MiB"
        if i == 0:
            # Once per size, where the seconds go: each stage on its own (`dvc repro -s`, so
            # each pays DVC's start-up again; the row's figure is the whole `dvc repro`).
            clean(proj)
            rec["stages"] = {
                s: measure(["dvc", "repro", "-s", s], proj, log=logs / f"{s}{i}.log") for s in STAGES
            }
            msg += " (per stage: " + ", ".join(f"{k} {v['wall']:.1f}" for k, v in rec["stages"].items()) + ")"
        entry["ours"].append(rec)
        say(msg)

    def tutorial(i: int) -> None:
        env = tutorial_env(n_samples=n, n_test=n_test, batch_size=1024, epochs=5)
        r = measure(tutorial_cmd(), ROOT, env=env, log=logs / f"tutorial{i}.log")
        entry["tutorial"].append(r)
        say(f"  tutorial n={n}: {r['wall']:.1f} s (fit {r['fit_seconds']:.1f}), peak {r['peak_mib']:.0f} MiB")

    for i in range(repeats):
        say(f"scaling n={n:.0e}, round {i + 1}/{repeats}")
        for step in interleave(i, ours, tutorial):
            step(i)
    return entry


# --------------------------------------------------------------------------- reporting


def _min_acc(runs: list[dict]) -> str:
    accs = [r["min_test_accuracy"] for r in runs if r.get("min_test_accuracy") is not None]
    return f"{min(accs):.4f}" if accs else "n/a"


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    versions = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m, json; print(json.dumps("
         "{p: m.version(p) for p in ['tensorflow', 'keras', 'mlflow', 'dvc', 'hydra-core', 'numpy', 'scikit-learn']}))"],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "conf", "dvc.yaml", "params.yaml"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()  # fmt: skip
        commit += " (+ uncommitted changes in src/conf)" if dirty else ""
    except OSError:
        commit = "unknown"
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": json.loads(versions.stdout or "{}"),
        "git_commit": commit,
        "gnu_time": bool(GNU_TIME),
        "loadavg_start": os.getloadavg(),
    }


def fmt_s(x: float | None) -> str:
    return "n/a" if x is None or x != x else (f"{x:.2f} s" if x < 100 else f"{x:.0f} s")


def verdict(ok: bool | None, detail: str = "") -> str:
    word = "n/a" if ok is None else ("**met**" if ok else "**missed**")
    return f"{word} ({detail})" if detail else word


def summarise(raw: dict, args, cores: int) -> tuple[list[dict], dict]:
    rows, extra = [], {}
    tut_fit = median([r["fit_seconds"] for r in raw["tutorial"]])
    tut_wall = median([r["wall"] for r in raw["tutorial"]])
    ours_train = median([r["train_seconds"] for r in raw["ours_train"]])
    acc_ours = median([r["test_accuracy"] for r in raw["ours_train"]])
    acc_tut = median([r["test_accuracy"] for r in raw["tutorial"]])
    ratio = ours_train / tut_fit
    rows.append({
        "key": "a", "what": "a. training, seed config (in-process fit time)",
        "ours": ours_train, "base": tut_fit, "ratio": ratio, "target": "≤ 0.125× (≥ 8× faster)",
        "met": ratio <= 1 / 8,
        "note": f"test accuracy ours {acc_ours:.4f}, tutorial {acc_tut:.4f} (both must be ≥ 0.99: "
                f"{'yes' if min(acc_ours, acc_tut) >= 0.99 else 'NO'}); ours' process "
                f"{fmt_s(median([r['wall'] for r in raw['ours_train']]))} in all",
    })  # fmt: skip
    repro = median([r["wall"] for r in raw["repro"]])
    rows.append({
        "key": "b", "what": "b. `dvc repro` from clean vs one tutorial-script process",
        "ours": repro, "base": tut_wall, "ratio": repro / tut_wall, "target": "≤ 1.0×",
        "met": repro / tut_wall <= 1.0,
        "note": "clean = outputs, dvc.lock, mlflow.db, mlruns and .dvc/cache deleted; "
                f"peak RSS ours {median([r['peak_mib'] or 0 for r in raw['repro']]):.0f} MiB (largest process), "
                f"tutorial {median([r['peak_mib'] or 0 for r in raw['tutorial']]):.0f} MiB",
    })  # fmt: skip

    def sweep_row(key: str, what: str, runs: list[dict], target: str, met, setup: str) -> dict:
        wall, base24 = median([r["wall"] for r in runs]), SWEEP_JOBS * tut_wall
        return {
            "key": key, "what": what, "ours": wall, "base": base24, "ratio": wall / base24,
            "target": target, "met": met(wall / base24),
            "note": f"{setup}; sweep runs: {len(runs)}, jobs finished per run "
                    f"{[r.get('finished') for r in runs]}, min test accuracy {_min_acc(runs)}",
        }  # fmt: skip

    if raw.get("sweep"):
        rows.append(sweep_row(
            "c", f"c. {SWEEP_JOBS}-job sweep, one process vs {SWEEP_JOBS} tutorial processes", raw["sweep"],
            "≤ 0.1×", lambda ratio: ratio <= 0.1,
            f"baseline = {SWEEP_JOBS} × median tutorial process of row b (not run {SWEEP_JOBS} times)",
        ))  # fmt: skip
    if raw.get("sweep_joblib"):
        # results written before runs recorded it: n_jobs was the machine's core count
        workers = raw["sweep_joblib"][0].get("workers") or cores
        rows.append(sweep_row(
            "c2", f"c2. the same sweep, joblib launcher ({workers} workers)", raw["sweep_joblib"],
            "— (row c's target)", lambda ratio: None,
            f"`hydra/launcher=joblib hydra.launcher.n_jobs={workers}`; baseline as row c",
        ))  # fmt: skip
    noop = median([r["wall"] for r in raw["noop"]])
    rows.append({
        "key": "d", "what": "d. no-op `dvc repro` (after a full one)",
        "ours": noop, "base": None, "ratio": None, "target": "≤ 3 s", "met": noop <= 3.0, "note": "",
    })  # fmt: skip
    scaling = raw.get("scaling", {})
    for n_str, entry in scaling.items():
        n = int(n_str)
        ours = median([r["wall"] for r in entry["ours"]])
        base = median([r["wall"] for r in entry["tutorial"]])
        peak = median([r["peak_mib"] for r in entry["ours"]])
        bpeak = median([r["peak_mib"] or 0 for r in entry["tutorial"]])
        staged = [r for r in entry["ours"] if "stages" in r]
        stage_t = {s: median([r["stages"][s]["wall"] for r in staged]) for s in STAGES}
        stage_m = {s: median([r["stages"][s]["peak_mib"] or 0 for r in staged]) for s in STAGES}
        extra[n] = {"ours": ours, "base": base, "peak": peak, "base_peak": bpeak, "stages": stage_t, "stage_peak": stage_m,
                    "base_fit": median([r["fit_seconds"] for r in entry["tutorial"]]),
                    "acc": median([r["test_accuracy"] or 0 for r in entry["ours"]]),
                    "base_acc": median([r["test_accuracy"] for r in entry["tutorial"]])}  # fmt: skip
        is_target = n == 1_000_000
        rows.append({
            "key": f"e{n}", "what": f"e. n={n:.0e} end to end (batch 1024, 5 epochs)",
            "ours": ours, "base": base, "ratio": ours / base,
            "target": "≤ 30 s and ≤ 1.5 GiB peak" if is_target else "—",
            "met": (ours <= 30 and peak <= 1.5 * 1024) if is_target else None,
            "detail": (f"time {'met' if ours <= 30 else 'missed'}, peak {peak:.0f} MiB "
                       f"{'met' if peak <= 1.5 * 1024 else 'missed'}") if is_target else "",
            "note": "ours = one `dvc repro` from clean; one pass of `dvc repro -s` per stage: "
                    + ", ".join(f"{s} {stage_t[s]:.1f} s / {stage_m[s]:.0f} MiB" for s in STAGES)
                    + f"; peak ours {peak:.0f} MiB, tutorial {bpeak:.0f} MiB; "
                    f"test accuracy ours {extra[n]['acc']:.4f}, tutorial {extra[n]['base_acc']:.4f}",
        })  # fmt: skip
    return rows, extra


def markdown(info: dict, rows: list[dict], extra: dict, raw: dict, args) -> str:
    v = info["versions"]
    out = [
        f"# softmaxlab benchmark — {info['hostname']}, {info['date'][:10]}",
        "",
        f"- machine: `{info['hostname']}`, {info['cpu']}, {info['cores']} cores; load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['loadavg_start'])}, at end {', '.join(f'{x:.2f}' for x in info['loadavg_end'])}",
        f"- python {info['python']}, tensorflow {v.get('tensorflow')}, keras {v.get('keras')}, mlflow {v.get('mlflow')}, "
        f"dvc {v.get('dvc')}, hydra-core {v.get('hydra-core')}, numpy {v.get('numpy')}, scikit-learn {v.get('scikit-learn')}",
        f"- git commit {info['git_commit']}; command `{info['command']}`; total bench time {info['bench_minutes']:.1f} min",
        f"- repeats: {args.repeats} (seed rows, scaling), {args.sweep_repeats} (sweep); medians throughout; "
        "each measurement a fresh process timed from outside; ours and tutorial interleaved",
        "",
        "| row | ours (median) | baseline (median) | ratio ours/baseline | target | verdict |",
        "|---|---:|---:|---:|---|---|",
    ]
    if info.get("note"):
        out.insert(6, f"- note: {info['note']}")
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}×"
        base = "—" if r["base"] is None else fmt_s(r["base"])
        out.append(
            f"| {r['what']} | {fmt_s(r['ours'])} | {base} | {ratio} | {r['target']} | {verdict(r['met'], r.get('detail', ''))} |"
        )
    out += ["", "Notes:", ""]
    for r in rows:
        if r["note"]:
            out.append(f"- **{r['key']}**: {r['note']}")
    if extra:
        out += [
            "",
            "Scaling (row e): seconds per 1,000 samples, end to end and train stage / model.fit",
            "",
            "| n | ours end to end | tutorial process | ours train stage | tutorial model.fit | ours peak | tutorial peak |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, e in extra.items():
            out.append(
                f"| {n:.0e} | {1000 * e['ours'] / n:.4f} | {1000 * e['base'] / n:.4f} | "
                f"{1000 * e['stages']['train'] / n:.4f} | {1000 * e['base_fit'] / n:.4f} | "
                f"{e['peak']:.0f} MiB | {e['base_peak']:.0f} MiB |"
            )
        if 100_000 in extra and 1_000_000 in extra:
            a, b = extra[100_000], extra[1_000_000]
            out.append("")
            out.append(
                f"Time per sample 1e6 vs 1e5: ours end to end {(b['ours'] / 1e6) / (a['ours'] / 1e5):.2f}×, "
                f"ours train stage {(b['stages']['train'] / 1e6) / (a['stages']['train'] / 1e5):.2f}×, "
                f"tutorial process {(b['base'] / 1e6) / (a['base'] / 1e5):.2f}× (< 1: fixed start-up costs amortised)."
            )
        out.append("")
        out.append(
            "Scaling params: data.n_test = 25 % of n, train.batch_size=1024, train.epochs=5, "
            "**evaluate.n_bootstrap=200** (default 1000); tutorial: TUTORIAL_N_SAMPLES/N_TEST/BATCH_SIZE=1024/EPOCHS=5. "
            "Peak = max RSS of the largest process (GNU time %M). Train stage = its own `dvc repro -s train`."
        )
    out += [
        "",
        "How to read this: the machine is shared and small, so absolute seconds move from run to run; "
        "the ratios (ours / baseline, measured side by side in the same invocation) are the result.",
        "",
    ]
    return "\n".join(out)


def plot(path: Path, rows: list[dict], extra: dict, raw: dict, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    head = [r for r in rows if not r["key"].startswith("e")]
    samples = {
        "a": ([r["train_seconds"] for r in raw["ours_train"]], [r["fit_seconds"] for r in raw["tutorial"]]),
        "b": ([r["wall"] for r in raw["repro"]], [r["wall"] for r in raw["tutorial"]]),
        "c": ([r["wall"] for r in raw.get("sweep", [])], []),
        "c2": ([r["wall"] for r in raw.get("sweep_joblib", [])], []),
        "d": ([r["wall"] for r in raw["noop"]], []),
    }
    labels = {"a": "a. training\n(fit only)", "b": "b. dvc repro vs\n1 tutorial run",
              "c": f"c. {SWEEP_JOBS}-job sweep vs\n{SWEEP_JOBS} tutorial runs",
              "c2": "c2. the same,\njoblib launcher", "d": "d. no-op\ndvc repro"}  # fmt: skip
    w = 0.38
    for i, r in enumerate(head):
        ax.bar(i - w / 2, r["ours"], w, color="tab:blue", label="softmaxlab" if i == 0 else None)
        ax.scatter([i - w / 2] * len(samples[r["key"]][0]), samples[r["key"]][0], color="k", s=8, zorder=3)
        if r["base"] is not None:
            ax.bar(i + w / 2, r["base"], w, color="tab:orange", label="tutorial script" if i == 0 else None)
            ax.scatter(
                [i + w / 2] * len(samples[r["key"]][1]), samples[r["key"]][1], color="k", s=8, zorder=3
            )
            ax.annotate(
                f"{r['ratio']:.2f}×", (i, max(r["ours"], r["base"])), ha="center", va="bottom", fontsize=9
            )
    ax.set_xticks(range(len(head)), [labels[r["key"]] for r in head])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median; dots = runs), log scale")
    ax.set_title("seed config")
    ax.legend()
    ax = axes[1]
    if extra:
        ns = sorted(extra)
        bottom = [0.0] * len(ns)
        for s, c in zip(STAGES, ["#c6dbef", "#2171b5", "#74c476", "#08306b"], strict=True):
            vals = [extra[n]["stages"][s] for n in ns]
            ax.bar([k - 0.2 for k in range(len(ns))], vals, 0.38, bottom=bottom, color=c, label=f"ours: {s}")
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.bar(
            [k + 0.2 for k in range(len(ns))],
            [extra[n]["base"] for n in ns],
            0.38,
            color="tab:orange",
            label="tutorial process",
        )
        ax.axhline(30, color="r", ls="--", lw=0.8, label="target at 1e6: 30 s")
        ax.set_xticks(
            range(len(ns)),
            [f"{n:.0e}\nours {extra[n]['peak']:.0f} MiB\ntut. {extra[n]['base_peak']:.0f} MiB" for n in ns],
        )
        ax.set_ylabel("seconds (median)")
        ax.set_title("scaling: batch 1024, 5 epochs (peak RSS below)")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.suptitle(
        f"softmaxlab vs tutorial — {info['hostname']} ({info['cpu']}, {info['cores']} cores), {info['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs per measured thing (median of them); default 3"
    )
    ap.add_argument(
        "--sweep-repeats", type=int, default=None, help="runs of the 24-job sweep (default: --repeats)"
    )
    ap.add_argument("--quick", action="store_true", help="1 repeat of everything, no 1e6 scaling row")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: sweep, sweep-joblib, scaling")
    ap.add_argument("--sizes", default=None, help="scaling sizes, comma-separated (default 1e4,1e5,1e6)")
    ap.add_argument(
        "--work", type=Path, default=BENCH / "work", help="scratch directory (default bench/work)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    ap.add_argument("--render", type=Path, default=None, help="only re-write .md/.png from a results .json")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render)
    if args.quick:
        args.repeats = 1
        args.sweep_repeats = 1
    if args.sweep_repeats is None:
        args.sweep_repeats = args.repeats
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    sizes = [10_000, 100_000] + ([] if args.quick else [1_000_000])
    if args.sizes:
        sizes = [int(float(x)) for x in args.sizes.split(",")]

    t0 = time.perf_counter()
    info = machine_info()
    info["command"] = " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    say(f"bench on {info['hostname']} ({info['cpu']}, {info['cores']} cores); scratch in {args.work}")
    args.work.mkdir(parents=True, exist_ok=True)
    # One snapshot of the project for the whole bench: every run of ours imports softmaxlab
    # from it (PYTHONPATH beats the editable install), so edits to src/ while the bench runs
    # do not mix two versions of the code into one table.
    snapshot = make_project(args.work / "proj")
    ENV["PYTHONPATH"] = str(snapshot / "src")
    raw: dict = {}
    seed_rows(args.work, args.repeats, raw)
    if "sweep" not in skip:
        sweep_rows(args.work, args.sweep_repeats, raw, parallel="sweep-joblib" not in skip)
    if "scaling" not in skip:
        scaling_rows(args.work, sizes, args.repeats, raw)
    info["loadavg_end"] = os.getloadavg()
    info["bench_minutes"] = (time.perf_counter() - t0) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{info['hostname']}-{info['date'][:10]}"
    for n in itertools.count(2):  # a second bench on the same day keeps the first one's files
        if not Path(f"{stem}.json").exists():
            break
        stem = args.out / f"{info['hostname']}-{info['date'][:10]}-{n}"
    write_results(stem, info, raw, args)
    return 0


def write_results(stem: Path, info: dict, raw: dict, args) -> None:
    rows, extra = summarise(raw, args, info["cores"])
    md = markdown(info, rows, extra, raw, args)
    Path(f"{stem}.md").write_text(md)
    Path(f"{stem}.json").write_text(json.dumps(
        {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "raw": raw}, indent=1, default=str
    ))  # fmt: skip
    plot(Path(f"{stem}.png"), rows, extra, raw, info)
    print()
    print(md)
    say(f"wrote {stem}.md, .json, .png")


def render(path: Path) -> int:
    """Re-write the .md, .json and .png of a past run from its .json (no measuring)."""
    data = json.loads(path.read_text())
    args = argparse.Namespace(**data["args"])
    args.repeats, args.sweep_repeats = int(args.repeats), int(args.sweep_repeats)
    info = data["machine"]
    info["loadavg_start"], info["loadavg_end"] = tuple(info["loadavg_start"]), tuple(info["loadavg_end"])
    write_results(path.parent / path.name.removesuffix(".json"), info, data["raw"], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
