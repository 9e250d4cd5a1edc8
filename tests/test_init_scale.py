"""No model is ruined silently: a badly scaled init warns at construction, init='skeleton' asks
for the paper's init explicitly, heavy clipping and repeated skipping warn, and the non-finite
error names the likely cause."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd import GSGD, InitScaleWarning, NonFiniteError, discover, skeleton_init


def default_mlp() -> nn.Module:
    """784-256-256-10 with PyTorch's default init (the issue's case)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))


def no_warning(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InitScaleWarning)
        return make()


def test_a_default_initialised_mlp_warns_with_the_measured_amplification_and_the_fix():
    model = default_mlp()
    with pytest.warns(InitScaleWarning, match=r"amplified 1\.\d+e\+07x.*init='skeleton'"):
        opt = GSGD(model, lr=0.1)
    ((amplification, layer),) = opt.step_amplification()
    assert amplification > 1e6 and layer.endswith(".weight")


def test_the_skeleton_init_does_not_warn():
    model = default_mlp()
    skeleton_init(model, discover(model))
    opt = no_warning(lambda: GSGD(model, lr=0.1))
    assert opt.step_amplification()[0][0] == pytest.approx(1.0)


def test_init_skeleton_applies_the_papers_init_and_none_leaves_the_weights_alone():
    model, untouched = default_mlp(), default_mlp()
    no_warning(lambda: GSGD(model, lr=0.1, init="skeleton"))
    assert float(model[2].weight[0, 0]) == 1.0 and float(model[2].weight[0, 1]) != 1.0
    with pytest.warns(InitScaleWarning):
        GSGD(untouched, lr=0.1)
    assert torch.equal(untouched[2].weight, default_mlp()[2].weight)


def test_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match="invalid init='he'"):
        GSGD(default_mlp(), init="he")


def batch_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(16, 784, generator=gen)),
                    torch.randint(0, 10, (16,), generator=gen)).backward()
    opt.step()


def test_a_step_that_clips_most_carrier_ratios_warns_that_the_lr_is_too_large():
    model = default_mlp()
    opt = GSGD(model, lr=1e4, init="skeleton")
    with pytest.warns(InitScaleWarning, match=r"changed \d+ of 256 carrier ratios"):
        batch_step(model, opt)
    assert opt.clip_counts()[0] >= 128


def test_the_non_finite_error_names_the_likely_cause_before_skip_mode():
    model = default_mlp()
    with pytest.warns(InitScaleWarning):
        opt = GSGD(model, lr=0.1)
    with pytest.raises(NonFiniteError, match=r"lr too large for this init.*on_nonfinite='skip'"):
        for seed in range(5):
            batch_step(model, opt, seed)


def test_skip_mode_warns_when_it_keeps_skipping():
    model = default_mlp()
    with pytest.warns(InitScaleWarning):
        opt = GSGD(model, lr=0.1, on_nonfinite="skip")
    for seed in range(6):
        batch_step(model, opt, seed)
    with pytest.warns(InitScaleWarning, match=r"\d+ of the last 6 steps were skipped"):
        skipped = opt.skipped_steps()
    assert skipped[0] >= 2
