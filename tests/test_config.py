"""conf/ is the single source of truth: params.yaml equals its composition, and every value
is validated with a message that names the key, the value and what is allowed."""

from __future__ import annotations

import subprocess

import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from softmaxlab.core.config import Config, compose, flatten, load_params, project_root, to_config
from softmaxlab.core.errors import UserError


def committed_params() -> dict:
    """params.yaml as committed (git HEAD), else as on disk outside a git checkout."""
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    text = shown.stdout if shown.returncode == 0 else (ROOT / "params.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text))


def test_params_yaml_is_the_composed_default_of_conf():
    # The committed params.yaml is conf/ composed. The workspace's may differ on purpose: an
    # experiment applied with `dvc exp apply` (or run with `dvc exp run -S`) changes only it;
    # `softmaxlab adopt` makes those values conf/'s defaults before they are committed.
    composed = OmegaConf.to_container(compose())
    workspace = OmegaConf.to_container(OmegaConf.load(ROOT / "params.yaml"))
    if workspace != composed:
        assert committed_params() == composed, (
            "params.yaml drifted from conf/: run `make params` after editing conf/, or "
            "`softmaxlab adopt` to make an experiment's values conf/'s defaults"
        )
    # The typed schema changes nothing: the Hydra app composes the same values as DVC.
    assert composed == OmegaConf.to_container(compose(with_schema=True))


def test_defaults_are_the_tutorials():
    cfg = compose_config()
    assert cfg.data.centers == [[15, 0], [15, 15], [0, 15], [30, 15]]
    assert (cfg.data.cluster_std, cfg.data.n_samples, cfg.data.n_test) == (1.5, 1000, 250)
    assert cfg.model.hidden == [12, 8] and cfg.model.activation == "relu"
    assert cfg.model.kernel_initializer == "he_uniform"
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("adam", 0.001)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.validation_split) == (30, 5, 0.2)
    assert cfg.train.loss == "categorical_crossentropy"


@pytest.mark.parametrize("variant", ["seed", "tiny", "wide", "deep"])
def test_every_model_variant_composes_and_validates(variant):
    cfg = compose_config(f"model={variant}")
    assert cfg.model.name == variant


@pytest.mark.parametrize("group,option", [("optimizer", "sgd"), ("optimizer", "rmsprop"),
                                          ("data", "overlap"), ("data", "many")])  # fmt: skip
def test_other_groups_compose(group, option):
    cfg = compose_config(f"{group}={option}")
    assert getattr(cfg, group).name == option


def test_bad_override_type_fails_at_compose_time_naming_the_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(["train.epochs=many"], with_schema=True)
    assert "train.epochs" in str(err.value.__cause__) or "train.epochs" in str(err.value)


# Every validation rule with a bad value, in-process; what a command does with one (the exit
# code, one line, nothing lost) is test_faults.py's, through a representative of each path.
BAD_VALUES = [
    ("model.activation=relux", "model.activation='relux' is not allowed: choose one of relu,"),
    ("optimizer.name=adamw", "optimizer.name='adamw' is not allowed: choose one of adam, sgd"),
    ("optimizer.lr=0", "optimizer.lr=0.0"),
    ("train.validation_split=1.0", "train.validation_split=1.0"),
    ("train.batch_size=0", "train.batch_size=0"),
    (
        "train.batch_size=100000",
        "train.batch_size=100000 is not allowed: must be <= the 600 samples trained on",
    ),
    ("data.n_test=1000", "data.n_test=1000"),
    ("data.centers=[[1,2]]", "data.centers=[[1, 2]] is not allowed: give at least 2 centers"),
    ("model.hidden=[12,0]", "model.hidden[1]=0"),
    ("model.hidden=[]", "model.hidden=[]"),
    ("train.device=tpu", "train.device='tpu' is not allowed: choose one of auto, cpu, gpu"),
    ("train.backend=torch", "train.backend='torch'"),
    ("train.early_stopping.monitor=val_f1", "train.early_stopping.monitor='val_f1'"),
    ("train.early_stopping.patience=-1", "train.early_stopping.patience=-1"),
    ("train.early_stopping.min_delta=-0.1", "train.early_stopping.min_delta=-0.1"),
    ("train.loss=mse", "train.loss='mse' is not allowed: choose one of categorical_crossentropy,"),
    ("model.kernel_initializer=zeros", "model.kernel_initializer='zeros'"),
    ("seed=-1", "seed=-1"),
    ("data.seed=-1", "data.seed=-1"),
    ("data.cluster_std=0", "data.cluster_std=0.0"),
    ("data.n_samples=2", "data.n_samples=2"),
    ("model.dropout=1.0", "model.dropout=1.0"),
    ("optimizer.momentum=1.0", "optimizer.momentum=1.0"),
    ("train.epochs=0", "train.epochs=0"),
    ("train.label_smoothing=1.0", "train.label_smoothing=1.0"),
    ("train.grid_size=5", "train.grid_size=5"),
    ("evaluate.n_bins=0", "evaluate.n_bins=0"),
    ("evaluate.n_bootstrap=-1", "evaluate.n_bootstrap=-1"),
    ("evaluate.ci=1.0", "evaluate.ci=1.0"),
    ("objective=test/accuracy", "objective='test/accuracy' is not allowed: choose one of val/nll,"),
    ("tracking.experiment=' '", "tracking.experiment=' '"),
    ("tracking.registered_model='a b'", "tracking.registered_model='a b'"),
]


@pytest.mark.parametrize("override,needle", BAD_VALUES)
def test_validation_names_key_value_and_what_is_allowed(override, needle):
    with pytest.raises(UserError) as err:
        compose_config(override)
    msg = str(err.value)
    assert needle in msg and ("allowed" in msg or "choose" in msg or "must" in msg), msg
    assert "\n" not in msg


def test_unknown_key_in_params_is_refused(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text() + "lerning_rate: 0.1\n")
    with pytest.raises(UserError, match="lerning_rate"):
        load_params(p)


def test_flatten_gives_dotted_keys():
    flat = flatten(to_config(OmegaConf.structured(Config)))
    assert flat["model.hidden"] == [12, 8] and flat["optimizer.lr"] == 0.001


def test_project_root_inside_a_dvc_experiment_copy_is_the_real_project(tmp_path):
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    assert project_root(copy) == tmp_path / "proj"
    assert project_root(ROOT / "src") == ROOT


def test_integer_centers_are_accepted_and_become_floats():
    cfg = compose_config("data.centers=[[0,0],[5,5],[10,0]]")
    assert cfg.data.centers == [[0.0, 0.0], [5.0, 5.0], [10.0, 0.0]]
    assert all(isinstance(v, float) for c in cfg.data.centers for v in c)


@pytest.mark.parametrize("centers", ["[[0,0],[0,0]]", "[[0,0],[1,2,3]]", "[[0,0],[a,1]]", "[[0,0],[.nan,1]]"])
def test_bad_centers_are_refused(centers):
    with pytest.raises(UserError, match=r"data\.centers"):
        compose_config(f"data.centers={centers}")


@pytest.fixture
def project_copy(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_names_what_params_yaml_changes_against_conf(project_copy, monkeypatch):
    from softmaxlab.stages.check import drift_note

    params = project_copy / "params.yaml"
    params.write_text(OmegaConf.to_yaml(compose(["optimizer.lr=0.01"])))
    note = drift_note(params)
    assert "optimizer.lr=0.01 (conf/: 0.001)" in note and "softmaxlab adopt" in note
    monkeypatch.setenv("DVC_EXP_NAME", "lr-exp")
    assert drift_note(params) == "check: experiment lr-exp sets optimizer.lr=0.01 (conf/: 0.001)"
    params.write_text(OmegaConf.to_yaml(compose()))
    assert drift_note(params) is None


def test_adopt_writes_an_experiments_values_into_conf_keeping_comments(project_copy):
    from softmaxlab.cli.adopt import adopt

    overrides = ["model=wide", "model.dropout=0.2", "optimizer=sgd", "seed=7", "train.epochs=12"]
    wanted = OmegaConf.to_container(compose(overrides))
    (project_copy / "params.yaml").write_text(OmegaConf.to_yaml(wanted))
    changes = adopt(project_copy)
    assert "conf/config.yaml: model: seed -> wide" in changes
    assert "conf/model/wide.yaml: dropout: 0.1 -> 0.2" in changes
    assert "conf/config.yaml: seed: 42 -> 7" in changes
    # conf/ now composes to exactly what the experiment ran, and params.yaml is that.
    assert OmegaConf.to_container(compose()) == wanted
    assert OmegaConf.to_container(OmegaConf.load(project_copy / "params.yaml")) == wanted
    main = (project_copy / "conf" / "config.yaml").read_text()
    assert "# The single source of truth" in main and "  - sweep: null" in main
    assert "# The tutorial's training loop." in (project_copy / "conf" / "train" / "default.yaml").read_text()
    assert adopt(project_copy) == []  # nothing left to adopt


def test_every_validated_key_has_a_bad_value_test():
    # Every key validate() checks is exercised with a bad value here or in test_faults.py: a
    # new rule without a test, or a test whose key no rule checks any more, fails here.
    import ast
    import inspect

    from test_faults import CASES

    from softmaxlab.core import config

    keys = set()
    for node in ast.walk(ast.parse(inspect.getsource(config.validate))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("_number", "_choice", "_bad"):
            first = node.args[0]
            text = (
                first.value if isinstance(first, ast.Constant) else first.values[0].value
            )  # f"model.hidden[{i}]"
            keys.add(text.split("[")[0])
    assert {"seed", "data.seed", "optimizer.lr", "objective", "tracking.experiment"} <= keys
    tested = (
        " ".join(override for override, _ in BAD_VALUES) + " " + " ".join(n for c in CASES for n in c.needles)
    )
    assert sorted(k for k in keys if k not in tested) == []


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("lr: 0.001", "lr: -1.0"))
    env = {k: v for k, v in os.environ.items() if k != "SOFTMAXLAB_DEBUG"}

    def evaluate(**extra):
        cmd = [sys.executable, "-m", "softmaxlab.stages.evaluate"]
        return subprocess.run(
            cmd, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=120
        )

    plain, debug = evaluate(), evaluate(SOFTMAXLAB_DEBUG="1")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert (
        plain.stderr.strip() == "softmaxlab: error: optimizer.lr=-1.0 is not allowed: must be in (0.0, inf)"
    )
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "softmaxlab.core.errors.UserError: optimizer.lr=-1.0" in debug.stderr


def test_a_password_in_tracking_uri_is_refused_wherever_the_config_comes_from():
    # params.yaml, conf/ or `dvc exp run -S` (the command line's overrides are refused before
    # Hydra starts: test_tracking_server): the run would record it as its tracking.uri param.
    from softmaxlab.tracking.store import resolve_uri

    cfg = compose_config("tracking.uri=http://alice:pa55word@127.0.0.1:5000")
    with pytest.raises(
        UserError, match=r"^tracking.uri=http://\*\*\*@127.0.0.1:5000 holds a password"
    ) as err:
        resolve_uri(cfg)
    assert "pa55word" not in str(err.value) and "MLFLOW_TRACKING_PASSWORD" in str(err.value)
    assert resolve_uri(compose_config("tracking.uri=http://alice@127.0.0.1:5000")).startswith("http://alice@")
