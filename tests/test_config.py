"""conf/ is the single source of truth: params.yaml equals its composition, and every value
is validated with a message that names the key, the value and what is allowed."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from softmaxlab.config import Config, compose, flatten, load_params, project_root, to_config
from softmaxlab.errors import UserError


def test_params_yaml_is_the_composed_default_of_conf():
    committed = OmegaConf.to_container(OmegaConf.load(ROOT / "params.yaml"))
    assert committed == OmegaConf.to_container(compose()), "params.yaml drifted: run `make params`"
    # The typed schema changes nothing: the Hydra app composes the same values as DVC.
    assert committed == OmegaConf.to_container(compose(with_schema=True))


def test_defaults_are_the_tutorials():
    cfg = load_params(ROOT / "params.yaml")
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


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.activation=relux", "model.activation='relux'"),
        ("optimizer.name=adamw", "optimizer.name='adamw'"),
        ("optimizer.lr=0", "optimizer.lr=0.0"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
        ("train.validation_split=1.0", "train.validation_split=1.0"),
        ("train.batch_size=100000", "train.batch_size=100000"),
        ("data.n_test=1000", "data.n_test=1000"),
        ("data.centers=[[1,2]]", "data.centers"),
        ("model.hidden=[12,0]", "model.hidden[1]=0"),
        ("model.hidden=[]", "model.hidden=[]"),
        ("train.device=tpu", "train.device='tpu'"),
        ("train.loss=mse", "train.loss='mse'"),
        ("model.kernel_initializer=zeros", "model.kernel_initializer='zeros'"),
    ],
)
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
