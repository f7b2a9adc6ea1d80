"""The model the train stage starts from: the pretrained body plus a new task head."""

from __future__ import annotations

from typing import Any

from pipeline.config import HeadConfig


def build_model(pretrained_dir: str, label_names: list[str], head: HeadConfig,
                regression: bool = False) -> tuple[Any, list[str]]:
    """The pretrained body plus a new head: one output per label, or one score for regression.

    Returns the model and the names of the parameters that are new (the head): everything a
    ``head_only`` run trains. For the checkpoint's own head those are the parameters the
    checkpoint did not provide, so a head-less checkpoint's pooler counts as head.
    """
    from transformers import AutoModelForSequenceClassification

    if regression:
        id2label, extra = {0: "score"}, {"problem_type": "regression"}
    else:
        id2label = dict(enumerate(label_names))
        extra = {"problem_type": "single_label_classification"}
    settings = {"num_labels": len(id2label), "id2label": id2label,
                "label2id": {name: i for i, name in id2label.items()}, **extra}
    if head.type == "pooled":
        from pipeline.heads import PooledClassifier

        model = PooledClassifier.from_body(pretrained_dir, pooling=head.pooling,
                                           hidden_sizes=list(head.hidden_sizes),
                                           dropout=head.dropout, **settings)
        prefix = f"{model.base_model_prefix}."
        return model, [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
    model, info = AutoModelForSequenceClassification.from_pretrained(
        pretrained_dir, output_loading_info=True,
        # A checkpoint that already has a classifier head of another size gets a new one.
        ignore_mismatched_sizes=True, **settings)
    fresh = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    prefix = f"{model.base_model_prefix}."
    return model, [n for n, _ in model.named_parameters() if n in fresh or not n.startswith(prefix)]
