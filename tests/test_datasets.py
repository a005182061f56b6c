"""Each MLflow run records the data it used as MLflow input datasets: the file's md5 (DVC's
hash of it) as digest, and where DVC keeps that version as source."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from conftest import env_with_venv, make_project, run_cmd, tiny_overrides


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def datasets_of(client, run_id) -> dict[str, tuple]:
    """context -> (name, digest, source_type, source, tags) of the run's input datasets."""
    out = {}
    for di in client.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in di.tags}
        d = di.dataset
        out[tags["mlflow.data.context"]] = (d.name, d.digest, d.source_type, d.source, tags)
    return out


def test_in_process_run_records_train_and_test_data_with_their_md5(trained):
    import json

    client = trained["tracker"].client
    root = trained["root"]
    got = datasets_of(client, trained["run_id"])
    assert set(got) == {"training", "test"}
    for context, rel in (("training", "data/train.parquet"), ("test", "data/test.parquet")):
        name, digest, source_type, source, tags = got[context]
        assert digest == md5(root / rel)
        # No DVC project around a run directory: the source is the file itself.
        assert source_type == "local" and json.loads(source)["uri"] == str((root / rel).resolve())
        assert tags["dvc.path"] == rel and name == f"blobs-{'train' if context == 'training' else 'test'}"
    # Schema and row count, as MLflow shows them on the run page: the schema (taken from
    # the first row, for speed) is what MLflow infers from every row.
    import warnings

    import pandas as pd
    from mlflow.models import infer_signature

    for di in client.get_run(trained["run_id"]).inputs.dataset_inputs:
        rel = di.dataset.name.replace("blobs-", "data/") + ".parquet"
        frame = pd.read_parquet(root / rel)
        with warnings.catch_warnings():  # "integer columns cannot hold missing values": true, and moot here
            warnings.simplefilter("ignore")
            every_row = infer_signature(frame).inputs
        assert json.loads(di.dataset.schema) == {"mlflow_colspec": every_row.to_dict()}
        assert json.loads(di.dataset.profile)["num_rows"] == len(frame)
    # The existing tags stay.
    assert client.get_run(trained["run_id"]).data.tags["data_md5"]


@pytest.mark.slow
def test_dvc_repro_records_the_dvc_lock_md5_and_the_remote_object(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    project = make_project(tmp_path / "proj", *tiny_overrides())
    # Recording the location needs no connection to the remote: DVC derives it from the md5.
    run_cmd(["dvc", "remote", "add", "-d", "team", "s3://team-bucket/dvcstore"], project)
    run_cmd(["dvc", "repro"], project, env=env_with_venv())
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    lock_md5 = {o["path"]: o["md5"] for o in lock["stages"]["generate"]["outs"]}
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("softmaxlab").experiment_id])
    got = datasets_of(client, run.info.run_id)
    for context, rel in (("training", "data/train.parquet"), ("test", "data/test.parquet")):
        name, digest, source_type, source, tags = got[context]
        h = lock_md5[rel]
        assert digest == h == md5(project / rel)
        assert source_type == "s3"
        assert json.loads(source)["uri"] == f"s3://team-bucket/dvcstore/files/md5/{h[:2]}/{h[2:]}"
    assert run.data.tags["data_md5"] and run.info.status == "FINISHED"


def test_a_dataset_another_job_inserted_first_is_told_apart_from_other_errors():
    """The race a parallel sweep hits (two jobs log the same dataset at once; seen on a 2-node
    Ray sweep, one job FAILED): the store's unique key on (experiment, name, digest), as sqlite
    and PostgreSQL (through the server) word it, is retried; nothing else is."""
    from softmaxlab.tracking.provenance import dataset_insert_race

    sqlite = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"
    postgres = 'duplicate key value violates unique constraint "dataset_pk" DETAIL: Key (experiment_id, name, digest)'
    assert dataset_insert_race(Exception(sqlite)) and dataset_insert_race(Exception(postgres))
    experiment = 'duplicate key value violates unique constraint "uq_experiments_workspace_name"'
    assert not dataset_insert_race(Exception(experiment))
    assert not dataset_insert_race(Exception("UNIQUE constraint failed: tags.key, tags.run_uuid"))
