"""conf/ composes into valid, typed configs; params.yaml is the default composition."""

from __future__ import annotations

import pytest
import yaml
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from pipeline.config import LR_SCHEDULERS, load_config, to_flat_dict
from pipeline.errors import ConfigError
from support import PROJECT, compose_params

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
        # dataset=csv is the user's own file: its path is theirs to give
        validated([f"{group}={option.stem}"]
                  + (["dataset.path=reviews.csv"] if f"{group}={option.stem}" == "dataset=csv"
                     else []))


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
    with pytest.raises(ConfigError,
                       match=r"train.precision='fp8' is not one of auto, bf16, fp16, fp32"):
        validated(["train.precision=fp8"])


def test_warmup_ratio_must_be_a_fraction():
    with pytest.raises(ConfigError, match=r"train.warmup_ratio=1.5 must be in \[0, 1\)"):
        validated(["train.warmup_ratio=1.5"])


@pytest.mark.parametrize("value", ["0.0", "1.5", "-0.9", "nan"])
def test_layer_lr_decay_must_be_a_factor_up_to_one(value):
    with pytest.raises(ConfigError, match=rf"train.layer_lr_decay={value} must be in \(0, 1\]"):
        validated([f"train.layer_lr_decay={value}"])


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


def test_pooled_head_settings_are_refused_under_the_auto_head():
    params = compose_params(["head=pooled"])
    params["head"]["type"] = "auto"
    with pytest.raises(ConfigError, match=r"'head.pooling' applies only to head.type=pooled, "
                                          r"not auto: drop it, or `dvc exp run -S head=pooled`"):
        load_config(OmegaConf.create(params))


def test_two_phase_without_its_keys_says_which_group_sets_them():
    params = compose_params([])
    params["train"]["strategy"] = "two_phase"
    with pytest.raises(ConfigError, match=r"train.strategy=two_phase needs "
                                          r"'train.head_learning_rate'.*-S strategy=two_phase"):
        load_config(OmegaConf.create(params))


def test_a_key_conf_does_not_set_is_named():
    params = compose_params([])
    del params["runtime"]["eval_batch_size"]
    with pytest.raises(ConfigError, match=r"missing key 'runtime.eval_batch_size'"):
        load_config(OmegaConf.create(params))


def test_own_csv_needs_three_overrides_and_infers_the_rest():
    dataset = validated(["dataset=csv", "dataset.path=reviews.csv",
                         "dataset.text_column=review"]).dataset
    assert (dataset.source, dataset.format, dataset.path) == ("local", "csv", "reviews.csv")
    assert (dataset.text_column, dataset.label_column, dataset.text_pair_column) == \
        ("review", "label", None)
    # label names from the data, the task's usual metrics, validation and test carved
    assert (dataset.label_names, dataset.metrics, dataset.task) == (None, None, "classification")
    assert (dataset.validation_size, dataset.test_size) == (0.1, 0.1)


def test_a_value_conf_leaves_unset_is_named_with_the_dvc_command():
    with pytest.raises(ConfigError) as error:
        validated(["dataset=csv", "dataset.text_column=review"])
    assert str(error.value) == ("'dataset.path' has no value (??? in conf/): set it, e.g. "
                                "`dvc exp run -S dataset.path=<value>`")


def test_a_misspelt_experiment_is_refused_not_replaced_by_the_defaults():
    # `optional experiment` would compose the defaults and train them under the wrong name.
    with pytest.raises(MissingConfigException) as error:
        compose_params(["experiment=mrpc_minlm"])
    assert "Could not find 'experiment/mrpc_minlm'" in str(error.value)
    assert "mrpc_minilm" in str(error.value)


# Values the schema's types accept but the Trainer rejects, or takes and trains nonsense with:
# each is a one-line ConfigError at load time, naming the key.

@pytest.mark.parametrize("key", ["max_train_samples", "max_eval_samples"])
@pytest.mark.parametrize("value", [0, -5])
def test_sample_caps_below_one_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^train.{key}={value} must be at least 1, or null"):
        validated([f"train.{key}={value}"])
    assert getattr(validated([f"train.{key}=null"]).train, key) is None


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate", "learning_rate"),
    ("train.head_learning_rate", "head_learning_rate"),
])
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1e-5"])
def test_learning_rates_must_be_finite_and_positive(override, key, value):
    with pytest.raises(ConfigError,
                       match=rf"^train.{key}=\S+ must be a finite number above 0$"):
        validated(["strategy=two_phase", f"{override}={value}"])


@pytest.mark.parametrize("key", ["num_train_epochs", "head_epochs"])
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_epochs_must_be_finite_and_positive(key, value):
    with pytest.raises(ConfigError, match=rf"^train.{key}=\S+ must be a finite number above 0$"):
        validated(["strategy=two_phase", f"train.{key}={value}"])


@pytest.mark.parametrize("value", ["nan", "inf", "-0.01"])
def test_weight_decay_must_be_finite_and_not_negative(value):
    with pytest.raises(ConfigError,
                       match=r"^train.weight_decay=\S+ must be a finite number, 0 or more$"):
        validated([f"train.weight_decay={value}"])
    assert validated(["train.weight_decay=0"]).train.weight_decay == 0


def test_unknown_scheduler_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"^train.lr_scheduler_type='cosine_annealing' is not "
                                          r"one of linear, cosine, cosine_with_restarts, "):
        validated(["train.lr_scheduler_type=cosine_annealing"])


@pytest.mark.parametrize("scheduler", LR_SCHEDULERS)
def test_every_listed_scheduler_is_one_transformers_builds_without_kwargs(scheduler):
    # TrainConfig passes no lr_scheduler_kwargs: a scheduler that needs some (cosine_with_min_lr)
    # or that the installed transformers lacks must not be in the list.
    import torch
    from transformers import get_scheduler

    assert validated([f"train.lr_scheduler_type={scheduler}"]).train.lr_scheduler_type == scheduler
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    assert get_scheduler(scheduler, optimizer, num_warmup_steps=1, num_training_steps=10)


def test_class_weights_are_none_or_balanced():
    assert validated([]).train.class_weights == "none"
    assert validated(["train.class_weights=balanced"]).train.class_weights == "balanced"
    with pytest.raises(ConfigError, match=r"^train.class_weights='inverse' is not one of none, "
                                          r"balanced$"):
        validated(["train.class_weights=inverse"])


def test_num_proc_takes_auto_or_a_number_of_processes():
    assert validated([]).runtime.num_proc == "auto"
    assert validated(["runtime.num_proc=3"]).runtime.num_proc == 3


@pytest.mark.parametrize("value", ["many", "0", "-2", "2.5", "true"])
def test_a_bad_num_proc_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"runtime.num_proc") as error:
        validated([f"runtime.num_proc={value}"])
    assert "\n" not in str(error.value)


def test_checkpoint_logging_resume_and_registry_keys_are_checked():
    cfg = validated([])
    assert (cfg.tracking.log_checkpoints, cfg.train.resume_from) == ("best", None)
    assert cfg.tracking.registered_model == cfg.dataset.name, "one registered model per dataset"
    assert validated(["tracking.registered_model=null"]).tracking.registered_model is None
    with pytest.raises(ConfigError, match=r"^tracking.log_checkpoints='last' is not one of none, "
                                          r"best, all$"):
        validated(["tracking.log_checkpoints=last"])
    with pytest.raises(ConfigError, match=r"^train.resume_from=checkpoints/checkpoint-6 must be a "
                                          r"checkpoint a run logged, runs:/<run id>/checkpoints/"):
        validated(["train.resume_from=checkpoints/checkpoint-6"])
    uri = "runs:/0123abcd/checkpoints/checkpoint-6"
    assert validated([f"train.resume_from='{uri}'"]).train.resume_from == uri
    for name in ("team/news", "news:v2", "news@best", "' '"):
        with pytest.raises(ConfigError, match=r"^tracking.registered_model=.* must be a name "
                                              r"without '/', ':' or '@', or null"):
            validated([f"tracking.registered_model={name}"])
