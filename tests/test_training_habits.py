"""Ordinary PyTorch training habits work with GSGD: a gradient scaler under bf16 autocast, lr
schedulers, SWA, gradient-norm clipping, step hooks, closures, a state_dict saved with
torch.save and loaded with weights_only=True, and Lightning with bf16-mixed and clipping."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import F64, assert_rel_close, batch, mse_backward, skeleton_chain
from gsgd import GSGD

WIDTHS = (6, 8, 8, 3)


def data(steps: int, seed: int = 1, dtype: torch.dtype = F64
         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` different regression batches for a net of WIDTHS."""
    return [batch(WIDTHS, size=16, seed=seed + k, dtype=dtype) for k in range(steps)]


def train(model: nn.Module, opt: torch.optim.Optimizer,
          batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in batches:
        mse_backward(model, x, y)
        opt.step()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


# ------------------------------------------------------------------ mixed precision


def scaled_step(model: nn.Module, opt: GSGD, scaler: torch.amp.GradScaler | None,
                x: torch.Tensor, y: torch.Tensor,
                corrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """One bf16-autocast step, through the scaler if one is given; ``corrupt`` edits the
    gradients between backward and the step."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.mse_loss(model(x), y)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if corrupt is not None:
        corrupt()
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    return loss.detach().float()


def test_grad_scaler_under_bf16_autocast_trains_like_unscaled_steps():
    model = skeleton_chain(WIDTHS)
    twin = copy.deepcopy(model)
    opt, twin_opt = GSGD(model, lr=0.05, momentum=0.9), GSGD(twin, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    start = snapshot(model)
    x, y = batch(WIDTHS, size=32, dtype=torch.float32)
    losses = [scaled_step(model, opt, scaler, x, y) for _ in range(6)]
    for _ in range(6):
        scaled_step(twin, twin_opt, None, x, y)
    assert losses[-1] < losses[0]
    assert not bitwise_equal(snapshot(model), start)
    assert scaler.get_scale() == 2.0 ** 16  # no step was skipped
    # the scale is a power of two: scaling and unscaling change no bit of the gradients
    assert bitwise_equal(snapshot(model), snapshot(twin))


def test_grad_scaler_skips_an_inf_step_and_leaves_the_weights_unchanged():
    model = skeleton_chain(WIDTHS)
    opt = GSGD(model, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(WIDTHS, size=32, dtype=torch.float32)
    scaled_step(model, opt, scaler, x, y)  # a momentum buffer exists
    before = snapshot(model)
    buffers = {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items()
               if "momentum_buffer" in s}
    assert buffers
    scale = scaler.get_scale()

    def inf_gradient() -> None:
        model[2].weight.grad[0, 0] = float("inf")

    scaled_step(model, opt, scaler, x, y, corrupt=inf_gradient)
    assert bitwise_equal(snapshot(model), before)
    assert scaler.get_scale() < scale
    for p, s in opt.state.items():
        if id(p) in buffers:
            assert torch.equal(s["momentum_buffer"], buffers[id(p)])
    assert opt.skipped_steps() == [0]  # the scaler skipped it; GSGD never saw the step
    scaled_step(model, opt, scaler, x, y)  # and training goes on
    assert not bitwise_equal(snapshot(model), before)


# ------------------------------------------------------------------ lr schedulers


PLATEAU_METRICS = [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8]

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "reduce on plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=1),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.8 ** epoch),
    "sequential linear then step": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3),
              torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)], milestones=[3]),
}


def lr_sequence(model: nn.Module, opt: torch.optim.Optimizer, kind: str) -> list[float]:
    sched = SCHEDULERS[kind](opt)
    lrs = [opt.param_groups[0]["lr"]]
    for (x, y), metric in zip(data(len(PLATEAU_METRICS)), PLATEAU_METRICS, strict=True):
        mse_backward(model, x, y)
        opt.step()
        if kind == "reduce on plateau":
            sched.step(metric)  # the same metrics for both optimizers: only the lr is compared
        else:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_lr_schedulers_change_the_lr_exactly_as_for_torch_sgd(kind):
    model = skeleton_chain(WIDTHS, dtype=F64)
    twin = copy.deepcopy(model)
    ours = lr_sequence(model, GSGD(model, lr=0.1, momentum=0.9), kind)
    theirs = lr_sequence(twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), kind)
    assert ours == theirs
    assert len(set(ours)) > 2  # the schedule did change the lr


# ------------------------------------------------------------------ SWA


def test_swa_averaged_model_holds_the_mean_of_the_weights_after_each_step():
    model = skeleton_chain(WIDTHS, dtype=F64)
    opt = GSGD(model, lr=0.05, momentum=0.9)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    sched = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=2)
    snapshots = []
    lrs = []
    for x, y in data(5):
        mse_backward(model, x, y)
        opt.step()
        averaged.update_parameters(model)
        sched.step()
        snapshots.append(snapshot(model))
        lrs.append(opt.param_groups[0]["lr"])
    assert int(averaged.n_averaged) == len(snapshots)
    assert lrs[-1] == pytest.approx(0.01) and lrs[0] != pytest.approx(0.01)
    for k, p in enumerate(averaged.module.parameters()):
        taken = torch.stack([s[k] for s in snapshots])
        assert not torch.equal(taken[0], taken[-1])
        assert_rel_close(p.detach(), taken.mean(0), 1e-12, f"parameter {k}")


# ------------------------------------------------------------------ gradient clipping


def test_clip_grad_norm_then_step_equals_a_step_with_the_gradients_scaled_by_hand():
    max_norm = 0.05
    model = skeleton_chain(WIDTHS, dtype=F64)
    by_hand, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    opts = [GSGD(m, lr=0.05, momentum=0.9) for m in (model, by_hand, unclipped)]
    for x, y in data(3):
        mse_backward(model, x, y)
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opts[0].step()

        mse_backward(by_hand, x, y)
        grads = [p.grad for p in by_hand.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in grads]))
        factor = min(1.0, max_norm / (float(norm) + 1e-6))  # clip_grad_norm_'s clip_coef
        assert factor < 1 and float(total) == pytest.approx(float(norm), rel=1e-12)
        for g in grads:
            g.mul_(factor)
        opts[1].step()

        mse_backward(unclipped, x, y)
        opts[2].step()
    for k, (p, q) in enumerate(zip(model.parameters(), by_hand.parameters(), strict=True)):
        assert_rel_close(p.detach(), q.detach(), 1e-12, f"parameter {k}")
    assert not bitwise_equal(snapshot(model), snapshot(unclipped))


# ------------------------------------------------------------------ step hooks


def test_step_pre_and_post_hooks_run_once_per_step_in_order():
    model = skeleton_chain(WIDTHS, dtype=F64)
    opt = GSGD(model, lr=0.05)
    events: list[tuple[str, int]] = []
    seen: list[list[torch.Tensor]] = []

    def pre(optimizer, args, kwargs):
        assert optimizer is opt
        seen.append(snapshot(model))
        events.append(("pre", len(seen)))

    def post(optimizer, args, kwargs):
        assert optimizer is opt
        assert not bitwise_equal(snapshot(model), seen[-1])  # the step ran in between
        events.append(("post", len(seen)))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    train(model, opt, data(3))
    assert events == [("pre", 1), ("post", 1), ("pre", 2), ("post", 2), ("pre", 3), ("post", 3)]
    for handle in handles:
        handle.remove()
    train(model, opt, data(1))
    assert len(events) == 6


# ------------------------------------------------------------------ closures


def test_step_with_a_closure_returns_its_loss_and_equals_backward_then_step():
    model = skeleton_chain(WIDTHS, dtype=F64)
    twin = copy.deepcopy(model)
    opt, twin_opt = GSGD(model, lr=0.05, momentum=0.9), GSGD(twin, lr=0.05, momentum=0.9)
    for x, y in data(3):
        returned = []

        def closure(x=x, y=y, returned=returned):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            returned.append(loss)
            return loss

        loss = opt.step(closure)
        assert len(returned) == 1 and loss is returned[0]
        expected = mse_backward(twin, x, y)
        twin_opt.step()
        assert torch.equal(loss.detach(), expected)
    assert bitwise_equal(snapshot(model), snapshot(twin))


# ------------------------------------------------------------------ checkpoints


def test_state_dict_saved_and_loaded_with_weights_only_resumes_bitwise(tmp_path):
    model = skeleton_chain(WIDTHS, dtype=F64)
    opt = GSGD(model, lr=0.05, momentum=0.9)
    batches = data(6)
    train(model, opt, batches[:3])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    twin = copy.deepcopy(model)
    # built with another lr: the loaded param groups bring back the saved one
    twin_opt = GSGD(twin, lr=0.01, momentum=0.9)
    twin_opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert twin_opt.param_groups[0]["lr"] == 0.05
    train(model, opt, batches[3:])
    train(twin, twin_opt, batches[3:])
    assert bitwise_equal(snapshot(model), snapshot(twin))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], twin_opt.state[q]["momentum_buffer"])


# ------------------------------------------------------------------ Lightning


def test_lightning_fits_with_bf16_mixed_precision_and_gradient_clipping():
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from test_lightning import Classifier, loader

    class ClippedClassifier(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.autocast_dtypes: list[torch.dtype | None] = []
            self.clipped_norms: list[float] = []

        def training_step(self, batch, batch_idx):
            self.autocast_dtypes.append(torch.get_autocast_dtype("cpu")
                                        if torch.is_autocast_enabled("cpu") else None)
            return super().training_step(batch, batch_idx)

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                        gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self.clipped_norms.append(float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

        def configure_optimizers(self):
            return GSGD(self.net, lr=0.05, momentum=0.9)

    module = ClippedClassifier()
    start = snapshot(module)
    trainer = pl.Trainer(max_steps=5, precision="bf16-mixed", gradient_clip_val=0.5,
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader())
    assert trainer.global_step == 5
    assert module.autocast_dtypes == [torch.bfloat16] * 5
    assert len(module.clipped_norms) == 5
    assert all(n <= 0.5 * (1 + 1e-5) for n in module.clipped_norms)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert not bitwise_equal(snapshot(module), start)
