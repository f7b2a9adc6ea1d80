"""What each stage depends on: its code deps and params in dvc.yaml are what it imports and
reads, and the schema, conf/ and params.yaml name the same keys."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.config import (
    SECTIONS,
    UndeclaredParamError,
    applicable_keys,
    declared_view,
    load_config,
    to_flat_dict,
    unguarded,
)
from support import PROJECT, compose_params

STAGES = ["download", "tokenize", "train", "evaluate", "report"]
DVC_STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]


def _imported_modules(path: Path, seen: set[str]) -> set[str]:
    """Project modules (pipeline/*, stages/*) that ``path`` imports, transitively; imports
    inside functions count too."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            file = PROJECT / (name.replace(".", "/") + ".py")
            relative = str(file.relative_to(PROJECT))
            if file.is_file() and relative not in seen:
                seen.add(relative)
                _imported_modules(file, seen)
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_code_deps_are_exactly_what_the_stage_imports(stage):
    listed = {d for d in DVC_STAGES[stage]["deps"] if d.endswith(".py")}
    entry = f"stages/{stage}.py"
    assert listed == _imported_modules(PROJECT / entry, {entry})


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_params_are_what_the_stage_declares(stage):
    module = importlib.import_module(f"stages.{stage}")
    assert DVC_STAGES[stage]["params"] == module.PARAMS


def test_stages_depend_only_on_their_part_of_the_library():
    deps = {stage: {d for d in DVC_STAGES[stage]["deps"] if d.endswith(".py")}
            for stage in STAGES}
    heavy = {"pipeline/modeling.py", "pipeline/heads.py", "pipeline/training.py",
             "pipeline/metrics.py", "pipeline/tracking.py"}
    assert not deps["download"] & heavy
    assert deps["tokenize"] - {"stages/tokenize.py", "stages/entrypoint.py"} == {
        "pipeline/artifacts.py", "pipeline/config.py", "pipeline/contracts.py",
        "pipeline/errors.py", "pipeline/tokenization.py"}
    for stage in ("evaluate", "report"):
        assert "pipeline/training.py" not in deps[stage] \
            and "pipeline/modeling.py" not in deps[stage]
    assert {s for s in STAGES if "pipeline/heads.py" in deps[s]} == {"train", "evaluate"}
    assert {s for s in STAGES if "pipeline/sources.py" in deps[s]} == {"download"}
    for stage in STAGES:
        params = DVC_STAGES[stage]["params"]
        assert not [p for p in params if p.split(".")[0] in ("tracking", "runtime")], stage


def _keys_match(params: dict) -> None:
    assert set(params) == {"seed", *SECTIONS}
    for name, schema in SECTIONS.items():
        assert set(params[name]) == set(applicable_keys(schema, params[name])), name


def test_schema_keys_equal_params_yaml_keys():
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    _keys_match(params)
    assert "pooling" not in params["head"], "pooled-head settings do not apply to head=auto"


@pytest.mark.parametrize("group", ["dataset", "model", "head", "strategy", "train", "experiment"])
def test_every_group_option_sets_exactly_the_schema_keys(group):
    for option in sorted((PROJECT / "conf" / group).glob("*.yaml")):
        _keys_match(compose_params([f"{group}={option.stem}"]))


def test_dvc_composes_every_documented_key(tmp_path):
    """`dvc exp run -S key=value` composes conf/ with these overrides; a key missing from conf/
    fails there with Hydra's "Could not override"."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(str(out), str(PROJECT / "conf"), None, "config", str(PROJECT),
                     ["dataset.on_leakage=warn", "dataset.deduplicate=false", "strategy=two_phase",
                      "train.head_epochs=2", "head=pooled", "head.pooling=cls",
                      "runtime.eval_batch_size=32"])
    params = yaml.safe_load(out.read_text())
    assert params["dataset"]["on_leakage"] == "warn" and params["train"]["head_epochs"] == 2
    load_config(OmegaConf.create(params))


def _view(stage: str):
    cfg = load_config(OmegaConf.create(compose_params([])))
    return declared_view(cfg, stage, importlib.import_module(f"stages.{stage}").PARAMS), cfg


def test_a_stage_reads_what_it_declares_and_nothing_else():
    view, cfg = _view("train")
    assert view.train.learning_rate == cfg.train.learning_rate
    assert view.dataset.main_metric == "accuracy" and view.seed == 42
    assert view.runtime.eval_batch_size == cfg.runtime.eval_batch_size  # untracked: readable
    with pytest.raises(UndeclaredParamError, match=r"stage 'train' reads dataset.path, which it "
                                                   r"does not declare"):
        _ = view.dataset.path
    with pytest.raises(UndeclaredParamError, match=r"reads tokenize.max_length"):
        _ = view.tokenize.max_length
    tokenize_view, _ = _view("tokenize")
    with pytest.raises(UndeclaredParamError, match=r"stage 'tokenize' reads seed"):
        _ = tokenize_view.seed


def test_records_see_the_whole_config_behind_a_view():
    view, cfg = _view("evaluate")
    assert unguarded(view) is cfg
    flat = to_flat_dict(view)
    assert flat["dataset.path"] == cfg.dataset.path and "head.pooling" not in flat
