"""Keras backends against the tutorial's script on the same backend (issue: JAX beside TensorFlow).

Rows, each a fresh process timed from outside, medians of `--repeats`, ours and the
tutorial's script interleaved (A B, then B A) so a shared machine's noise falls on both:

- seed config (1,000 samples, batch 5, 30 epochs), whole script: import + make_blobs + fit +
  predict. Ours is `softmaxlab.model.training.train` on the default config with `train.backend` set;
  the tutorial's script is the plain Keras script, run with the same `KERAS_BACKEND`.
- 10^6 samples, batch 1024, 5 epochs: the same two scripts at that size.
- `dvc repro` from a clean workspace with `train.backend=tensorflow` and `=jax`, against the
  tutorial's script on TensorFlow (what a newcomer would otherwise run).

    python bench/backends.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: measure, projects, the tutorial's command)

OURS = r"""
import json, os, time
t0 = time.perf_counter()
from softmaxlab.core.config import load_params
from softmaxlab.stages.generate import generate
from softmaxlab.model.training import train
cfg = load_params("params.yaml")
cfg.train.backend = os.environ["KERAS_BACKEND"]
n = int(os.environ.get("BENCH_N", "0"))
if n:
    cfg.data.n_samples, cfg.data.n_test = n, n // 4
    cfg.train.batch_size, cfg.train.epochs = 1024, 5
train_df, test_df = generate(cfg.data)
r = train(cfg, train_df, test_df)
t = r.predictions["test"]
k = len(cfg.data.centers)
acc = float((t[[f"p{i}" for i in range(k)]].to_numpy().argmax(1) == t["label"].to_numpy()).mean())
print("BENCH " + json.dumps({"fit_seconds": r.train_seconds, "test_accuracy": acc}))
"""
BIG = 1_000_000


def env(backend: str, **extra: str) -> dict[str, str]:
    return dict(bench.ENV, KERAS_BACKEND=backend, **extra)


def pair_rows(work: Path, repeats: int, n: int | None) -> dict:
    out = {}
    for backend in ("tensorflow", "jax"):
        entry = out[backend] = {"ours": [], "tutorial": []}
        logs = work / "logs" / f"{backend}-{n or 'seed'}"

        def ours(i: int, backend=backend, entry=entry, logs=logs) -> None:
            extra = {"BENCH_N": str(n)} if n else {}
            r = bench.measure(
                [sys.executable, "-c", OURS], bench.ROOT, env(backend, **extra), logs / f"ours{i}.log"
            )
            entry["ours"].append(r)
            bench.say(f"  ours {backend} n={n or 1000}: {r['wall']:.1f} s (fit {r['fit_seconds']:.2f})")

        def tutorial(i: int, backend=backend, entry=entry, logs=logs) -> None:
            over = {"n_samples": n, "n_test": n // 4, "batch_size": 1024, "epochs": 5} if n else {}
            e = dict(bench.tutorial_env(**over), KERAS_BACKEND=backend, TUTORIAL_VERBOSE="0")
            r = bench.measure(bench.tutorial_cmd(), bench.ROOT, e, logs / f"tutorial{i}.log")
            entry["tutorial"].append(r)
            bench.say(f"  tutorial {backend} n={n or 1000}: {r['wall']:.1f} s (fit {r['fit_seconds']:.2f})")

        for i in range(repeats):
            for step in bench.interleave(i, ours, tutorial):
                step(i)
    return out


def repro_rows(work: Path, repeats: int) -> dict:
    projects = {
        b: bench.make_project(work / f"proj-{b}", {"train.backend": b}) for b in ("tensorflow", "jax")
    }
    out = {"tensorflow": [], "jax": [], "tutorial": []}
    logs = work / "logs" / "repro"

    def ours(i: int) -> None:
        for b, proj in projects.items():
            bench.clean(proj)
            r = bench.measure(["dvc", "repro"], proj, log=logs / f"{b}{i}.log")
            out[b].append(r)
            bench.say(f"  dvc repro, train.backend={b}: {r['wall']:.1f} s")

    def tutorial(i: int) -> None:
        r = bench.measure(bench.tutorial_cmd(), bench.ROOT, bench.tutorial_env(), logs / f"tutorial{i}.log")
        out["tutorial"].append(r)
        bench.say(f"  tutorial (tensorflow): {r['wall']:.1f} s")

    for i in range(repeats):
        for step in bench.interleave(i, ours, tutorial):
            step(i)
    return out


def med(runs: list[dict], key: str = "wall") -> float:
    return bench.median([r[key] for r in runs if r.get(key) is not None])


def markdown(raw: dict, info: dict) -> str:
    lines = [
        f"# Keras backends, {info['date']} ({info['host']}, git {info['git']}, {info['repeats']} repeats, medians)",
        "",
        "| row | ours | tutorial script, same backend | ratio | ours fit | tutorial fit | accuracy (ours / tutorial) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, key in (("seed config", "seed"), ("10^6, batch 1024, 5 epochs", "big")):
        for backend, e in raw.get(key, {}).items():
            o, t = med(e["ours"]), med(e["tutorial"])
            acc = f"{min(r['test_accuracy'] for r in e['ours']):.4f} / {min(r['test_accuracy'] for r in e['tutorial']):.4f}"
            lines.append(
                f"| {label}, {backend} (whole script) | {o:.2f} s | {t:.2f} s | {o / t:.2f}× | "
                f"{med(e['ours'], 'fit_seconds'):.2f} s | {med(e['tutorial'], 'fit_seconds'):.2f} s | {acc} |"
            )
    if "repro" in raw:
        t = med(raw["repro"]["tutorial"])
        for b in ("tensorflow", "jax"):
            o = med(raw["repro"][b])
            lines.append(f"| `dvc repro` from clean, train.backend={b} vs the tutorial on TensorFlow | {o:.2f} s | "
                         f"{t:.2f} s | {o / t:.2f}× | | | |")  # fmt: skip
    lines += ["", "Accuracy is the lowest over the repeats. Seconds move with the machine's load; the ratios"
              " (same machine, same run, interleaved) are the result."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat, no 10^6 row")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    raw: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        work = Path(tmp)
        bench.say("seed config, both backends")
        raw["seed"] = pair_rows(work, repeats, None)
        if not args.quick:
            bench.say("10^6 samples, both backends")
            raw["big"] = pair_rows(work, repeats, BIG)
        bench.say("dvc repro from clean")
        raw["repro"] = repro_rows(work, repeats)
    machine = bench.machine_info()
    info = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "host": f"{machine['cpu']}, {machine['cores']} cores",
        "git": machine["git_commit"],
        "repeats": repeats,
        "loadavg_start": machine["loadavg_start"],
    }
    stem = bench.RESULTS / f"backends-{dt.date.today().isoformat()}"
    text = markdown(raw, info)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "raw": raw}, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
