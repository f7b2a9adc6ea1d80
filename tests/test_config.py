"""conf/ composes into valid, typed configs; params.yaml is the default composition."""

from __future__ import annotations

import pytest
import yaml
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from support import PROJECT, compose_params

from pipeline.config import load_config, to_flat_dict
from pipeline.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (PROJECT / "conf" / "experiment").glob("*.yaml"))


def validated(overrides: list[str]):
    return load_config(OmegaConf.create(compose_params(overrides)))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = validated([f"experiment={experiment}"])
    assert cfg.dataset.name and cfg.model.name
    assert cfg.train.learning_rate > 0


@pytest.mark.parametrize("group", ["dataset", "model", "train"])
def test_every_group_option_validates(group):
    for option in sorted((PROJECT / "conf" / group).glob("*.yaml")):
        validated([f"{group}={option.stem}"])


def test_params_yaml_is_what_dvc_composes_from_conf(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    composed = tmp_path / "params.yaml"
    compose_and_dump(str(composed), str(PROJECT / "conf"), None, "config", str(PROJECT), [])
    assert (PROJECT / "params.yaml").read_text() == composed.read_text(), (
        "params.yaml is out of date: run `dvc exp run` after editing conf/")
    assert yaml.safe_load(composed.read_text()) == compose_params([])


def test_unknown_key_names_the_key_and_the_valid_ones():
    params = compose_params([])
    params["train"]["learnin_rate"] = 1e-4
    with pytest.raises(ConfigError, match=r"unknown key 'train.learnin_rate'; valid keys of "
                                          r"'train': strategy, learning_rate, num_train_epochs"):
        load_config(OmegaConf.create(params))


def test_wrong_type_names_the_key():
    params = compose_params([])
    params["train"]["per_device_train_batch_size"] = "sixteen"
    with pytest.raises(ConfigError, match=r"invalid value for 'train.per_device_train_batch_size'"):
        load_config(OmegaConf.create(params))


def test_invalid_choice_names_the_key_and_choices():
    with pytest.raises(ConfigError, match=r"train.precision='fp8' is not one of auto, bf16, fp16, fp32"):
        validated(["train.precision=fp8"])


def test_warmup_ratio_must_be_a_fraction():
    with pytest.raises(ConfigError, match=r"train.warmup_ratio=1.5 must be in \[0, 1\)"):
        validated(["train.warmup_ratio=1.5"])


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as error:
        compose_params(["model=bert_tiny_typo"])
    assert "minilm_l6" in str(error.value)


def test_flat_params_cover_every_section():
    flat = to_flat_dict(validated([]))
    assert flat["train.learning_rate"] == pytest.approx(1e-4)
    assert flat["model.revision"] == "0.1.0"
    assert {key.split(".")[0] for key in flat} >= {"seed", "paths", "dataset", "model", "train"}


def test_conf_uses_no_runtime_interpolations():
    # ${now:}, ${oc.env:} or ${hydra:} would bake time or machine into params.yaml.
    for file in (PROJECT / "conf").rglob("*.yaml"):
        if file.name == "stage.yaml":  # Hydra runtime settings only; DVC never composes it
            continue
        text = file.read_text()
        for forbidden in ("${now:", "${oc.env:", "${hydra:"):
            assert forbidden not in text, f"{file.relative_to(PROJECT)} uses {forbidden}"


def test_slurm_launcher_config_composes_onto_hydra_submitit():
    """conf/cluster/hydra/launcher/slurm.yaml: Hydra's SLURM launcher with GPU-node defaults."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "stages.train", "hydra/launcher=slurm",
                           "hydra.launcher.partition=gpu", "--cfg", "hydra", "--resolve"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    launcher = yaml.safe_load(done.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == \
        ("gpu", 1, 1)
