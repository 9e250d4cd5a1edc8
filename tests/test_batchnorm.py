"""Batch norm: the explicit choice, the exact treatment (G-blocks [BN affine, next layer]: oracle
and invariance in float64) and the paper's approximate heuristic (labelled, wired as documented).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import F64, assert_rel_close
from gsgd.discovery import blocks_from_layers, discover
from gsgd.group import random_rescale, skeleton_init
from gsgd.models import plainnet, resnet
from gsgd.optim import GSGD
from gsgd.structure import Block, Structure, StructureError, layer_view
from test_conv import gsgd_step_vs_oracle, prepared, randomise


def bn_chain() -> nn.Sequential:
    """conv -> BN -> ReLU -> conv -> ReLU -> conv: exact block [BN affine, conv, conv]."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3)).to(F64)


def bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(F64)


# ------------------------------------------------------------------------------- the choice
def test_a_model_with_batch_norm_and_no_choice_raises_a_clear_error():
    for model in (bn_chain(), resnet(20, batchnorm=True)):
        with pytest.raises(StructureError, match="batchnorm='exact'.*batchnorm='approximate'"):
            discover(model)
        with pytest.raises(StructureError, match="choose"):
            GSGD(model, lr=0.1)
    with pytest.raises(ValueError, match="batchnorm='fast' is not supported"):
        discover(bn_chain(), batchnorm="fast")


def test_gsgd_passes_the_batchnorm_choice_to_discovery():
    model = resnet(20, batchnorm=True)
    for choice in ("exact", "approximate"):
        opt = GSGD(model, lr=0.1, batchnorm=choice)
        assert opt.summary() == discover(model, batchnorm=choice).summary()
    with pytest.raises(ValueError, match="structure="):
        GSGD(model, lr=0.1, structure=discover(model, batchnorm="exact"), batchnorm="exact")


# ------------------------------------------------------------------------------- exact
def test_exact_blocks_start_at_the_bn_affine_pair_and_the_conv_before_bn_is_plain():
    structure = discover(bn_chain(), batchnorm="exact", strict=True)
    block, = structure.blocks
    assert [(layer.module, layer.kind) for layer in block.layers] == \
        [("1", "bn-affine"), ("3", "conv"), ("5", "conv")]
    assert block.widths == (1, 3, 2, 2)
    assert block.layers[0].weight == "1.weight" and block.layers[0].bias == "1.bias"
    assert set(structure.plain) == {"0.weight", "0.bias"}
    assert not structure.approximate and "APPROXIMATE" not in structure.summary()
    gamma = dict(bn_chain().named_parameters())["1.weight"]
    assert layer_view(gamma, block.layers[0]).shape == (3, 1, 1)


def test_exact_resnet20_has_one_bn1_conv2_block_per_residual_branch():
    structure = discover(resnet(20, batchnorm=True), batchnorm="exact")
    assert len(structure.blocks) == 9
    for block in structure.blocks:
        bn1, conv2 = block.layers
        assert bn1.kind == "bn-affine" and bn1.module.endswith(".bn1")
        assert conv2.module.endswith(".conv2") and block.num_hidden == bn1.out_units
    assert "stage1.0.conv1.weight" in structure.plain
    assert "stage1.0.bn2.weight" in structure.plain and "stem.bn.weight" in structure.plain


def test_bn_without_affine_parameters_ends_the_chain():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.ReLU(),
                          nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Conv2d(2, 1, 1))
    structure = discover(model, batchnorm="exact")
    assert [[layer.module for layer in b.layers] for b in structure.blocks] == [["3", "5"]]
    assert any("without affine" in note for note in structure.notes)
    with pytest.raises(StructureError, match="without affine"):
        blocks_from_layers(model, [["1", "3"]])


@pytest.mark.parametrize("build, shape", [(bn_chain, (4, 2, 5, 5)), (bn_mlp, (4, 3))],
                         ids=["conv", "mlp"])
def test_exact_bn_block_step_equals_brute_force_oracle(build, shape):
    model = build()
    randomise(model, 5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    structure = discover(model, batchnorm="exact", strict=True)
    assert structure.blocks[0].layers[0].kind == "bn-affine"
    gsgd_step_vs_oracle(model, structure, x)


# The 50-step invariance of exact-BN G-SGD (and its failure for SGD) is tested with the other
# CNNs in test_conv.py (models "bn-chain", "plainnet-bn", "resnet-bn").


def test_exact_bn_rescaling_preserves_the_function_in_eval_mode_too():
    model, structure = prepared("resnet-bn")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):  # running statistics away from their initial values
            model(torch.randn(4, 1, 6, 6, generator=gen, dtype=F64) + 1)
    twin = copy.deepcopy(model)
    random_rescale(twin, structure, seed=3)
    model.eval()
    twin.eval()
    x = torch.randn(3, 1, 6, 6, generator=gen, dtype=F64)
    with torch.no_grad():
        assert_rel_close(twin(x), model(x), 1e-10)


# ------------------------------------------------------------------------------- approximate
def test_approximate_option_is_labelled_in_structure_summary_and_optimizer():
    model = plainnet(20, batchnorm=True)
    structure = discover(model, batchnorm="approximate")
    block, = structure.blocks
    assert all(layer.approx_bn for layer in block.layers[:-1]) and not block.layers[-1].approx_bn
    assert structure.approximate
    assert "APPROXIMATE" in structure.summary() and "approximate (BN heuristic)" in \
        structure.summary()
    assert any("NOT invariant" in note for note in structure.notes)
    assert all(n.split(".")[-2] == "bn" or n.startswith("stem.bn") for n in structure.plain)
    assert "approximate" in GSGD(model, lr=0.1, batchnorm="approximate").summary()
    res = discover(resnet(20, batchnorm=True), batchnorm="approximate")
    assert len(res.blocks) == 9 and all(layer.approx_bn for b in res.blocks for layer in b.layers)


def unit_rows(model: nn.Module, block: Block, l: int) -> None:
    """Give every output row of layer l of the block unit norm."""
    w = dict(model.named_parameters())[block.layers[l].weight]
    with torch.no_grad():
        w.div_(w.reshape(w.shape[0], -1).norm(dim=1).view(-1, *([1] * (w.dim() - 1))))


def test_approximate_step_scales_the_g_space_direction_by_filter_norms():
    """Rows of norm 1: the heuristic step equals the exact step; rows of norm 2: it differs."""
    base = bn_chain()
    randomise(base, 2)
    structure = discover(base, batchnorm="approximate")
    block, = structure.blocks
    assert [layer.approx_bn for layer in block.layers] == [True, False, False]
    exact = Structure((Block(tuple(replace(la, approx_bn=False) for la in block.layers)),),
                      structure.plain)
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    results = {}
    for norm in (1.0, 2.0):
        unit_rows(base, block, 0)
        with torch.no_grad():
            base[0].weight.mul_(norm)
        for name, st in (("approx", structure), ("exact", exact)):
            model = copy.deepcopy(base)
            opt = GSGD(model, lr=0.01, momentum=0.9, weight_decay=0.01, structure=st)
            for _ in range(2):  # the second step uses the momentum buffer
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
                if norm == 1.0:
                    unit_rows(model, block, 0)  # keep the heuristic's scale at exactly 1
            results[norm, name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert_rel_close(results[1.0, "approx"], results[1.0, "exact"], 1e-12)
    assert (results[2.0, "approx"] - results[2.0, "exact"]).abs().max() > 1e-6


@pytest.mark.parametrize("batchnorm", ["exact", "approximate"])
@pytest.mark.parametrize("build", [plainnet, resnet], ids=["plainnet", "resnet"])
def test_gsgd_reduces_the_loss_of_bn_networks_with_either_option(build, batchnorm):
    model = build(8, 1, 4, batchnorm=True, widths=(4, 8, 8))
    structure = discover(model, batchnorm=batchnorm)
    skeleton_init(model, structure)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 10, 10, generator=gen), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(2)]

    def loss() -> float:
        with torch.no_grad():
            return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)

    before = loss()
    opt = GSGD(model, lr=0.02, momentum=0.9, structure=structure)
    for step in range(40):
        x, y = data[step % 2]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert loss() < 0.75 * before
