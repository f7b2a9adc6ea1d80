"""Length-sorted batched inference (the inference command's and the evaluate stage's one path)
and int8 dynamic quantization, on the tiny checkpoint."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from pipeline.commands.predict import main as predict
from pipeline.errors import ConfigError
from pipeline.evaluation import Predictor, quantization_record
from pipeline.inference import TEXT, TEXT_PAIR, Classifier

# Lengths out of order, a long row between short ones, more rows than one batch.
TEXTS = ["the film was dull", "this movie was brilliant and moving with a very charming cast "
         "and a really superb story", "the plot", "the acting was awful and boring",
         "the script was quite tedious with a lifeless ending", "the ending was superb",
         "a very delightful story with a charming cast", "dull"]
PAIRS = ["the plot was great", "awful", "the cast was charming and the story really moving",
         "boring", "the acting", "the script was clumsy and dreadful and quite dull", "story",
         "a superb film"]


def _alone(model, tokenizer, rows: list[dict[str, str]]) -> np.ndarray:
    """Each row through the model on its own: no padding, nothing batched or sorted."""
    logits = []
    with torch.inference_mode():
        for row in rows:
            inputs = tokenizer(row[TEXT], row.get(TEXT_PAIR), truncation=True,
                               return_tensors="pt")
            logits.append(model(**inputs).logits[0].numpy())
    return np.stack(logits)


def _record_batch_widths(model) -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    return shapes


@pytest.mark.parametrize("rows", [
    [{TEXT: text} for text in TEXTS],
    [{TEXT: text, TEXT_PAIR: pair} for text, pair in zip(TEXTS, PAIRS)],
    [{TEXT: text, TEXT_PAIR: pair} if i % 2 else {TEXT: text}
     for i, (text, pair) in enumerate(zip(TEXTS, PAIRS))],
], ids=["texts", "pairs", "mixed"])
def test_batched_logits_equal_each_row_alone_in_input_order(tiny_checkpoint, rows):
    classifier = Classifier(str(tiny_checkpoint), batch_size=3, precision="fp32")
    batched = classifier.logits(rows)
    alone = _alone(classifier.model, classifier.tokenizer, rows)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert (batched.argmax(axis=-1) == alone.argmax(axis=-1)).all()


def test_batches_hold_rows_of_similar_length_padded_to_their_longest(tiny_checkpoint):
    # Before: transformers.pipeline batched rows in input order, each padded to its longest.
    classifier = Classifier(str(tiny_checkpoint), batch_size=3)
    shapes = _record_batch_widths(classifier.model)
    classifier.logits([{TEXT: text} for text in TEXTS])
    lengths = sorted((len(classifier.tokenizer(text)["input_ids"]) for text in TEXTS),
                     reverse=True)
    assert shapes == [(len(lengths[i:i + 3]), lengths[i]) for i in range(0, len(lengths), 3)]
    assert classifier.logits([]).shape == (0, 2)


def test_evaluate_stage_predictor_equals_each_row_alone(tiny_checkpoint):
    predictor = Predictor(str(tiny_checkpoint), batch_size=3, precision="fp32")
    rows = [{TEXT: text, TEXT_PAIR: pair} for text, pair in zip(TEXTS, PAIRS)]
    encoding = predictor.tokenizer(TEXTS, PAIRS, truncation=True)
    split = datasets.Dataset.from_dict({**encoding, "labels": [0, 1] * 4})
    logits = predictor.logits(split)
    np.testing.assert_allclose(logits, _alone(predictor.model, predictor.tokenizer, rows),
                               atol=1e-5)


def test_quantize_makes_every_linear_layer_int8_and_still_predicts(tiny_checkpoint):
    classifier = Classifier(str(tiny_checkpoint), batch_size=3, quantize=True)
    modules = list(classifier.model.modules())
    assert not [m for m in modules if type(m) is torch.nn.Linear]
    quantized = [m for m in modules if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert quantized and all(m.weight().dtype == torch.qint8 for m in quantized)
    records = list(classifier.predict([{TEXT: text} for text in TEXTS]))
    assert [r[TEXT] for r in records] == TEXTS
    assert all(r["label"] in classifier.label_names for r in records)
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
               for r in records)


def test_evaluate_stage_keeps_the_fp32_model_beside_the_int8_one(tiny_checkpoint):
    predictor = Predictor(str(tiny_checkpoint), batch_size=3, quantize=True)
    assert any(type(m) is torch.nn.Linear for m in predictor.fp32.modules())
    assert not any(type(m) is torch.nn.Linear for m in predictor.model.modules())


def test_quantize_on_a_gpu_is_refused_in_one_line(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    message = r"^int8 dynamic quantization \(--quantize, eval.quantize\) runs on the CPU only"
    with pytest.raises(ConfigError, match=message):
        Classifier(str(tiny_checkpoint), quantize=True)
    with pytest.raises(ConfigError, match=message):
        Predictor(str(tiny_checkpoint), batch_size=8, quantize=True)
    assert predict(["--model", str(tiny_checkpoint), "--quantize", "some text"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("predict: error: int8 dynamic quantization")


def test_quantization_record_is_the_change_on_the_main_metric():
    labels = np.array([0, 1, 1, 0, 1])
    int8 = np.array([0, 1, 0, 0, 1])  # one more error than fp32
    fp32_logits = np.array([[1.0, 0], [0, 1], [0, 1], [1, 0], [0, 1]])
    assert quantization_record(labels, int8, fp32_logits, "accuracy", 2, False) == {
        "dtype": "int8", "accuracy_fp32": 1.0, "accuracy_change": -0.2, "changed_predictions": 1}
    scores = np.array([0.5, 1.5, 2.5, 3.5])
    record = quantization_record(scores, scores, scores[:, None] + 0.1, "pearson", 1, True)
    assert record == {"dtype": "int8", "pearson_fp32": pytest.approx(1.0),
                      "pearson_change": pytest.approx(0.0)}


def test_report_shows_the_int8_record_as_a_sentence_not_a_column():
    from pipeline.reporting import _metrics_table

    record = {"dtype": "int8", "accuracy_fp32": 0.975, "accuracy_change": -0.0047,
              "changed_predictions": 3}
    metrics = {"primary_split": "test",
               "test": {"accuracy": 0.9703, "macro_f1": 0.97, "examples": 426,
                        "quantization": record},
               "validation": {"accuracy": 0.96, "macro_f1": 0.95, "examples": 213}}
    table = _metrics_table(metrics)
    assert table.splitlines()[:4] == ["| split | examples | accuracy | macro_f1 |",
                                      "|---|---|---|---|",
                                      "| test | 426 | 0.9703 | 0.9700 |",
                                      "| validation | 213 | 0.9600 | 0.9500 |"]
    assert table.endswith("the released weights are fp32, which score accuracy 0.9750 on "
                          "**test** (int8 change -0.0047, 3 of 426 labels changed).")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch, tiny_checkpoint,
                                                                 native):
    """auto runs bf16 autocast where the CPU computes bf16 natively (and its labels stay those of
    fp32 here), fp32 elsewhere; int8 with bf16 is refused in one line."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    auto = Classifier(str(tiny_checkpoint), batch_size=3)
    assert auto.precision == ("bf16" if native else "fp32")
    assert Classifier(str(tiny_checkpoint), quantize=True).precision == "int8"
    rows = [{TEXT: text} for text in TEXTS]
    full = Classifier(str(tiny_checkpoint), batch_size=3, precision="fp32").logits(rows)
    bf16 = Classifier(str(tiny_checkpoint), batch_size=3, precision="bf16").logits(rows)
    assert not np.array_equal(full, bf16), "bf16 autocast ran"
    np.testing.assert_allclose(bf16, full, atol=0.05)
    with pytest.raises(ConfigError, match="use precision auto or fp32 with it, not bf16"):
        Classifier(str(tiny_checkpoint), quantize=True, precision="bf16")
