"""`python bench/fit.py`: where Keras' `fit` spends its seconds at the seed config.

The seed config's training (600 rows, batch 5, 30 epochs, Adam, validation every epoch, one
execution per epoch) as variants, each in a fresh process (so each pays its own tracing),
rounds alternating their order, medians:

- numpy: Keras' own NumPy path (`fit(x, y, batch_size=5, shuffle=True, validation_data=(xv, yv))`),
  what training.fit did before;
- numpy, no validation: the same without validation_data;
- tf.data: whole-epoch pipelines (softmaxlab.model.inputs), validation in batches of 5;
- tf.data, one validation step: + validation as one batch in one step (training.fit today);
- the same with jit_compile=True (XLA, which Keras leaves off on CPU);
- the same for 1 epoch: what the first epoch costs (tracing and compiling both loops);
- softmaxlab: training.fit itself (its callbacks included), 30 epochs.

    python bench/fit.py              # 3 rounds (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BENCH, ENV, RESULTS, machine_info, say  # noqa: E402

VARIANT = r"""
import json, sys, time
from softmaxlab.core.config import load_params
from softmaxlab.model import backend, inputs, training
from softmaxlab.model.network import build_loss, build_model, build_optimizer, keras_for, logits_model
from softmaxlab.stages import pipeline
variant, epochs = sys.argv[1], int(sys.argv[2])
cfg = load_params("params.yaml")
keras = keras_for(cfg)
backend.seed_everything("tensorflow", cfg.seed)
train_df, _ = pipeline.data_for(cfg.data)
x = train_df[["x1", "x2"]].to_numpy("float32")
y = keras.utils.to_categorical(train_df["label"].to_numpy(), 4)
n = 600
model = build_model(cfg.model, 2, 4)
opt = build_optimizer(cfg.optimizer)
start = time.perf_counter()
if variant == "softmaxlab":
    import dataclasses
    training.fit(model, dataclasses.replace(cfg.train, epochs=epochs), x[:n], y[:n], x[n:], y[n:], opt, seed=cfg.seed)
else:
    net = logits_model(model)
    net.compile(optimizer=opt, loss=build_loss("categorical_crossentropy", 0.0, from_logits=True),
                metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                steps_per_execution=inputs.steps(n, 5), jit_compile=variant.endswith("xla"))
    if variant.startswith("numpy"):
        val = None if variant == "numpy-noval" else (x[n:], y[n:])
        net.fit(x[:n], y[:n], batch_size=5, shuffle=True, validation_data=val, epochs=epochs, verbose=0)
    else:
        one = variant != "tfdata"
        val = inputs.validation_batch(x[n:], y[n:]) if one else inputs.batches(x[n:], y[n:], 5)
        net.fit(inputs.training_epochs(x[:n], y[:n], 5, epochs, 0), steps_per_epoch=inputs.steps(n, 5),
                validation_data=val, epochs=epochs, verbose=0, shuffle=False,
                callbacks=[training.validation_step_callback()] if one else [])
print("BENCH " + json.dumps({"fit_s": time.perf_counter() - start}))
"""

VARIANTS = {
    "numpy": ("Keras' NumPy path, validation every epoch (before)", 30),
    "numpy-noval": ("Keras' NumPy path, no validation", 30),
    "tfdata": ("whole-epoch tf.data, validation in batches of 5", 30),
    "tfdata-one": ("whole-epoch tf.data, validation in one step (training.fit today)", 30),
    "tfdata-one-xla": ("the same with jit_compile=True (XLA)", 30),
    "tfdata-one-1": ("the same, 1 epoch (tracing + compiling both loops)", 1),
    "softmaxlab": ("training.fit itself (its callbacks included)", 30),
}


def one(variant: str) -> float:
    epochs = VARIANTS[variant][1]
    name = variant.removesuffix("-1")
    out = subprocess.run([sys.executable, "-c", VARIANT, name, str(epochs)], cwd=BENCH.parent, env=ENV,
                         capture_output=True, text=True)  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{variant} failed:\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    return json.loads(line[6:])["fit_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    info = machine_info()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    loads: list[float] = []
    order = list(VARIANTS)
    for i in range(args.repeats):
        for variant in order if i % 2 == 0 else order[::-1]:
            loads.append(os.getloadavg()[0])
            times[variant].append(one(variant))
        say(f"round {i + 1}: " + ", ".join(f"{v} {t[-1]:.2f}" for v, t in times.items()))
    info["loadavg_end"] = os.getloadavg()
    base = statistics.median(times["numpy"])
    md = [
        "# `fit` at the seed config: where the seconds go",
        "",
        f"{info['date']}, {info['hostname']} ({info['cpu']}, {info['cores']} cores), git {info['git_commit']}; "
        f"`python bench/fit.py --repeats {args.repeats}`; each variant a fresh process, rounds alternating "
        f"their order, medians; load average (1 min) before the runs {min(loads):.2f}-{max(loads):.2f}.",
        "",
        "| variant | `fit`, s (median) | vs Keras' NumPy path | runs |",
        "|---|---:|---:|---|",
    ]
    for v, (label, _) in VARIANTS.items():
        m = statistics.median(times[v])
        md.append(f"| {label} | {m:.2f} | {m / base:.2f}× | {', '.join(f'{t:.2f}' for t in times[v])} |")
    stem = args.out / f"fit-{info['hostname']}-{info['date'][:10]}"
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")
    Path(f"{stem}.json").write_text(json.dumps({"machine": info, "times": times, "loads": loads}, indent=1))
    print("\n".join(md))
    say(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
