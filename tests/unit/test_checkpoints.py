"""The checkpoint files written without pickles (pipeline/checkpoints.py): what goes in comes
back exactly, so a resumed run continues as if never stopped."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.checkpoints import (
    load_optimizer,
    load_scaler,
    restore_rng_state,
    save_optimizer,
    save_rng_state,
    save_scaler,
)
from pipeline.config import LR_SCHEDULERS


def _train(steps: int, model, optimizer, scheduler) -> None:
    for _ in range(steps):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _setup():
    model = torch.nn.Linear(4, 2)
    # The optimizer the train stage uses (TrainingArguments optim="adamw_torch_fused").
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    return model, optimizer, scheduler


@pytest.mark.parametrize("process_index", [None, 1])
def test_optimizer_scheduler_and_random_states_come_back_bit_for_bit(tmp_path, process_index):
    torch.manual_seed(0)
    model, optimizer, scheduler = _setup()
    _train(3, model, optimizer, scheduler)
    save_optimizer(optimizer.state_dict(), scheduler.state_dict(), tmp_path)
    save_rng_state(tmp_path, process_index)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _train(2, model, optimizer, scheduler)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}
    draws = (random.random(), np.random.rand(), torch.rand(3))

    resumed, optimizer, scheduler = _setup()
    resumed.load_state_dict(weights)
    optimizer_state, scheduler_state = load_optimizer(tmp_path)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    assert restore_rng_state(tmp_path, process_index)
    _train(2, resumed, optimizer, scheduler)
    for key, value in uninterrupted.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == draws[:2] and torch.equal(again[2], draws[2])
    names = sorted(p.name for p in tmp_path.iterdir())
    rng = "rng_state.safetensors" if process_index is None else "rng_state_1.safetensors"
    assert names == sorted(["optimizer.safetensors", "scheduler.json", rng]), "no pickles"


def test_the_fp16_gradient_scaler_state_comes_back(tmp_path):
    state = {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
             "growth_interval": 2000, "_growth_tracker": 17}
    assert load_scaler(tmp_path) is None
    save_scaler(state, tmp_path)
    assert load_scaler(tmp_path) == state


def test_a_checkpoint_without_random_states_in_this_format_says_so(tmp_path):
    assert restore_rng_state(tmp_path, None) is False


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_scheduler_the_config_offers_saves_as_json(tmp_path, name):
    from transformers import get_scheduler

    model, optimizer, _ = _setup()
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step(*([0.5] if name == "reduce_lr_on_plateau" else []))
    save_optimizer(optimizer.state_dict(), scheduler.state_dict(), tmp_path)
    _, again = load_optimizer(tmp_path)
    fresh = get_scheduler(name, _setup()[1], num_warmup_steps=1, num_training_steps=10)
    fresh.load_state_dict(again)
    assert fresh.state_dict() == scheduler.state_dict()
