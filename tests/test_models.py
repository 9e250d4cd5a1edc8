"""The paper's models: shapes, determinism, parameter counts, their G-block summaries, and a
training smoke test of G-SGD on PlainNet and ResNet (float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsgd.discovery import discover
from gsgd.group import skeleton_init
from gsgd.models import PlainNet, ResNet, mlp, plainnet, resnet
from gsgd.models.cnn import stage_layout
from gsgd.optim import GSGD

DEPTHS = (20, 32, 44, 56, 110, 34)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("build", [plainnet, resnet])
def test_model_forward_gives_logits_for_mnist_and_cifar_shaped_batches(build, depth):
    for k, (channels, size) in enumerate([(1, 28), (3, 32)]):
        model = build(depth, in_channels=channels, num_classes=10, batchnorm=bool(k)).eval()
        with torch.no_grad():
            out = model(torch.randn(2, channels, size, size))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("build", [plainnet, resnet])
def test_models_are_deterministic_from_the_seed(build):
    a, b, c = build(20, seed=3), build(20, seed=3), build(20, seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_resnet20_with_batch_norm_has_the_standard_parameter_count():
    # convs 267,696 + BN 1,376 + classifier 650 (He et al.'s 0.27M, option-A shortcuts)
    assert sum(p.numel() for p in resnet(20, batchnorm=True).parameters()) == 269_722
    assert sum(p.numel() for p in plainnet(20, batchnorm=True).parameters()) == 269_722


def test_depth_layouts_and_invalid_arguments():
    assert stage_layout(20) == ((3, 3, 3), (16, 32, 64))
    assert stage_layout(110) == ((18, 18, 18), (16, 32, 64))
    assert stage_layout(34) == ((3, 4, 6, 3), (64, 128, 256, 512))
    convs = [m for m in plainnet(34).modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 33  # + the classifier: 34 layers
    with pytest.raises(ValueError, match="depth=21"):
        plainnet(21)
    with pytest.raises(ValueError, match="shortcut"):
        resnet(20, shortcut="C")
    with pytest.raises(ValueError, match="widths"):
        resnet(20, widths=(8, 8))


def expected_m(cin: int, cout: int, taps: int = 9) -> int:
    return cout * cin * taps


def test_plainnet20_summary_one_chain_or_one_block_per_stage():
    model = plainnet(20)
    structure = discover(model)
    block, = structure.blocks
    assert block.widths == (3,) + (16,) * 7 + (32,) * 6 + (64,) * 6 + (10,)
    assert block.num_hidden == 16 * 7 + 32 * 6 + 64 * 6
    assert block.num_weights == sum(p.numel() for p in model.parameters())
    assert structure.plain == ()

    staged = discover(model, cut="stages")
    assert [b.widths for b in staged.blocks] == [(3,) + (16,) * 7, (16,) + (32,) * 6,
                                                 (32,) + (64,) * 6]
    assert [b.num_hidden for b in staged.blocks] == [16 * 6, 32 * 5, 64 * 5]
    assert [b.num_weights for b in staged.blocks] == [
        expected_m(3, 16) + 6 * expected_m(16, 16),
        expected_m(16, 32) + 5 * expected_m(32, 32),
        expected_m(32, 64) + 5 * expected_m(64, 64),
    ]
    assert staged.plain == ("fc.weight", "fc.bias")
    text = staged.summary()
    assert "3 block(s)" in text and "plain SGD: fc.weight, fc.bias" in text


def test_resnet20_summary_one_block_per_residual_branch():
    structure = discover(resnet(20))
    assert len(structure.blocks) == 9
    names = [[layer.module for layer in b.layers] for b in structure.blocks]
    assert names[0] == ["stage1.0.conv1", "stage1.0.conv2"]
    assert names[8] == ["stage3.2.conv1", "stage3.2.conv2"]
    expected = []
    cin = 16
    for width in (16, 32, 64):
        for _ in range(3):
            expected.append(((cin, width, width), width,
                             expected_m(cin, width) + expected_m(width, width)))
            cin = width
    assert [(b.widths, b.num_hidden, b.num_weights) for b in structure.blocks] == expected
    assert structure.num_hidden == 3 * (16 + 32 + 64)
    assert structure.plain == ("stem.conv.weight", "fc.weight", "fc.bias")
    assert "plain SGD: stem.conv.weight, fc.weight, fc.bias" in structure.summary()
    # residual merges and fan-outs are natural block boundaries, not errors in strict mode
    assert discover(resnet(20), strict=True) == structure


def test_resnet34_projection_shortcuts_are_plain_and_blocks_follow_3_4_6_3():
    structure = discover(resnet(34))
    assert len(structure.blocks) == 16
    assert [b.widths[-1] for b in structure.blocks] == [64] * 3 + [128] * 4 + [256] * 6 \
        + [512] * 3
    shortcuts = [n for n in structure.plain if "shortcut" in n]
    assert shortcuts == [f"stage{s}.0.shortcut.0.weight" for s in (2, 3, 4)]


def small_set(channels: int = 1, size: int = 10, batches: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, channels, size, size, generator=gen) for _ in range(batches)]
    ys = [torch.randint(0, 4, (16,), generator=gen) for _ in range(batches)]
    return list(zip(xs, ys, strict=True))


def mean_loss(model, data) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


def train(model, opt, data, steps: int) -> None:
    for step in range(steps):
        x, y = data[step % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("build, options", [
    (lambda: plainnet(8, 1, 4, widths=(4, 8, 8)), {}),
    (lambda: plainnet(8, 1, 4, widths=(4, 8, 8)), {"cut": "stages"}),
    (lambda: resnet(8, 1, 4, widths=(4, 8, 8)), {}),
], ids=["plainnet", "plainnet-stages", "resnet"])
def test_gsgd_reduces_the_training_loss_of_plainnet_and_resnet_in_a_few_dozen_steps(build,
                                                                                  options):
    model = build()
    structure = discover(model, **options)
    skeleton_init(model, structure)
    data = small_set(batches=2)
    with torch.no_grad():  # the skeleton init makes activations large: scale the inputs
        scale = 1 / float(model(data[0][0]).std())
    data = [(scale * x, y) for x, y in data]
    before = mean_loss(model, data)
    opt = GSGD(model, lr=0.02, momentum=0.9, structure=structure)
    train(model, opt, data, 40)
    after = mean_loss(model, data)
    assert after < 0.75 * before, (before, after)
    assert sum(opt.clip_counts()) == 0


def test_model_classes_are_exported_with_the_mlp():
    assert issubclass(PlainNet, torch.nn.Module) and issubclass(ResNet, torch.nn.Module)
    assert mlp((4, 3, 2))(torch.randn(1, 4)).shape == (1, 2)
