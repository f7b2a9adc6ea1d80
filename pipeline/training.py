"""Train stage: the checkpoint plus a new head, trained on the tokenized data with the Hugging Face
Trainer, by one of three strategies: fine-tune everything, train the head alone on a frozen body
(transfer learning), or the head first and then everything (two phases, one model, one run)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np

from pipeline import checkpoints, registry, tracking
from pipeline.artifacts import atomic_dir, hash_path, write_json
from pipeline.checkpoints import CHECKPOINT_NAME, FINAL_STATE, checkpoint_problem
from pipeline.config import HeadConfig, PipelineConfig, RuntimeConfig, TrainConfig
from pipeline.contracts import (
    LABELS,
    is_regression,
    load_pretrained_tokenizer,
    load_tokenize_stats,
    validation_split_name,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.hardware import cpu_has_native_bf16
from pipeline.metrics import task_metrics, trainer_metrics
from pipeline.modeling import build_model

logger = logging.getLogger(__name__)


class NonFiniteLossError(PipelineError):
    """The training loss became NaN or infinite: training diverged and stops there."""


@dataclass(frozen=True)
class TrainResult:
    eval_metrics: dict[str, float]
    train_metrics: dict[str, float]
    history: list[dict[str, Any]]
    device: str
    precision: str
    precision_reason: str
    head_parameters: list[str]
    class_weights: Optional[dict[str, float]]


def resolve_precision(requested: str) -> tuple[str, str, str]:
    """(device, precision, why). ``auto``: bf16 on GPUs that support it, else fp16; on CPU bf16
    autocast where the CPU has native bf16 (:func:`cpu_has_native_bf16`), else fp32."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if requested == "auto":
        if cuda:
            if torch.cuda.is_bf16_supported():
                return device, "bf16", "auto: the GPU supports bf16"
            return device, "fp16", "auto: the GPU has no bf16"
        if cpu_has_native_bf16():
            return device, "bf16", "auto: the CPU has native bf16 (AVX512-BF16 or AMX)"
        return device, "fp32", "auto: the CPU has no native bf16 (it would emulate it, slower)"
    if requested == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU and none is available; use "
                          "auto, bf16 or fp32")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU has no bf16 support; use auto or fp16")
    if requested == "bf16" and not cuda and not cpu_has_native_bf16():
        logger.warning("train.precision=bf16 on a CPU without native bf16: emulated, slower than "
                       "fp32 (auto picks fp32 here)")
    return device, requested, f"train.precision={requested}"


def hardware_arguments(device: str, precision: str) -> dict[str, Any]:
    """The TrainingArguments that follow the hardware: autocast precision; on a GPU, TensorFloat-32
    for the fp32 work autocast leaves (Ampere and newer, compute capability 8), and the next
    batches collated in worker processes into pinned memory while this one trains."""
    import torch

    cuda = device == "cuda"
    tf32 = cuda and precision != "fp32" and torch.cuda.get_device_capability()[0] >= 8
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "tf32": tf32,
            "use_cpu": not cuda,
            "dataloader_num_workers": min(4, (os.cpu_count() or 1) // 2) if cuda else 0,
            "dataloader_persistent_workers": cuda, "dataloader_pin_memory": cuda}


def token_lengths(split: datasets.Dataset) -> list[int]:
    """Each row's token count, read from the Arrow column without decoding rows (Trainer's own
    fallback reads every row as Python lists, seconds per 100k rows)."""
    import pyarrow.compute as pc

    column = split.with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_pylist()


def run_fingerprint(cfg: PipelineConfig, tokenized_dir: str, pretrained_dir: str) -> str:
    """Identity of a training run: its inputs and settings, for resuming the right checkpoints
    (where it resumes from is not part of it)."""
    train = {k: v for k, v in asdict(cfg.train).items() if k != "resume_from"}
    key = json.dumps({"train": train, "head": asdict(cfg.head), "seed": cfg.seed,
                      "metric": cfg.dataset.main_metric, "metrics": cfg.dataset.metrics,
                      "data": hash_path(tokenized_dir), "model": hash_path(pretrained_dir)},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _cap(split: datasets.Dataset, limit: Optional[int], seed: int) -> datasets.Dataset:
    if limit is None or limit >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(limit))


def balanced_class_weights(labels: Sequence[int], num_labels: int) -> list[float]:
    """scikit-learn's "balanced" weights, n_samples / (n_classes * count of the class): every
    class then carries the same total weight in the loss, however rare. A class with no example
    gets 0; it is never a target, so its weight never enters the loss."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    return [float(len(labels) / (num_labels * count)) if count else 0.0 for count in counts]


def weighted_cross_entropy(logits, labels, weights):
    """Mean cross-entropy with each example weighted by its gold class's weight (normalised by
    the batch's total weight, as ``torch.nn.CrossEntropyLoss(weight=...)`` does)."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1), weight=weights.to(logits.device))


@dataclass(frozen=True)
class Phase:
    """One ``Trainer.train`` call: which weights train, at what rate (the config key that sets
    it), for how long."""

    name: str
    head_only: bool
    learning_rate: float
    epochs: float
    rate_key: str = "train.learning_rate"


def plan_phases(cfg: TrainConfig) -> list[Phase]:
    if cfg.strategy == "head_only":
        return [Phase("head_only", True, cfg.learning_rate, cfg.num_train_epochs)]
    if cfg.strategy == "two_phase":
        return [Phase("head", True, cfg.head_learning_rate, cfg.head_epochs,
                      "train.head_learning_rate"),
                Phase("full", False, cfg.learning_rate, cfg.num_train_epochs)]
    return [Phase("finetune", False, cfg.learning_rate, cfg.num_train_epochs)]


# An encoder layer's index in a parameter name: encoder.layer.3. (BERT, RoBERTa),
# transformer.layer.3. (DistilBERT), layers.3. (ModernBERT and most newer encoders).
_LAYER_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_rate_scales(model, decay: float) -> dict[str, float]:
    """Each trainable parameter's factor of the learning rate under layer-wise decay: the head
    (and anything above the encoder, such as BERT's pooler) 1, the top encoder layer ``decay``,
    each layer below it one more factor, the embeddings ``decay ** (layers + 1)``.

    Lower layers hold the general features pretraining built, the upper ones the task-specific
    ones, so the lower layers move less (Howard and Ruder 2018; Sun et al. 2019). Trainer has
    no option for it, hence the parameter groups here.
    """
    indices = {name: _LAYER_INDEX.search(name) for name, _ in model.named_parameters()}
    numbered = [int(match.group(1)) for match in indices.values() if match]
    if not numbered:
        raise ConfigError(f"train.layer_lr_decay={decay} needs an encoder of numbered layers "
                          f"(encoder.layer.N); {type(model).__name__} has none: set "
                          "train.layer_lr_decay=1")
    layers = max(numbered) + 1
    scales = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen (a head-only phase): in no optimizer group
            continue
        if indices[name]:
            depth = int(indices[name].group(1)) + 1
        elif "embeddings" in name.split("."):
            depth = 0
        else:
            depth = layers + 1
        scales[name] = decay ** (layers + 1 - depth)
    return scales


def last_complete_checkpoint(folder: Path, discard: bool) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``folder`` that is complete (:func:`checkpoint_problem`).

    Newer, incomplete ones (a crash while saving) are skipped with a warning and, with
    ``discard``, deleted: left there, the Trainer would pick them again and every later run
    would fail the same way. Only one process (rank 0) should discard.
    """
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir()
             if (m := CHECKPOINT_NAME.match(path.name)) and path.is_dir()]
    for _, checkpoint in sorted(found, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        logger.warning("skipping incomplete checkpoint %s: %s%s", checkpoint, problem,
                       "; deleted it" if discard else "")
        if discard:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def set_trainable(model, head_parameters: Sequence[str], head_only: bool) -> int:
    """Freeze the pretrained body (``head_only``) or unfreeze everything; returns how many
    weights will train. Trainer's optimizer only takes parameters that require gradients."""
    head = set(head_parameters)
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad = not head_only or name in head
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable


def _mlflow_callback():
    from transformers.integrations import MLflowCallback

    class PhasedMLflowCallback(MLflowCallback):
        """transformers' MLflow logging, one instance across phases.

        Reusing the instance logs the TrainingArguments params once (a second setup would try
        to overwrite them with the next phase's values, which MLflow refuses), and the step and
        epoch offsets keep phase 2's curves after phase 1's instead of on top of them.

        Its writes go through ``pipeline.tracking`` (:func:`tracking.callback_mlflow`), which
        keeps of its params only what the config does not say, logs ``eval_*`` as
        ``validation_*``, cuts values beyond MLflow's limits with a marker instead of dropping
        them with a warning that prints them whole, and moves the run to the pending store
        when the tracking server stops answering instead of stopping training. Its params come
        in one call, so that they can be picked from all of them.
        """

        step_offset = 0
        epoch_offset = 0.0

        def __init__(self):
            super().__init__()
            self._ml_flow = tracking.callback_mlflow()
            self._MAX_PARAM_VAL_LENGTH = float("inf")  # tracking cuts them instead
            self._MAX_PARAMS_TAGS_PER_BATCH = sys.maxsize

        def on_train_end(self, args, state, control, **kwargs):
            super().on_train_end(args, state, control, **kwargs)
            if state.is_world_process_zero:
                # What follows training logs with mlflow directly: meet an outage here.
                tracking.ensure_reachable()

        def on_log(self, args, state, control, logs, model=None, **kwargs):
            logs = dict(logs)
            if "epoch" in logs:
                logs["epoch"] += self.epoch_offset
            shifted = dataclasses.replace(state, global_step=state.global_step + self.step_offset)
            super().on_log(args, shifted, control, logs, model=model, **kwargs)

    return PhasedMLflowCallback()


def train_model(cfg: TrainConfig, head: HeadConfig, runtime: RuntimeConfig, *, seed: int,
                main_metric: str, metrics: Optional[Sequence[str]], pretrained_dir: str,
                tokenized_dir: str, output_dir: str, history_path: str, work_dir: str,
                log_to_mlflow: bool = False, log_checkpoints: str = "none",
                callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train ``pretrained_dir`` with a new ``head`` on ``tokenized_dir``; save the best model to
    ``output_dir``.

    Runs the phases of ``cfg.strategy`` one after the other on the same model. Each evaluates on
    the validation split every epoch and ends on its checkpoint with the best
    ``metric_for_best_model`` (default: the dataset's main metric). Checkpoints go to
    ``work_dir`` (one folder per phase); a run interrupted there resumes from its last complete
    checkpoint when started again with the same inputs (incomplete ones, left by a crash while
    saving, are deleted), and ``work_dir`` is removed after success unless
    ``runtime.keep_checkpoints``. With ``log_to_mlflow``, ``log_checkpoints`` says which go to
    the MLflow run as well (:mod:`pipeline.checkpoints`): ``best`` (the one the model is, at the
    end), ``all`` (each as it is saved) or ``none``.

    Raises:
        NonFiniteLossError: the training loss became NaN or infinite (at the first such step).
        ConfigError: the data does not fit the config (no validation split, a metric or class
            weights that do not apply).
    """
    from transformers import TrainerState, set_seed

    device, precision, precision_reason = resolve_precision(cfg.precision)
    logger.info("precision %s (%s)", precision, precision_reason)
    data = datasets.load_from_disk(tokenized_dir)
    validation = validation_split_name(list(data))
    if "train" not in data or validation is None:
        raise ConfigError(f"{tokenized_dir}: needs a train and a validation split, has "
                          f"{', '.join(data)}")
    regression = is_regression(data["train"], LABELS)
    label_names = [] if regression else data["train"].features[LABELS].names
    metric_names = task_metrics(metrics, main_metric, len(label_names), regression)
    train_split = _cap(data["train"], cfg.max_train_samples, seed)
    eval_split = _cap(data[validation], cfg.max_eval_samples, seed)
    class_weights = None
    if cfg.class_weights == "balanced":
        if regression:
            raise ConfigError("train.class_weights=balanced weights the classes of a "
                              f"classification task; {tokenized_dir} holds regression scores: "
                              "use none")
        class_weights = dict(zip(label_names, balanced_class_weights(train_split[LABELS],
                                                                     len(label_names))))
        logger.info("class weights (balanced, from %d training examples): %s", len(train_split),
                    ", ".join(f"{name} {weight:.4g}" for name, weight in class_weights.items()))

    set_seed(seed)  # before the new head is initialised
    tokenizer = load_pretrained_tokenizer(pretrained_dir)
    # Saved with the model, so inference on raw text truncates where training did.
    tokenizer.model_max_length = load_tokenize_stats(tokenized_dir)["max_length"]
    model, head_parameters = build_model(pretrained_dir, label_names, head, regression)
    metric = cfg.metric_for_best_model or main_metric
    if metric not in metric_names:
        raise ConfigError(f"train.metric_for_best_model={metric} is not among the metrics "
                          f"computed for this data: {', '.join(metric_names)}")
    phases = plan_phases(cfg)
    phase_dirs = [Path(work_dir) / phase.name if len(phases) > 1 else Path(work_dir)
                  for phase in phases]
    # Every rank reads the same folders and reaches the same choice; rank 0 alone deletes.
    resume_points = [last_complete_checkpoint(folder, discard=is_main_process())
                     for folder in phase_dirs]
    mlflow_callback = _mlflow_callback() if log_to_mlflow else None
    log_checkpoints = log_checkpoints if log_to_mlflow and is_main_process() else "none"
    checkpoint_logger = _checkpoint_logger() if log_checkpoints == "all" else None
    history: list[dict[str, Any]] = []
    step_offset, epoch_offset = 0, 0.0
    for index, (phase, phase_dir, resume) in enumerate(zip(phases, phase_dirs, resume_points)):
        final = phase_dir / FINAL_STATE
        if any(resume_points[index + 1:]) and (resume or final.is_file()):
            # Interrupted in a later phase: this one finished, and the later phase's checkpoint
            # holds every weight. Only its log is needed: its final state, since its last
            # checkpoint may be an earlier, best one (save_total_limit=1 keeps no other). A
            # checkpoint fetched from MLflow (train.resume_from) comes with that state alone.
            state = TrainerState.load_from_json(
                str(final if final.is_file() else Path(resume) / "trainer_state.json"))
            log_history, global_step = state.log_history, state.global_step
            if not final.is_file() and is_main_process():
                write_json(final, dataclasses.asdict(state))
            logger.info("phase %s finished before the interruption", phase.name)
        else:
            if checkpoint_logger:
                checkpoint_logger.phase = phase.name if len(phases) > 1 else None
                for earlier in phases[:index]:
                    checkpoints.log_final_state(Path(work_dir) / earlier.name / FINAL_STATE,
                                                earlier.name)
            trainable = set_trainable(model, head_parameters, phase.head_only)
            trainer = _trainer(cfg, runtime, phase, model, tokenizer, train_split, eval_split,
                               str(phase_dir), device, precision, seed, metric, output_dir,
                               functools.partial(trainer_metrics, metrics=metric_names,
                                                 num_labels=len(label_names) or 1),
                               [*callbacks, *([mlflow_callback] if mlflow_callback else []),
                                *([checkpoint_logger] if checkpoint_logger else [])],
                               class_weights=(list(class_weights.values()) if class_weights
                                              else None),
                               step_offset=step_offset,
                               phase_label=phase.name if len(phases) > 1 else None)
            logger.info("phase %s: %s of %s weights train (%s), lr %g, %g epochs, %d examples, "
                        "validate on %s (%d), %s %s, best checkpoint by %s", phase.name,
                        f"{trainable:,}", f"{model.num_parameters():,}",
                        "head only" if phase.head_only else "all", phase.learning_rate,
                        phase.epochs, len(train_split), validation, len(eval_split), device,
                        precision, metric)
            if resume:
                logger.info("resuming from %s", resume)
            train_output = trainer.train(resume_from_checkpoint=resume)
            log_history, global_step = trainer.state.log_history, trainer.state.global_step
            if index < len(phases) - 1 and is_main_process():
                write_json(phase_dir / FINAL_STATE, dataclasses.asdict(trainer.state))
        for entry in log_history:
            shifted = {**entry, "phase": phase.name, "step": entry.get("step", 0) + step_offset}
            if "epoch" in entry:
                shifted["epoch"] = entry["epoch"] + epoch_offset
            history.append(shifted)
        step_offset, epoch_offset = step_offset + global_step, epoch_offset + phase.epochs
        if mlflow_callback:
            mlflow_callback.step_offset, mlflow_callback.epoch_offset = step_offset, epoch_offset
    # The best checkpoint's own evaluation (of the last phase), rather than a second pass.
    best_step = trainer.state.best_global_step
    eval_metrics = next((h for h in trainer.state.log_history
                         if "eval_loss" in h and h["step"] == best_step), {})
    if trainer.is_world_process_zero():
        with atomic_dir(output_dir) as tmp:
            # Not trainer.save_model: it adds training_args.bin, a pickle; the model directory
            # holds safetensors weights, config and tokenizer only.
            set_trainable(model, head_parameters, head_only=False)
            trainer.model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        write_json(history_path, history)
        if log_checkpoints == "best":
            _log_best_checkpoint(trainer.state, phases, Path(work_dir))
        if not runtime.keep_checkpoints:
            shutil.rmtree(work_dir, ignore_errors=True)
    return TrainResult(
        eval_metrics=validation_metrics(eval_metrics),
        train_metrics=dict(train_output.metrics),
        history=history,
        device=device,
        precision=precision,
        precision_reason=precision_reason,
        head_parameters=list(head_parameters),
        class_weights=class_weights,
    )


def _checkpoint_logger():
    from transformers import TrainerCallback

    class CheckpointLogger(TrainerCallback):
        """Logs each checkpoint to the MLflow run as soon as Trainer has saved it (after it
        deleted the ones ``save_total_limit`` lets go), under the current ``phase``."""

        phase: Optional[str] = None

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoints.log_checkpoint(
                    Path(args.output_dir) / f"checkpoint-{state.global_step}", self.phase)

    return CheckpointLogger()


def _log_best_checkpoint(state, phases: Sequence[Phase], work_dir: Path) -> None:
    """Log the last phase's best checkpoint (the trained model, resumable) and the final states
    of the phases before it."""
    several = len(phases) > 1
    if state.best_model_checkpoint is None:
        logger.warning("no best checkpoint to log to MLflow (tracking.log_checkpoints=best)")
        return
    for earlier in phases[:-1]:
        checkpoints.log_final_state(work_dir / earlier.name / FINAL_STATE, earlier.name)
    checkpoints.log_checkpoint(Path(state.best_model_checkpoint),
                               phases[-1].name if several else None)


@functools.cache
def _trainer_class():
    """``Trainer`` with the project's changes, defined on first use (importing transformers
    takes seconds, which the stage's ``--help`` should not pay)."""
    import torch
    from transformers import Trainer

    class PipelineTrainer(Trainer):
        """Trainer that stops at the first non-finite training loss, keeps NaN and infinity out
        of every log, and weights the classes' cross-entropy when given ``class_weights``.

        The loss check overrides ``training_step`` because no callback sees each step's loss:
        ``on_step_end`` gets none, and ``on_log`` gets an average over ``logging_steps`` in
        which ``logging_nan_inf_filter`` (on by default) has already replaced a NaN step by
        the running mean, so a diverged run would go on for hours of NaN steps looking fine.
        Reading the step's loss costs no extra device sync (Trainer reads it back for that
        filter every step anyway), and raising there, before the optimizer step, leaves the
        weights and the checkpoints on disk finite.

        The class weights live in ``compute_loss`` rather than in the models: one place covers
        the checkpoint's own head (whose loss takes no weights) and the pooled head alike, and
        the saved model stays a plain classifier with nothing of training in its config. It
        weights the validation loss too, so ``eval_loss`` measures the objective being trained.
        Without weights it is Trainer's own loss, untouched.

        Its checkpoints hold no pickle (:mod:`pipeline.checkpoints`): the optimizer, scheduler,
        scaler and random states are safetensors and JSON, and the TrainingArguments pickle
        (``training_args.bin``, which no resume reads) is not written. It still resumes from a
        checkpoint an older version pickled (Trainer's own loading, ``weights_only``).
        """

        def __init__(self, *args, class_weights: Optional[Sequence[float]] = None,
                     step_offset: int = 0, phase_label: Optional[str] = None,
                     rate_key: str = "train.learning_rate", layer_lr_decay: float = 1.0,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.layer_lr_decay = layer_lr_decay
            self.class_weights = (None if class_weights is None
                                  else torch.tensor(class_weights, dtype=torch.float32))
            if class_weights is not None:
                self.loss_is_scaled_for_ga = False  # a per-batch mean, as Trainer expects
            self.step_offset = step_offset
            self.phase_label = phase_label
            self.rate_key = rate_key
            self._real_tokens = torch.zeros((), dtype=torch.int64)
            self._batch_tokens = 0

        def create_optimizer(self, model=None):
            if self.layer_lr_decay == 1 or self.optimizer is not None:
                return super().create_optimizer(model)
            model = self.model if model is None else model
            decayed = set(self.get_decay_parameter_names(model))
            params = dict(model.named_parameters())
            groups: dict[tuple[float, float], list] = {}
            for name, scale in layer_rate_scales(model, self.layer_lr_decay).items():
                weight_decay = self.args.weight_decay if name in decayed else 0.0
                groups.setdefault((scale, weight_decay), []).append(params[name])
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            # The head's group first: Trainer logs the first group's rate as learning_rate.
            self.optimizer = optimizer_cls(
                [{"params": params, "weight_decay": weight_decay,
                  "lr": self.args.learning_rate * scale}
                 for (scale, weight_decay), params in sorted(groups.items(), reverse=True)],
                **kwargs)
            return self.optimizer

        def _get_train_sampler(self, train_dataset=None):
            # Trainer's own group_by_length sampler, given the lengths from Arrow.
            split = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or \
                    not isinstance(split, datasets.Dataset):
                return super()._get_train_sampler(train_dataset)
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=token_lengths(split))

        def _get_eval_sampler(self, eval_dataset):
            # Longest rows first, so each batch pads to rows of its own length; the metrics do
            # not depend on the order. Several processes keep Trainer's sharded order.
            if self.args.world_size > 1 or not isinstance(eval_dataset, datasets.Dataset):
                return super()._get_eval_sampler(eval_dataset)
            lengths = token_lengths(eval_dataset)
            return sorted(range(len(lengths)), key=lambda row: -lengths[row])

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            if mask is not None:  # summed on the device: no sync per step
                self._real_tokens = self._real_tokens.to(mask.device) + mask.sum()
                self._batch_tokens += mask.numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                step = self.state.global_step + 1 + self.step_offset
                phase = f" (phase {self.phase_label})" if self.phase_label else ""
                raise NonFiniteLossError(
                    f"training loss is {loss.float().mean().item()} at step {step} of "
                    f"{self.state.max_steps + self.step_offset}{phase}: training diverged and "
                    f"stopped there; lower {self.rate_key}, or look for extreme values in the "
                    "data")
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.class_weights is None or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            loss = weighted_cross_entropy(logits, inputs["labels"], self.class_weights)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            # MLflow would store NaN or infinity as a number (and JSON has neither): a value
            # that is not finite is left out of the history and of every callback, with a
            # warning naming it.
            dropped = {k: v for k, v in logs.items()
                       if isinstance(v, numbers.Real) and not math.isfinite(v)}
            if dropped:
                logger.warning("step %d: not logging non-finite %s",
                               self.state.global_step + self.step_offset,
                               ", ".join(f"{k}={v}" for k, v in dropped.items()))
            logs = {k: v for k, v in logs.items() if k not in dropped}
            if "train_runtime" in logs and self._batch_tokens:
                # The end of train(): how much of the work was real tokens, not padding.
                real = int(self._real_tokens.item())
                logs["train_tokens_per_second"] = round(real / logs["train_runtime"], 1)
                logs["train_padding_share"] = round(1 - real / self._batch_tokens, 4)
            super().log(logs, start_time)

        def _process_index(self) -> Optional[int]:
            return self.args.process_index if self.args.world_size > 1 else None

        def _save(self, output_dir=None, state_dict=None):
            # Trainer's own, less training_args.bin (the project's models are PreTrainedModels).
            if self.args.should_save:
                output_dir = output_dir or self.args.output_dir
                os.makedirs(output_dir, exist_ok=True)
                self.model.save_pretrained(output_dir, state_dict=state_dict)
                self.processing_class.save_pretrained(output_dir)

        def _save_optimizer_and_scheduler(self, output_dir):
            if self.args.should_save:
                checkpoints.save_optimizer(self.optimizer.state_dict(),
                                           self.lr_scheduler.state_dict(), output_dir)

        def _save_scaler(self, output_dir):
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and self.args.should_save:
                checkpoints.save_scaler(scaler.state_dict(), output_dir)

        def _save_rng_state(self, output_dir):
            checkpoints.save_rng_state(output_dir, self._process_index())

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or not (Path(checkpoint) / checkpoints.OPTIMIZER_FILE).is_file():
                return super()._load_optimizer_and_scheduler(checkpoint)
            optimizer, scheduler = checkpoints.load_optimizer(checkpoint)
            self.optimizer.load_state_dict(optimizer)
            self.lr_scheduler.load_state_dict(scheduler)

        def _load_scaler(self, checkpoint):
            state = checkpoints.load_scaler(checkpoint) if checkpoint is not None else None
            if state is None:
                return super()._load_scaler(checkpoint)
            self.accelerator.scaler.load_state_dict(state)

        def _load_rng_state(self, checkpoint):
            if checkpoint is not None and \
                    checkpoints.restore_rng_state(checkpoint, self._process_index()):
                return
            super()._load_rng_state(checkpoint)

    return PipelineTrainer


def _trainer(cfg: TrainConfig, runtime: RuntimeConfig, phase: Phase, model, tokenizer,
             train_split, eval_split, work_dir: str, device: str, precision: str, seed: int,
             metric: str, output_dir: str, compute_metrics, callbacks: list[Any], *,
             class_weights: Optional[Sequence[float]] = None, step_offset: int = 0,
             phase_label: Optional[str] = None):
    from transformers import DataCollatorWithPadding, TrainingArguments

    args = TrainingArguments(
        output_dir=work_dir,
        learning_rate=phase.learning_rate,
        num_train_epochs=phase.epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=runtime.eval_batch_size,
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
        save_total_limit=runtime.save_total_limit,
        # Rows of similar length batched together pad little (random order within groups).
        train_sampling_strategy=cfg.sampling,
        # One fused kernel per step instead of a loop over the weights (CPU and CUDA alike).
        optim="adamw_torch_fused",
        **hardware_arguments(device, precision),
        seed=seed,
        # Classification losses here are per-example means that ignore Trainer's token count;
        # with averaging on, Trainer would multiply them by the number of processes under
        # DDP, doubling the logged losses and the gradients of a 2-process run.
        average_tokens_across_devices=False,
        report_to=[],
        run_name=Path(output_dir).name,
    )
    return _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_split,
        eval_dataset=eval_split,
        processing_class=tokenizer,
        # Multiples of 8 let tensor cores work on GPU; on CPU they only add padding.
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device == "cuda"
                                              else None),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        class_weights=class_weights,
        step_offset=step_offset,
        phase_label=phase_label,
        rate_key=phase.rate_key,
        layer_lr_decay=cfg.layer_lr_decay,
    )


def is_main_process() -> bool:
    """False in a torchrun worker other than rank 0, which trains its share but records nothing."""
    return int(os.environ.get("RANK", "0")) == 0


def validation_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's entry of the Trainer's log as metrics: without the ``eval_`` prefix and
    without its timings."""
    return {k.removeprefix("eval_"): v for k, v in entry.items()
            if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}


# The files of paths.curves_dir; dvc.yaml's top-level `plots` name them.
TRAIN_CURVE, VALIDATION_CURVE = "train.tsv", "validation.tsv"
TRAIN_CURVE_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")


def write_curves(history: Sequence[dict[str, Any]], curves_dir: str) -> None:
    """Write the training history as the curves ``dvc plots`` draws: ``train.tsv``, a row per
    logging step (:data:`TRAIN_CURVE_FIELDS`), and ``validation.tsv``, a row per evaluation
    (step, epoch, then the validation loss and metrics). DVC plots a file only when all its rows
    have the same fields, which the history's mix of training, evaluation and summary entries has
    not; steps and epochs are the history's, continuing across the phases of a run."""
    evaluations = [entry for entry in history if "eval_loss" in entry]
    names = list(validation_metrics(evaluations[0])) if evaluations else ["loss"]
    with atomic_dir(curves_dir) as tmp:
        _write_tsv(tmp / TRAIN_CURVE, TRAIN_CURVE_FIELDS,
                   [[entry.get(field, "") for field in TRAIN_CURVE_FIELDS]
                    for entry in history if "loss" in entry])
        _write_tsv(tmp / VALIDATION_CURVE, ["step", "epoch", *names],
                   [[entry["step"], entry["epoch"],
                     *(validation_metrics(entry).get(name, "") for name in names)]
                    for entry in evaluations])


def _write_tsv(path: Path, header: Sequence[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def train_and_record(cfg: PipelineConfig, *, model_dir: str, history_path: str, work_dir: str,
                     curves_dir: str, run_name: str, log_model: bool,
                     tags: Optional[dict[str, str]] = None, register: bool = True
                     ) -> dict[str, float]:
    """The train stage: train by :func:`train_model` into ``model_dir`` inside one MLflow run
    (rank 0 only) named ``run_name`` that holds the config, the lineage of data and pretrained
    weights with the dataset's splits as inputs, the curves, the validation metrics, the
    checkpoints ``tracking.log_checkpoints`` names and, with ``log_model``, the model; the curves
    also go to ``curves_dir`` for ``dvc plots`` (:func:`write_curves`). With ``register`` the
    logged model becomes a version of ``tracking.registered_model`` (:mod:`pipeline.registry`).
    ``train.resume_from`` first fetches its checkpoint into ``work_dir``
    (:func:`pipeline.checkpoints.fetch`). Returns the best checkpoint's validation metrics (what
    a sweeper optimises)."""
    paths = cfg.paths
    fingerprint = run_fingerprint(cfg, paths.tokenized_dir, paths.pretrained_dir)
    if cfg.train.resume_from:
        checkpoints.fetch(cfg.train.resume_from, Path(work_dir),
                          [phase.name for phase in plan_phases(cfg.train)], fingerprint)
    fit = functools.partial(train_model, cfg.train, cfg.head, cfg.runtime, seed=cfg.seed,
                            main_metric=cfg.dataset.main_metric, metrics=cfg.dataset.metrics,
                            pretrained_dir=paths.pretrained_dir, tokenized_dir=paths.tokenized_dir,
                            output_dir=model_dir, history_path=history_path, work_dir=work_dir,
                            log_checkpoints=cfg.tracking.log_checkpoints)
    if not is_main_process():
        return fit(log_to_mlflow=False).eval_metrics
    with tracking.stage_run("train", cfg, parent_run_id=os.environ.get(tracking.SWEEP_PARENT_ENV),
                            run_name=run_name, log_params=True) as run:
        tracking.set_tags({**tracking.lineage_tags(paths.raw_dir, paths.pretrained_dir,
                                                   paths.tokenized_dir),
                           checkpoints.FINGERPRINT_TAG: fingerprint,
                           "world_size": os.environ.get("WORLD_SIZE", "1"), **(tags or {})})
        tracking.log_dataset_inputs(paths.raw_dir)
        tracking.log_config(cfg)
        tracking.log_dvc_lock()
        result = fit(log_to_mlflow=True)
        write_curves(result.history, curves_dir)
        steps = max((entry["step"] for entry in result.history), default=0)
        tracking.set_tags({tracking.MODEL_SHA_TAG: hash_path(model_dir),
                           tracking.TRAIN_STEPS_TAG: str(steps),
                           "device": result.device, "precision": result.precision,
                           "precision_reason": result.precision_reason})
        # The kept (best) checkpoint's, after the per-epoch values at the last step: what the
        # runs table and a sweep compare. MLflow would store NaN or infinity as a number: such
        # a value is left out.
        tracking.log_metrics({f"validation_{k}": v for k, v in result.eval_metrics.items()
                              if isinstance(v, (int, float)) and math.isfinite(v)}, step=steps)
        if log_model:
            logged = tracking.log_model(model_dir, tracking.input_example(paths.raw_dir))
            if register and cfg.tracking.registered_model:
                # Validation metrics of a capped validation split compare with no other run's.
                registry.register_model(run.info.run_id, logged.model_uri,
                                        cfg.tracking.registered_model, cfg.dataset.main_metric,
                                        compete=cfg.train.max_eval_samples is None)
    return result.eval_metrics
