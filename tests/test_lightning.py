"""GSGD inside Lightning: configure_optimizers returns it (with a scheduler dict), fit trains,
and resuming from a checkpoint gives the parameters of an uninterrupted run bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

lightning = pytest.importorskip("lightning")

from conftest import skeleton_chain  # noqa: E402
from gsgd import GSGD  # noqa: E402


class Classifier(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        # the paper's init belongs here, not in configure_optimizers: Lightning builds the
        # optimizer again on resume, after loading the weights
        self.net = skeleton_chain([10, 16, 16, 3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = GSGD(self.net, lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 10, generator=gen),
                                          torch.randint(0, 3, (64,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=16)


def trainer(epochs: int, root) -> lightning.Trainer:
    return lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=root, enable_checkpointing=False)


def test_lightning_fit_and_resume_from_a_checkpoint_equal_an_uninterrupted_run(tmp_path):
    whole = Classifier()
    trainer(4, tmp_path / "whole").fit(whole, loader())
    first = Classifier()
    start = [p.detach().clone() for p in first.parameters()]
    half = trainer(2, tmp_path / "half")
    half.fit(first, loader())
    half.save_checkpoint(tmp_path / "half.ckpt")
    resumed = Classifier()
    trainer(4, tmp_path / "resumed").fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, s) for p, s in zip(whole.parameters(), start, strict=True))
