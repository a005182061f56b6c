"""GPU check: the `wide` model on the JAX backend, GPU against CPU, at 10^5 and 10^6 samples.

Runs from the source tree (`PYTHONPATH=src`) on a machine that has JAX (with CUDA for the GPU
rows) but maybe no TensorFlow, MLflow or DVC: it calls the same `training.train` the pipeline
does, with tracking off. Each row is one `training.train` call in this process: `fit_s` is
Keras' fit (its first call per device includes XLA compilation), `total_s` adds building
the model and the predictions on the validation, test and grid rows. `bench/gpu_check.sh`
installs the few wheels a bare GPU machine lacks and runs this.

    python bench/gpu_check.py [--sizes 100000 1000000] [--devices gpu cpu] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softmaxlab.core.config import compose, to_config  # noqa: E402
from softmaxlab.core.errors import UserError  # noqa: E402
from softmaxlab.model import training  # noqa: E402
from softmaxlab.stages import generate  # noqa: E402


def config(n: int, device: str, epochs: int, batch: int):
    return to_config(
        compose(
            [
                "model=wide", "train.backend=jax", f"train.device={device}",
                f"data.n_samples={n}", f"data.n_test={n // 4}",
                f"train.epochs={epochs}", f"train.batch_size={batch}",
                "train.grid_size=50", "tracking.enabled=false",
            ],
            with_schema=True,
        )
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--devices", nargs="+", default=["gpu", "cpu"], choices=["gpu", "cpu"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()

    import jax
    import keras

    print(f"python {platform.python_version()}, jax {jax.__version__}, keras {keras.__version__}, "
          f"backend {keras.backend.backend()}, devices {jax.devices()}", flush=True)  # fmt: skip
    rows = []
    for n in args.sizes:
        base = config(n, "cpu", args.epochs, args.batch)
        t0 = time.perf_counter()
        train_df, test_df = generate.generate(base.data)
        gen_s = time.perf_counter() - t0
        for device in args.devices:
            cfg = config(n, device, args.epochs, args.batch)
            t0 = time.perf_counter()
            try:
                result = training.train(cfg, train_df, test_df)
            except UserError as err:  # no GPU here: say so, keep the CPU rows
                print(f"n={n} device={device}: skipped: {err}", flush=True)
                continue
            total = time.perf_counter() - t0
            test = result.predictions["test"]
            probs = test[[c for c in test.columns if c.startswith("p")]].to_numpy()
            acc = float((probs.argmax(1) == test["label"].to_numpy()).mean())
            row = {
                "n_samples": n, "requested": device, "device": result.device,
                "epochs": len(result.history), "batch_size": args.batch,
                "fit_s": round(result.train_seconds, 3), "total_s": round(total, 3),
                "generate_s": round(gen_s, 3), "test_accuracy": round(acc, 4),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| samples | device | fit (s) | train() total (s) | test accuracy |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n_samples']:,} | {r['device']} | {r['fit_s']:.2f} | {r['total_s']:.2f} | {r['test_accuracy']:.4f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"platform": platform.platform(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
