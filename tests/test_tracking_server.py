"""A team tracking server: real `mlflow server` processes and a silent one, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import compose_config, env_with_venv, make_project, run_cmd, tiny_overrides
from test_sweep import check_parent_and_children

from softmaxlab.core import metrics as names

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent():
    """Accepts connections and never answers: the worst kind of unreachable. `.connections`
    holds what it accepted."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conns.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield SimpleNamespace(uri=f"http://127.0.0.1:{srv.getsockname()[1]}", connections=conns)
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


def start_mlflow_server(port: int, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_with_venv(),
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("mlflow server did not start")


@pytest.fixture
def silent_server(silent) -> str:
    return silent.uri


def test_silent_server_is_noticed_by_one_probe_and_runs_fall_back(silent, tmp_path, monkeypatch):
    from softmaxlab.tracking.tracker import connect

    cfg = compose_config(*tiny_overrides(f"tracking.uri={silent.uri}"))
    monkeypatch.chdir(tmp_path)  # the fallback store is <project root>/mlflow.db: keep it here
    tracker = connect(cfg)
    assert tracker.fallback_from == silent.uri and tracker.uri.startswith("sqlite:///")
    # One /health probe with its own short timeout decided it, not MLflow's HTTP retries
    # (minutes against a server that never answers).
    assert len(silent.connections) == 1


def test_unreachable_server_loses_nothing_in_dvc_repro(silent_server, tmp_path):
    project = make_project(tmp_path / "proj", *tiny_overrides())
    proc = run_cmd(["dvc", "repro"], project, env=env_with_venv(MLFLOW_TRACKING_URI=silent_server))
    assert "unreachable" in proc.stderr and "softmaxlab sync" in proc.stderr
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert (project / "reports/report.html").is_file() and "accuracy" in metrics
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("softmaxlab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["tracking.fallback_from"] == silent_server
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"], rel=1e-3)


def test_real_server_receives_runs_directly_and_fallback_runs_by_sync(tmp_path):
    import mlflow

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    project = make_project(tmp_path / "proj", *tiny_overrides())
    # 1. The server is down (connection refused): the run falls back to the local store.
    run_cmd(["dvc", "repro"], project, env=env_with_venv(MLFLOW_TRACKING_URI=uri))
    local = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (fallback,) = local.search_runs([local.get_experiment_by_name("softmaxlab").experiment_id])

    server = start_mlflow_server(port, tmp_path)
    try:
        # 2. Up again: sync copies the run — params, full curves, artifacts, model files.
        out = run_cmd(["softmaxlab", "sync"], project, env=env_with_venv(MLFLOW_TRACKING_URI=uri))
        assert "1 run(s) copied" in out.stderr
        remote = mlflow.tracking.MlflowClient(uri)
        exp = remote.get_experiment_by_name("softmaxlab")
        (copied,) = remote.search_runs([exp.experiment_id])
        assert copied.data.params == fallback.data.params
        assert copied.data.metrics == fallback.data.metrics
        assert copied.info.status == "FINISHED"

        # The data it used (input datasets: name, md5 digest, source, context) goes with it.
        def inputs(run):
            return sorted((d.dataset.name, d.dataset.digest, d.dataset.source, sorted((t.key, t.value) for t in d.tags))
                          for d in run.inputs.dataset_inputs)  # fmt: skip

        assert len(inputs(copied)) == 2 and inputs(copied) == inputs(fallback)
        hist = remote.get_metric_history(copied.info.run_id, names.CURVES["val_loss"])
        assert [m.step for m in hist] == [1, 2]
        artifacts = {a.path for a in remote.list_artifacts(copied.info.run_id)}
        assert {"calibration", "figures", "report.html", "calibrated"} <= artifacts
        # Its calibrated model, registered locally when it fell back, is registered there too.
        (version,) = remote.search_model_versions("name = 'softmaxlab'")
        assert version.run_id == copied.info.run_id and version.source.endswith("/artifacts/calibrated")
        # A second sync copies nothing twice.
        again = run_cmd(["softmaxlab", "sync"], project, env=env_with_venv(MLFLOW_TRACKING_URI=uri))
        assert "0 run(s) copied" in again.stderr

        # 3. With the server up, a new run goes straight to it.
        params = project / "params.yaml"
        params.write_text(params.read_text().replace("epochs: 2", "epochs: 3"))
        run_cmd(["dvc", "repro"], project, env=env_with_venv(MLFLOW_TRACKING_URI=uri))
        runs = remote.search_runs([exp.experiment_id])
        assert len(runs) == 2
        direct = next(r for r in runs if r.info.run_id != copied.info.run_id)
        assert direct.info.status == "FINISHED" and names.test("ece", scaled=True) in direct.data.metrics
        assert "tracking.fallback_from" not in direct.data.tags
        # Its calibrated model is in the server's artifacts and registry, ready to promote.
        assert "calibrated" in {a.path for a in remote.list_artifacts(direct.info.run_id)}
        versions = remote.search_model_versions("name = 'softmaxlab'")
        assert sorted(v.run_id for v in versions) == sorted([copied.info.run_id, direct.info.run_id])
        # and the team server serves it: the version's files load as the calibrated model.
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model(f"models:/softmaxlab/{version.version}")
        assert list(model.predict(pd.DataFrame({"x1": [15.0], "x2": [0.0]})).columns)[-1] == "predicted_class"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_parallel_sweep_of_8_jobs_on_2_workers_loses_no_runs(tmp_path):
    # The suite's one parallel sweep (Hydra's joblib launcher), against the local store.
    project = make_project(tmp_path / "proj")
    proc = run_cmd(
        ["python", "-m", "softmaxlab", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "model=seed,tiny,wide,deep", "seed=0,1", *tiny_overrides(), "hydra.sweep.dir=sweep"],
        project,
    )  # fmt: skip
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=["softmaxlab"], output_format="pandas")
    children = df[df["tags.job_num"].notna()]
    assert len(children) == 8 and (children["status"] == "FINISHED").all()
    assert sorted(children["tags.job_num"].astype(int)) == list(range(8))
    assert children["metrics.test/accuracy"].notna().all()
    # Each job registered its calibrated model, two processes at a time: one version per job.
    versions = mlflow.tracking.MlflowClient().search_model_versions("name = 'softmaxlab'")
    assert sorted(v.run_id for v in versions) == sorted(children["run_id"])
    assert sorted(int(v.version) for v in versions) == list(range(1, 9))
    parent = df[df["tags.sweep_overrides"].notna()]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    check_parent_and_children(project, 8)  # one parent, its children's tags
    # Jobs finish in other processes, in any order, and still count to 8/8 exactly once each.
    done = sorted(line.split(" jobs done")[0] for line in proc.stderr.splitlines() if " jobs done" in line)
    assert done == [f"sweep: {k}/8" for k in range(1, 9)]


def test_a_sync_that_fails_half_way_leaves_nothing_running_and_the_next_one_copies_once(
    tmp_path, monkeypatch
):
    import mlflow
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from softmaxlab.core.errors import UserError
    from softmaxlab.tracking import sync

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    project = make_project(tmp_path / "proj", *tiny_overrides())
    run_cmd(["dvc", "repro"], project, env=env_with_venv(MLFLOW_TRACKING_URI=uri))  # falls back
    local_uri = f"sqlite:///{project / 'mlflow.db'}"
    local = MlflowClient(local_uri)
    (fallback,) = local.search_runs([local.get_experiment_by_name("softmaxlab").experiment_id])
    server = start_mlflow_server(port, tmp_path)
    try:
        remote = MlflowClient(uri)

        def remote_runs(view=ViewType.ACTIVE_ONLY):
            exp = remote.get_experiment_by_name("softmaxlab")
            return remote.search_runs([exp.experiment_id], run_view_type=view) if exp else []

        def fail_artifacts(*args, **kwargs):
            raise ConnectionError("connection reset by peer")

        # 1. The connection breaks while artifacts upload: one line, the half copy is ended
        #    and deleted on the server, the local run is not marked synced.
        with monkeypatch.context() as m:
            m.setattr(MlflowClient, "log_artifacts", fail_artifacts)
            with pytest.raises(UserError, match="sync stopped at run .*connection reset.*softmaxlab sync"):
                sync.sync(uri, local_uri)
        assert remote_runs() == []
        assert [r.info.status for r in remote_runs(ViewType.DELETED_ONLY)] == ["FAILED"]
        assert sync.SYNCED_TAG not in local.get_run(fallback.info.run_id).data.tags
        # 2. The same, but the server could not even be told: the half copy stays RUNNING there.
        with monkeypatch.context() as m:
            m.setattr(MlflowClient, "log_artifacts", fail_artifacts)
            m.setattr(sync, "_discard", lambda dst, run_id: None)
            with pytest.raises(UserError):
                sync.sync(uri, local_uri)
        assert [r.info.status for r in remote_runs()] == ["RUNNING"]
        # 3. The next sync replaces it: one complete copy, nothing RUNNING, no duplicate.
        assert len(sync.sync(uri, local_uri)) == 1
        (copied,) = remote_runs()
        assert copied.info.status == "FINISHED" and copied.data.tags[sync.COMPLETE_TAG] == "true"
        assert copied.data.tags[sync.COPY_TAG] == fallback.info.run_id
        assert {"calibration", "figures", "report.html"} <= {
            a.path for a in remote.list_artifacts(copied.info.run_id)
        }
        assert "RUNNING" not in [r.info.status for r in remote_runs(ViewType.ALL)]
        # 4. Once more: nothing to copy.
        assert sync.sync(uri, local_uri) == []
        assert len(remote_runs()) == 1
    finally:
        mlflow.set_tracking_uri(None)
        server.terminate()
        server.wait(timeout=30)


def self_signed_cert(tmp_path) -> tuple[str, str]:
    """(certificate, key) PEM files for 127.0.0.1, signed by themselves: a CA no system trusts."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_file), str(key_file)


@contextlib.contextmanager
def basic_auth_proxy(upstream_port: int, user: str, password: str, tls: tuple[str, str] | None = None):
    """An HTTP front that answers 401 without `user:password` (Basic), /health included, and
    passes the rest to the MLflow server: a team server behind an authenticating proxy, a common
    deployment. With `tls` (certificate, key) it speaks HTTPS."""
    import base64
    import http.client
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    wanted = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def forward(self):
            if self.headers.get("Authorization") != wanted:
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        srv.socket = context.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def files_holding(root, secret: str) -> list:
    """Every file under `root` whose bytes hold `secret`, a zip's members (a saved model) read
    unpacked, git's objects included."""
    import zipfile
    import zlib

    found = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        blobs = [path.read_bytes()]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs += [z.read(m) for m in z.namelist()]
        elif ".git" in path.parts and "objects" in path.parts:
            with contextlib.suppress(zlib.error):
                blobs.append(zlib.decompress(blobs[0]))
        if any(secret.encode() in b for b in blobs):
            found.append(path)
    return found


def server_records(client) -> str:
    """What a tracking server holds about every run of every experiment, deleted ones too:
    names, params, tags, metric names, dataset sources, as one text."""
    from mlflow.entities import ViewType

    exps = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL)
    return json.dumps([
        [r.info.run_name, r.data.params, r.data.tags, sorted(r.data.metrics),
         [d.dataset.source for d in r.inputs.dataset_inputs]] for r in runs
    ] + [[e.name, e.tags] for e in exps])  # fmt: skip


def test_credentials_reach_a_server_behind_a_login_and_are_never_shown(tmp_path):
    """Credentials given each way reach the server behind a login, for a single run (dvc repro)
    and a sweep; in a Hydra override they are refused before anything is written. Then the
    password is searched for in everything written: server, project, output."""
    from mlflow.tracking import MlflowClient

    secret = "s3cr3t-pa55"
    port = free_port()
    server = start_mlflow_server(port, tmp_path)
    out = ""

    def run(args, env, check=True):
        nonlocal out
        proc = run_cmd(args, project, env=env, check=check)
        out += proc.stdout + proc.stderr
        return proc

    try:
        with basic_auth_proxy(port, "alice", secret) as front:
            direct = MlflowClient(f"http://127.0.0.1:{port}")
            project = make_project(tmp_path / "proj", *tiny_overrides())
            bare, with_userinfo = f"http://127.0.0.1:{front}", f"http://alice:{secret}@127.0.0.1:{front}"
            ways = {
                "environment": env_with_venv(MLFLOW_TRACKING_URI=bare, MLFLOW_TRACKING_USERNAME="alice",
                                             MLFLOW_TRACKING_PASSWORD=secret),
                "URI user info": env_with_venv(MLFLOW_TRACKING_URI=with_userinfo),
            }  # fmt: skip
            for n, (way, env) in enumerate(ways.items()):
                # A single run (the DVC pipeline) and a sweep: every MLflow call carries them.
                repro = run(["dvc", "repro", "--force"], env)
                sweep = run([sys.executable, "-m", "softmaxlab", "-m", "seed=0,1", *tiny_overrides(),
                             f"hydra.sweep.dir=sweep{n}"], env)  # fmt: skip
                assert "unreachable" not in repro.stderr + sweep.stderr, (way, repro.stderr + sweep.stderr)
                runs = direct.search_runs([direct.get_experiment_by_name("softmaxlab").experiment_id])
                assert len(runs) == 4 * (n + 1), way  # the pipeline's run, the parent, 2 jobs
                assert all(
                    r.info.status == "FINISHED" and "tracking.fallback_from" not in r.data.tags for r in runs
                )
            summary = run([sys.executable, "-m", "softmaxlab.tracking.where"], ways["URI user info"])
            assert f"MLflow store: http://***@127.0.0.1:{front}" in summary.stdout
            run_id = json.loads((project / "reports/train.json").read_text())["run_id"]
            assert {"figures", "report.html"} <= {a.path for a in direct.list_artifacts(run_id)}
            # In a Hydra override the password would be recorded (outputs' .hydra/, the run's
            # param, overrides tag and name, the sweep's sweep_overrides): refused, one line,
            # before anything is written.
            before = sorted(p for p in project.rglob("*") if ".git" not in p.parts)
            for sweep_args in ([], ["-m", "seed=0,1"]):
                refused = run([sys.executable, "-m", "softmaxlab", *sweep_args, f"tracking.uri={with_userinfo}",
                               *tiny_overrides()], env_with_venv(), check=False)  # fmt: skip
                assert refused.returncode == 2 and refused.stdout == "", refused.stderr
                assert refused.stderr.splitlines() == [
                    f"softmaxlab: error: tracking.uri=http://***@127.0.0.1:{front} holds a password, which the "
                    "run's config and records would keep in clear: give the URI without it and set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
                ]
            assert sorted(p for p in project.rglob("*") if ".git" not in p.parts) == before
            assert len(direct.search_runs([direct.get_experiment_by_name("softmaxlab").experiment_id])) == 8
            # The two messages that name the store: a deleted experiment, a sweep with no runs.
            direct.delete_experiment(direct.create_experiment("gone"))
            deleted = run([sys.executable, "-m", "softmaxlab", "tracking.experiment=gone", "hydra.run.dir=out"],
                          ways["URI user info"], check=False)  # fmt: skip
            assert deleted.returncode == 2 and f"is deleted in http://***@127.0.0.1:{front}" in deleted.stderr
            empty = run([sys.executable, "-m", "softmaxlab", "summarize", "no-such-sweep"], ways["URI user info"],
                        check=False)  # fmt: skip
            assert empty.returncode == 2 and f"of http://***@127.0.0.1:{front}" in empty.stderr, empty.stderr
        # Nowhere: the output, the server's runs (names, params, tags, datasets), and any file
        # written: the server's database and artifacts, the project (outputs/, sweep dirs,
        # Hydra's logs and .hydra/, reports/, DVC's files, git), the local store if any.
        assert secret not in out
        assert secret not in server_records(direct)  # the user name is in mlflow.user: an identity
        assert files_holding(tmp_path, secret) == []
        assert (tmp_path / "server-artifacts").is_dir() and (project / "sweep1" / "multirun.yaml").is_file()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_refused_login_stops_the_run_instead_of_falling_back(tmp_path):
    """A login in front of the server (an authenticating proxy) answers /health itself with
    401: a wrong or missing password is one line and exit 2, not an outage to fall back from.
    The check speaks TLS as MLflow does (MLFLOW_TRACKING_SERVER_CERT_PATH)."""
    from mlflow.tracking import MlflowClient

    secret = "right-pa55"
    port = free_port()
    server = start_mlflow_server(port, tmp_path)
    cert = self_signed_cert(tmp_path)
    try:
        with (
            basic_auth_proxy(port, "alice", secret) as front,
            basic_auth_proxy(port, "alice", secret, cert) as tls,
        ):
            direct = MlflowClient(f"http://127.0.0.1:{port}")
            project = make_project(tmp_path / "proj", *tiny_overrides())
            bare = f"http://127.0.0.1:{front}"

            def app(*args, **env):
                return run_cmd([sys.executable, "-m", "softmaxlab", *args, *tiny_overrides(), "hydra.run.dir=out",
                                "hydra.sweep.dir=sweep"], project, env=env_with_venv(**env), check=False)  # fmt: skip

            wrong = {
                "MLFLOW_TRACKING_URI": bare,
                "MLFLOW_TRACKING_USERNAME": "alice",
                "MLFLOW_TRACKING_PASSWORD": "nope",
            }
            for args, env, line in [
                ((), wrong, f"MLflow server {bare} refused MLFLOW_TRACKING_USERNAME=alice with its password "
                            "(HTTP 401): check MLFLOW_TRACKING_PASSWORD"),
                (("-m", "seed=0,1"), wrong, f"MLflow server {bare} refused MLFLOW_TRACKING_USERNAME=alice with "
                                            "its password (HTTP 401): check MLFLOW_TRACKING_PASSWORD"),
                ((), {"MLFLOW_TRACKING_URI": f"http://alice:nope@127.0.0.1:{front}"},
                 f"MLflow server http://***@127.0.0.1:{front} refused MLFLOW_TRACKING_USERNAME=alice with its "
                 "password (HTTP 401): check MLFLOW_TRACKING_PASSWORD"),
                ((), {"MLFLOW_TRACKING_URI": bare}, f"MLflow server {bare} wants a login (HTTP 401): set "
                 "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a team user's, from `softmaxlab team add-user`)"),
            ]:  # fmt: skip
                proc = app(*args, **env)
                assert proc.returncode == 2, proc.stderr
                assert proc.stderr.splitlines() == [f"softmaxlab: error: {line}"], proc.stderr
                assert "unreachable" not in proc.stderr and "nope" not in proc.stderr
            # No run fell back to a local store; none reached the server.
            assert not (project / "mlflow.db").exists()
            assert direct.search_experiments(filter_string="name = 'softmaxlab'") == []
            # The same through DVC: the train stage stops; nothing is logged anywhere.
            repro = run_cmd(["dvc", "repro"], project, env=env_with_venv(**wrong), check=False)
            assert repro.returncode != 0 and "refused MLFLOW_TRACKING_USERNAME=alice" in repro.stderr
            assert "unreachable" not in repro.stderr and not (project / "mlflow.db").exists()

            # TLS: an unknown CA is a setting to fix, said in one line; with the CA given the
            # way MLflow takes it, the check and every MLflow call get through.
            https = {"MLFLOW_TRACKING_URI": f"https://127.0.0.1:{tls}", "MLFLOW_TRACKING_USERNAME": "alice",
                     "MLFLOW_TRACKING_PASSWORD": secret}  # fmt: skip
            where = [sys.executable, "-m", "softmaxlab.tracking.where"]
            untrusted = run_cmd(where, project, env=env_with_venv(**https), check=False)
            assert untrusted.returncode == 2 and len(untrusted.stderr.splitlines()) == 1, untrusted.stderr
            assert "TLS failed (certificate verify failed" in untrusted.stderr
            assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in untrusted.stderr
            trusted = run_cmd(
                where, project, env=env_with_venv(**https, MLFLOW_TRACKING_SERVER_CERT_PATH=cert[0])
            )
            assert (
                f"MLflow store: https://127.0.0.1:{tls}" in trusted.stdout
                and "unreachable" not in trusted.stderr
            )

            # The right password: the run is logged on the server.
            ok = app(
                MLFLOW_TRACKING_URI=bare, MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=secret
            )
            assert ok.returncode == 0, ok.stderr
            (logged,) = direct.search_runs([direct.get_experiment_by_name("softmaxlab").experiment_id])
            assert logged.info.status == "FINISHED" and "test/accuracy" in logged.data.metrics
            assert not (project / "mlflow.db").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_server_stopping_mid_sweep_loses_no_job_and_sync_completes_the_sweep(tmp_path):
    """The server dies while a job logs to it: that job and the ones after it run into the
    local store; once the server is back, sync sends them, retires the unfinished run and ends
    the parent: every job once, FINISHED, nothing RUNNING."""
    import re

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    project = make_project(tmp_path / "proj")
    # Fewer HTTP retries than our default 4: the same path, a shorter wait on the dead server.
    env = env_with_venv(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    server = start_mlflow_server(port, tmp_path)
    remote = MlflowClient(uri)
    sweep = subprocess.Popen(
        [sys.executable, "-m", "softmaxlab", "-m", "seed=0,1,2,3", *tiny_overrides(), "hydra.sweep.dir=sweep"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and sweep.poll() is None:
            exp = remote.get_experiment_by_name("softmaxlab")
            jobs = remote.search_runs([exp.experiment_id], "tags.job_num != ''") if exp else []
            if {"FINISHED", "RUNNING"} <= {r.info.status for r in jobs}:
                break  # job 0 is done and a later one is half-way through
            time.sleep(0.1)
        server.terminate()
        server.wait(timeout=60)
        out, err = sweep.communicate(timeout=600)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, err
    assert "stopped answering during job" in err and "running it again into the local store" in err, err
    assert "softmaxlab sync" in err
    sid = re.search(r"softmaxlab: sweep (\S+), MLflow parent run (\w+)", err).group(1)
    local = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    fell_back = local.search_runs([local.get_experiment_by_name("softmaxlab").experiment_id])
    assert len(fell_back) == 3 and all(r.info.status == "FINISHED" for r in fell_back), err
    assert all(r.data.tags["tracking.fallback_from"] == uri for r in fell_back)
    assert any(r.data.tags.get("tracking.replaces_run") for r in fell_back)

    server = start_mlflow_server(port, tmp_path)  # back, same database
    try:
        synced = run_cmd(["softmaxlab", "sync"], project, env=env)
        assert f"{len(fell_back)} run(s) copied" in synced.stderr
        exp = remote.get_experiment_by_name("softmaxlab")
        every = remote.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
        assert "RUNNING" not in [r.info.status for r in every]
        jobs = remote.search_runs([exp.experiment_id], f"tags.sweep_id = '{sid}' and tags.job_num != ''")
        assert sorted(int(r.data.tags["job_num"]) for r in jobs) == [0, 1, 2, 3]
        assert all(r.info.status == "FINISHED" and "test/accuracy" in r.data.metrics for r in jobs)
        (parent,) = remote.search_runs(
            [exp.experiment_id], f"tags.sweep_id = '{sid}' and tags.sweep_overrides != ''"
        )
        assert parent.info.status == "FINISHED"
        assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
        summary = run_cmd(["softmaxlab", "summarize", sid, "summary"], project, env=env)
        assert len((project / "summary" / "summary.csv").read_text().splitlines()) == 5, summary.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
