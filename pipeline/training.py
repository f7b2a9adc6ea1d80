"""Train stage: fine-tune the checkpoint on the tokenized data with the Hugging Face Trainer."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import datasets

from pipeline.artifacts import atomic_dir, hash_path, write_json
from pipeline.config import TrainConfig
from pipeline.data import validation_split_name
from pipeline.errors import ConfigError
from pipeline.evaluation import trainer_metrics
from pipeline.modeling import build_model, load_tokenizer
from pipeline.tokenization import LABELS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    eval_metrics: dict[str, float]
    train_metrics: dict[str, float]
    history: list[dict[str, Any]]
    device: str
    precision: str


def resolve_precision(requested: str) -> tuple[str, str]:
    """(device, precision): bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if requested == "auto":
        if not cuda:
            return device, "fp32"
        return device, "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"train.precision={requested} needs a CUDA GPU and none is available; "
                          "use auto or fp32")
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU has no bf16 support; use auto or fp16")
    return device, requested


def run_fingerprint(cfg: TrainConfig, seed: int, main_metric: str, tokenized_dir: str,
                    checkpoint_dir: str) -> str:
    """Identity of a training run: its inputs and settings, for resuming the right checkpoints."""
    key = json.dumps({"train": asdict(cfg), "seed": seed, "metric": main_metric,
                      "data": hash_path(tokenized_dir), "model": hash_path(checkpoint_dir)},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _cap(split: datasets.Dataset, limit: Optional[int], seed: int) -> datasets.Dataset:
    if limit is None or limit >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(limit))


def train_model(cfg: TrainConfig, *, seed: int, main_metric: str, checkpoint_dir: str,
                tokenized_dir: str, output_dir: str, history_path: str, work_dir: str,
                report_to: Sequence[str] = (), callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune ``checkpoint_dir`` on ``tokenized_dir`` and save the best model to ``output_dir``.

    Evaluates on the validation split each epoch and keeps the checkpoint with the best
    ``metric_for_best_model`` (default: the dataset's main metric). Checkpoints go to
    ``work_dir``; a run interrupted there resumes from its last checkpoint when started again
    with the same inputs, and ``work_dir`` is removed after success unless
    ``cfg.keep_checkpoints``.
    """
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    device, precision = resolve_precision(cfg.precision)
    data = datasets.load_from_disk(tokenized_dir)
    validation = validation_split_name(list(data))
    if "train" not in data or validation is None:
        raise ConfigError(f"{tokenized_dir}: needs a train and a validation split, has "
                          f"{', '.join(data)}")
    label_names = data["train"].features[LABELS].names
    train_split = _cap(data["train"], cfg.max_train_samples, seed)
    eval_split = _cap(data[validation], cfg.max_eval_samples, seed)

    set_seed(seed)  # before the new head is initialised
    tokenizer = load_tokenizer(checkpoint_dir)
    model = build_model(checkpoint_dir, label_names)
    metric = cfg.metric_for_best_model or main_metric
    args = TrainingArguments(
        output_dir=work_dir,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of all steps (transformers 5)
        lr_scheduler_type=cfg.lr_scheduler_type,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=True,
        save_total_limit=cfg.save_total_limit,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        seed=seed,
        report_to=list(report_to),
        run_name=Path(output_dir).name,
    )
    world = max(args.world_size, 1)
    steps_per_epoch = -(-len(train_split) // (cfg.per_device_train_batch_size * world))
    logger.info("train %d examples, validate on %s (%d); %d steps/epoch, batch %d x %d process(es), "
                "%s %s, best checkpoint by %s", len(train_split), validation, len(eval_split),
                steps_per_epoch, cfg.per_device_train_batch_size, world, device, precision, metric)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_split,
        eval_dataset=eval_split,
        processing_class=tokenizer,
        # Multiples of 8 let tensor cores work on GPU; on CPU they only add padding.
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device == "cuda"
                                              else None),
        compute_metrics=functools.partial(trainer_metrics, num_labels=len(label_names)),
        callbacks=list(callbacks),
    )
    resume = get_last_checkpoint(work_dir) if Path(work_dir).is_dir() else None
    if resume:
        logger.info("resuming from %s", resume)
    train_output = trainer.train(resume_from_checkpoint=resume)
    # The best checkpoint's own evaluation, rather than a second pass over the validation split.
    best_step = trainer.state.best_global_step
    eval_metrics = next((h for h in trainer.state.log_history
                         if "eval_loss" in h and h["step"] == best_step), {})
    if trainer.is_world_process_zero():
        with atomic_dir(output_dir) as tmp:
            # Not trainer.save_model: it adds training_args.bin, a pickle; the model directory
            # holds safetensors weights, config and tokenizer only.
            trainer.model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        write_json(history_path, trainer.state.log_history)
        if not cfg.keep_checkpoints:
            shutil.rmtree(work_dir, ignore_errors=True)
    return TrainResult(
        eval_metrics={k.removeprefix("eval_"): v for k, v in eval_metrics.items()
                      if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))},
        train_metrics=dict(train_output.metrics),
        history=trainer.state.log_history,
        device=device,
        precision=precision,
    )
