"""The report's truncation warning and the model card's machine-readable metadata."""

from __future__ import annotations

import logging

import pytest
from huggingface_hub import ModelCard
from omegaconf import OmegaConf

from pipeline.config import load_config
from pipeline.reporting import model_card, truncation_warning
from support import compose_params


def _stats(**rates: float) -> dict:
    return {"max_length": 128, "splits": {name: {"examples": 100, "truncation_rate": rate}
                                          for name, rate in rates.items()}}


def test_truncation_above_five_percent_is_warned_in_the_report_and_the_log(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.reporting"):
        text = truncation_warning(_stats(train=0.0512, validation=0.05, test=0.9993))
    message = ("5.1% of train, 99.9% of test texts are longer than tokenize.max_length=128 "
               "tokens and were truncated (more than 5%): the model never sees their ends; if "
               "the ends matter, raise tokenize.max_length (training time grows with it)")
    assert text == f"**Warning:** {message}."
    assert [record.getMessage() for record in caplog.records] == [message]


def test_truncation_up_to_five_percent_is_not_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.reporting"):
        assert truncation_warning(_stats(train=0.05, validation=0.0, test=0.01)) == ""
    assert not caplog.records


METRICS = {"primary_split": "test",
           "test": {"accuracy": 0.9671, "macro_f1": 0.9676, "mcc": 0.9587, "examples": 426},
           "validation": {"accuracy": 0.98, "macro_f1": 0.979, "mcc": 0.97, "examples": 213}}


def _card(overrides: list[str], metrics: dict) -> ModelCard:
    cfg = load_config(OmegaConf.create(compose_params(overrides)))
    manifest = {"label_names": ["business", "entertainment", "politics", "sports", "tech"],
                "task": "classification", "text_pair": False}
    sections = {"data": "(data)", "config": "(config)", "metrics": "(metrics)", "per_class": ""}
    card = model_card(cfg, manifest, {"model_type": "bert", "revision": "0.1.0"}, metrics,
                      sections)
    return ModelCard(str(card))  # parsed back from its text, as the Hub reads it


def test_the_model_card_carries_base_model_license_dataset_and_model_index():
    data = _card([], METRICS).data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert (data.license, data.datasets, data.pipeline_tag) == \
        ("apache-2.0", ["bbc_news"], "text-classification")
    results = {(r.dataset_split, r.metric_type, r.metric_config): r.metric_value
               for r in data.eval_results}
    assert results == {
        ("test", "accuracy", None): 0.9671, ("test", "f1", "macro"): 0.9676,
        ("test", "matthews_correlation", None): 0.9587, ("validation", "accuracy", None): 0.98,
        ("validation", "f1", "macro"): 0.979, ("validation", "matthews_correlation", None): 0.97}
    assert {r.dataset_type for r in data.eval_results} == {"bbc_news"}
    assert data.model_name == "minilm_l6-bbc_news"


def test_a_hub_model_and_dataset_are_named_by_their_hub_ids():
    metrics = {"primary_split": "validation",
               "validation": {"accuracy": 0.86, "f1": 0.9, "examples": 408}}
    data = _card(["experiment=mrpc_bert_base"], metrics).data
    assert (data.base_model, data.license, data.datasets) == \
        ("google-bert/bert-base-uncased", "apache-2.0", ["nyu-mll/glue"])
    result = data.eval_results[0]
    assert (result.dataset_type, result.dataset_config, result.dataset_revision) == \
        ("nyu-mll/glue", "mrpc", "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c")
    assert {(r.metric_type, r.metric_value) for r in data.eval_results} == \
        {("accuracy", 0.86), ("f1", 0.9)}


@pytest.mark.parametrize("value", [float("nan"), None])
def test_an_undefined_metric_is_left_out_of_the_model_index(value):
    metrics = {"primary_split": "test", "test": {"accuracy": 0.5, "mcc": value, "examples": 4}}
    data = _card([], metrics).data
    assert [r.metric_type for r in data.eval_results] == ["accuracy"]
