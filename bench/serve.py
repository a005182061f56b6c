"""`python bench/serve.py`: serving the calibrated champion against the raw TensorFlow-flavour
model, side by side, on this machine.

One scratch project (a copy of this one, on overlapping classes so that promote has a
champion: on the tutorial's blobs the temperature stops at its bound) runs `dvc repro` and
`softmaxlab promote`; the raw Keras model of that same run is logged in MLflow's TensorFlow
flavour (what runs logged before the calibrated model existed). Then, in rounds that
alternate which goes first, each is served with `mlflow models serve --env-manager local`
on 127.0.0.1 and measured from outside:

- start: from starting the server process to its first 200 answer to a one-row request;
- single rows: 500 sequential one-row requests on one keep-alive connection, p50 and p99;
- 10,000 rows: one request of 10,000 rows (3 per server start; the median).

    python bench/serve.py                # 3 rounds (about 5-10 minutes on 2 cores)
    python bench/serve.py --repeats 1    # one round
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run as bench  # noqa: E402  (bench/run.py: the scratch project and the machine header)

from softmaxlab.core.processes import free_port, stop_group  # noqa: E402

N_SINGLE = 500
N_BIG = 10_000
BIG_REPEATS = 3
# data=overlap's values: classes overlap, the temperature is fitted inside its bounds.
OVERLAP = {"data.name": "overlap", "data.cluster_std": 5.0}
# Logs the run's Keras model in MLflow's TensorFlow flavour, as the train stage used to.
LOG_RAW = r"""
import sys, keras, mlflow, numpy as np
from importlib import metadata
from mlflow.models import infer_signature
model = keras.saving.load_model("models/model.keras", safe_mode=True)
x = np.zeros((5, 2), np.float32)
signature = infer_signature(x, np.zeros((5, int(sys.argv[1])), np.float32))
reqs = [f"{p}=={metadata.version(p)}" for p in ("tensorflow", "keras", "numpy")]
with mlflow.start_run(run_name="bench: raw TF flavour"):
    info = mlflow.tensorflow.log_model(model, name="keras_uncalibrated", signature=signature,
                                       input_example=x, pip_requirements=reqs)
print("BENCH " + __import__("json").dumps({"uri": info.model_uri}))
"""


class Server:
    def __init__(self, uri: str, env: dict, log: Path):
        self.port = free_port()
        self.out = open(log, "w")  # noqa: SIM115  (closed in stop)
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        stop_group(self.proc)
        self.out.close()


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def measure(name: str, uri: str, payload, rows: np.ndarray, env: dict, work: Path, i: int) -> dict:
    """One server start: seconds to its first answer, 500 single-row latencies, the 10,000-row
    request's seconds, and its answer to the test rows (for the correctness check)."""
    start = time.perf_counter()
    server = Server(uri, env, work / f"serve-{name}-{i}.log")
    try:
        first = payload(rows[:1])
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{name} server exited: see {server.out.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                status, _ = post(conn, first)
                if status == 200:
                    break
                raise RuntimeError(f"{name} server answered {status}")
            except OSError:  # not listening yet
                time.sleep(0.1)
        started = time.perf_counter() - start
        single = []
        for k in range(N_SINGLE):
            body = payload(rows[k % len(rows) : k % len(rows) + 1])
            t = time.perf_counter()
            status, _ = post(conn, body)
            single.append(time.perf_counter() - t)
            assert status == 200
        big_rows = np.resize(rows, (N_BIG, rows.shape[1]))
        big_body, big = payload(big_rows), []
        for _ in range(BIG_REPEATS):
            t = time.perf_counter()
            status, answer = post(conn, big_body)
            big.append(time.perf_counter() - t)
            assert status == 200 and len(json.loads(answer)["predictions"]) == N_BIG
        status, answer = post(conn, payload(rows))
        conn.close()
    finally:
        server.stop()
    return {"start": started, "single": single, "big": big, "answer": json.loads(answer)["predictions"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="server starts of each (rounds); default 3")
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "serve", help="scratch directory")
    ap.add_argument(
        "--out", type=Path, default=bench.RESULTS, help="results directory (default bench/results)"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    info = bench.machine_info()
    info["command"] = " ".join(["python", "bench/serve.py", *(argv if argv is not None else sys.argv[1:])])
    args.work.mkdir(parents=True, exist_ok=True)

    proj = bench.make_project(args.work / "proj", OVERLAP)
    env = dict(bench.ENV, PYTHONPATH=str(proj / "src"), MLFLOW_TRACKING_URI=f"sqlite:///{proj / 'mlflow.db'}")
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    bench.say(f"dvc repro in {proj} (data=overlap)")
    bench.measure(["dvc", "repro"], proj, env=env, log=args.work / "repro.log")
    bench.measure(
        [sys.executable, "-m", "softmaxlab", "promote"], proj, env=env, log=args.work / "promote.log"
    )
    k = 4
    raw_uri = bench.measure(
        [sys.executable, "-c", LOG_RAW, str(k)], proj, env=env, log=args.work / "raw.log"
    )["uri"]

    import pandas as pd

    sys.path.insert(0, str(proj / "src"))
    from softmaxlab.core import calibration
    from softmaxlab.core.io import read_predictions

    rows = pd.read_parquet(proj / "data" / "test.parquet")[["x1", "x2"]].to_numpy()
    logits, raw_probs, _ = read_predictions(proj / "predictions" / "test.parquet")
    from softmaxlab.core import metrics as names

    full = json.loads((proj / "reports" / "calibration" / "metrics.json").read_text())
    temperature = full[names.TEMPERATURE]
    # json of float32 inputs: both servers get the very same numbers.
    rows = rows.astype(np.float32).astype(np.float64)

    def split(x: np.ndarray) -> bytes:
        return json.dumps({"dataframe_split": {"columns": ["x1", "x2"], "data": x.tolist()}}).encode()

    def tensor(x: np.ndarray) -> bytes:
        return json.dumps({"inputs": x.tolist()}).encode()

    servers = {
        "calibrated": ("models:/softmaxlab@champion", split),
        "raw": (raw_uri, tensor),
    }
    raw: dict = {name: [] for name in servers}
    for i in range(args.repeats):
        for name in bench.interleave(i, *servers):
            bench.say(f"round {i + 1}/{args.repeats}: {name}")
            r = measure(name, *servers[name], rows, env, args.work, i)
            raw[name].append(r)
            bench.say(
                f"  start {r['start']:.1f} s, single p50 {np.percentile(r['single'], 50) * 1e3:.1f} ms, "
                f"p99 {np.percentile(r['single'], 99) * 1e3:.1f} ms, 10k rows {np.median(r['big']):.2f} s"
            )

    # What the answers were: calibrated = softmax(logits / T) of the test split; raw = softmax(logits).
    cal = np.array([[p[f"p{j}"] for j in range(k)] for p in raw["calibrated"][-1]["answer"]])
    raw_answer = np.array(raw["raw"][-1]["answer"], np.float64)
    check = {
        "temperature": temperature,
        "calibrated_vs_softmax_z_over_t": float(np.abs(cal - calibration.softmax(logits, temperature)).max()),
        "raw_vs_softmax_z": float(np.abs(raw_answer - raw_probs).max()),
        "raw_vs_calibrated": float(np.abs(raw_answer - cal).max()),
    }
    for r in (*raw["calibrated"], *raw["raw"]):
        del r["answer"]
    info["loadavg_end"] = os.getloadavg()
    info["bench_minutes"] = (time.perf_counter() - t0) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-{info['hostname']}-{info['date'][:10]}"
    n = 2
    while Path(f"{stem}.json").exists():
        stem = args.out / f"serve-{info['hostname']}-{info['date'][:10]}-{n}"
        n += 1
    md = markdown(info, raw, check, args)
    Path(f"{stem}.md").write_text(md)
    Path(f"{stem}.json").write_text(
        json.dumps({"machine": info, "check": check, "raw": raw}, indent=1, default=str)
    )
    print(md)
    bench.say(f"wrote {stem}.md, .json")
    return 0


def markdown(info: dict, raw: dict, check: dict, args) -> str:
    def stat(name: str, fn) -> float:
        return float(np.median([fn(r) for r in raw[name]]))

    rows = [
        ("server start to first answer (median of starts)", lambda r: r["start"], "s"),
        (
            f"single row, p50 of {N_SINGLE} sequential requests",
            lambda r: np.percentile(r["single"], 50),
            "ms",
        ),
        (
            f"single row, p99 of {N_SINGLE} sequential requests",
            lambda r: np.percentile(r["single"], 99),
            "ms",
        ),
        (f"{N_BIG:,} rows in one request (median of {BIG_REPEATS})", lambda r: np.median(r["big"]), "s"),
    ]
    v = info["versions"]
    la0, la1 = info["loadavg_start"], info["loadavg_end"]
    out = [
        f"# softmaxlab serving benchmark — {info['hostname']}, {info['date'][:10]}",
        "",
        f"- machine: `{info['hostname']}`, {info['cpu']}, {info['cores']} cores; load average at start "
        f"{la0[0]:.2f}, {la0[1]:.2f}, {la0[2]:.2f}, at end {la1[0]:.2f}, {la1[1]:.2f}, {la1[2]:.2f}",
        f"- python {info['python']}, tensorflow {v.get('tensorflow')}, keras {v.get('keras')}, "
        f"mlflow {v.get('mlflow')}, numpy {v.get('numpy')}",
        f"- git commit {info['git_commit']}; command `{info['command']}`; total {info['bench_minutes']:.1f} min",
        f"- {args.repeats} server start(s) of each, alternating which goes first; every number measured "
        "from outside the server (a client on 127.0.0.1, one keep-alive connection)",
        "- model: one `dvc repro` of the seed architecture on `data=overlap` (30 epochs); calibrated = "
        "`models:/softmaxlab@champion` after `softmaxlab promote` (pyfunc from code, `dataframe_split` "
        "requests); raw = the same run's Keras model in MLflow's TensorFlow flavour (`inputs` requests)",
        "",
        "| row | calibrated pyfunc | raw TF flavour | ratio calibrated/raw |",
        "|---|---:|---:|---:|",
    ]
    for label, fn, unit in rows:
        a, b = stat("calibrated", fn), stat("raw", fn)
        scale = 1e3 if unit == "ms" else 1
        out.append(f"| {label} | {a * scale:.{1 if unit == 'ms' else 2}f} {unit} | "
                   f"{b * scale:.{1 if unit == 'ms' else 2}f} {unit} | {a / b:.2f}× |")  # fmt: skip
    out += [
        "",
        "Answers (the 250 test rows, last start of each):",
        "",
        f"- calibrated: max |served − softmax(logits / T)| = {check['calibrated_vs_softmax_z_over_t']:.1e} "
        f"(T = {check['temperature']:.4f}), with named columns p0…p3 and predicted_class",
        f"- raw: max |served − softmax(logits)| = {check['raw_vs_softmax_z']:.1e}; it differs from the "
        f"calibrated answer by up to {check['raw_vs_calibrated']:.4f}, as bare lists",
        "",
        "Per start (s; ms for single rows): "
        + "; ".join(
            f"{name}: start "
            + ", ".join(f"{r['start']:.1f}" for r in raw[name])
            + ", p50 "
            + ", ".join(f"{np.percentile(r['single'], 50) * 1e3:.1f}" for r in raw[name])
            + ", 10k "
            + ", ".join(f"{np.median(r['big']):.2f}" for r in raw[name])
            for name in raw
        ),
        "",
        "How to read this: the machine is shared and small, so absolute numbers move with its load; "
        "the ratios, measured side by side in the same minutes, are the result.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
