"""GSGD inside the Hugging Face Trainer: Trainer(optimizers=(GSGD(...), scheduler)) trains with
it (the frozen child edges stay at their skeleton value 1: it was G-SGD that stepped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from conftest import skeleton_chain  # noqa: E402
from gsgd import GSGD  # noqa: E402


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = skeleton_chain([10, 16, 16, 3])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_hf_trainer_trains_with_gsgd_and_its_scheduler(tmp_path):
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(64, 10, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    data = [{"x": x, "labels": y} for x, y in zip(xs, ys, strict=True)]
    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    opt = GSGD(model.net, lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(opt, sched))
    result = trainer.train()
    assert result.global_step == 8
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 2)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    middle = model.net[2].weight.detach()  # 16 x 16: kappa(a) = (a, a) are frozen child edges
    assert torch.equal(torch.diagonal(middle), torch.ones(16))
