"""A configurable task head on the headless ``AutoModel``: pooling, dense layers, dropout.

The checkpoint's own ``...ForSequenceClassification`` head is fixed by its architecture (BERT:
the pretrained pooler on the [CLS] token, dropout, one linear layer). ``PooledClassifier`` puts a
head of our choosing on any encoder ``AutoModel``: the [CLS] token or the mean over the attention
mask, then ``hidden_sizes`` dense layers with GELU and dropout. It is a ``PreTrainedModel`` with
its own config class, registered with ``AutoConfig`` and ``AutoModelForSequenceClassification``
on import, so ``save_pretrained`` / ``from_pretrained``, ``Trainer`` and ``transformers.pipeline``
treat it like any other model of the project.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput


class PooledClassifierConfig(PretrainedConfig):
    """The body's config (as a dict, to rebuild it with ``AutoConfig.for_model``) and the head's."""

    model_type = "pooled_classifier"

    def __init__(self, body: Optional[dict[str, Any]] = None, pooling: str = "cls",
                 hidden_sizes: Optional[list[int]] = None, head_dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.body = body or {}
        self.pooling = pooling
        self.hidden_sizes = list(hidden_sizes or [])
        self.head_dropout = head_dropout

    def body_config(self) -> PretrainedConfig:
        settings = dict(self.body)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


class PooledClassifier(PreTrainedModel):
    config_class = PooledClassifierConfig
    base_model_prefix = "body"

    def __init__(self, config: PooledClassifierConfig):
        super().__init__(config)
        self.body = AutoModel.from_config(config.body_config())
        layers: list[nn.Module] = []
        width = self.body.config.hidden_size
        for size in config.hidden_sizes:
            layers += [nn.Dropout(config.head_dropout), nn.Linear(width, size), nn.GELU()]
            width = size
        layers += [nn.Dropout(config.head_dropout), nn.Linear(width, config.num_labels)]
        self.head = nn.Sequential(*layers)
        self.post_init()

    # An explicit signature without **kwargs: Trainer would otherwise pass loss kwargs and skip
    # its own loss scaling, which this forward does not implement.
    def forward(self, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> SequenceClassifierOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:  # RoBERTa and DistilBERT take none
            inputs["token_type_ids"] = token_type_ids
        hidden = self.body(**inputs).last_hidden_state
        if self.config.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        else:
            pooled = hidden[:, 0]
        logits = self.head(pooled)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @classmethod
    def from_body(cls, pretrained_dir: str, *, pooling: str, hidden_sizes: list[int],
                  dropout: float, **config_kwargs) -> PooledClassifier:
        """A new head on the pretrained body in ``pretrained_dir``."""
        body = AutoModel.from_pretrained(pretrained_dir)
        config = PooledClassifierConfig(body=body.config.to_dict(), pooling=pooling,
                                        hidden_sizes=hidden_sizes, head_dropout=dropout,
                                        **config_kwargs)
        model = cls(config)
        model.body.load_state_dict(body.state_dict())
        return model


AutoConfig.register(PooledClassifierConfig.model_type, PooledClassifierConfig, exist_ok=True)
AutoModelForSequenceClassification.register(PooledClassifierConfig, PooledClassifier,
                                            exist_ok=True)
