"""`decoupled_adamw` on torch's fused kernel makes Composer's DecoupledAdamW updates, and their
checkpoints load into each other."""

from __future__ import annotations

import copy

import pytest
import torch
from composer.optim import DecoupledAdamW as ComposerDecoupledAdamW

from dbrx_train.training.optimizer import DecoupledAdamW


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 48, generator=g)), torch.nn.Parameter(torch.randn(48, generator=g))]


def train(optimizer, weights, steps: int, start: int = 0) -> None:
    """`steps` updates with gradients drawn per step and the learning rate halving over 10 steps."""
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + step)
        for p in weights:
            p.grad = torch.randn(p.shape, generator=g)
        for group in optimizer.param_groups:
            group['lr'] = group['initial_lr'] * (1 - step / 20)
        optimizer.step()


@pytest.mark.filterwarnings('ignore:You are using a high value of `weight_decay`')
@pytest.mark.parametrize('weight_decay', [0.0, 0.1])
def test_the_updates_are_composers_and_checkpoints_load_both_ways(weight_decay):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    theirs, ours = params(), params()
    composer_opt, fused = ComposerDecoupledAdamW(theirs, **kwargs), DecoupledAdamW(ours, **kwargs)
    train(composer_opt, theirs, 5)
    train(fused, ours, 5)
    for a, b, initial in zip(theirs, ours, params()):
        assert (b - initial).abs().max() > 0.01  # trained
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)

    # A checkpoint of one resumes with the other: the same next updates.
    resumed_ours, resumed_theirs = [p.detach().clone().requires_grad_() for p in theirs], \
        [p.detach().clone().requires_grad_() for p in ours]
    into_ours, into_theirs = DecoupledAdamW(resumed_ours, **kwargs), ComposerDecoupledAdamW(resumed_theirs, **kwargs)
    # Copies, as a checkpoint holds: a state dict shares its tensors (AdamW's step count) with the optimizer.
    into_ours.load_state_dict(copy.deepcopy(composer_opt.state_dict()))
    into_theirs.load_state_dict(copy.deepcopy(fused.state_dict()))
    for optimizer, weights in ((composer_opt, theirs), (into_ours, resumed_ours), (into_theirs, resumed_theirs)):
        train(optimizer, weights, 3, start=5)
    for a, b, c in zip(theirs, resumed_ours, resumed_theirs):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=0, atol=1e-6)
