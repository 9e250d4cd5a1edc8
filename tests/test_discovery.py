"""Structure discovery (gsgd.discovery): which chains are G-blocks, which parameters get SGD."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import F64, chain_net
from gsgd.discovery import blocks_from_layers, discover
from gsgd.group import skeleton_init
from gsgd.optim import GSGD
from gsgd.structure import StructureError


def modules_of(structure) -> list[list[str]]:
    return [[layer.module for layer in block.layers] for block in structure.blocks]


# ------------------------------------------------------------------------------------------------
# What continues a chain
# ------------------------------------------------------------------------------------------------

class FunctionalReLUs(nn.Module):
    """ReLUs written as F.relu, x.relu() and torch.relu inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 5)
        self.c, self.d = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = self.b(x).relu()
        x = torch.relu(self.c(x))
        return self.d(x)


def test_functional_relus_in_forward_continue_the_chain():
    structure = discover(FunctionalReLUs(), strict=True)
    assert modules_of(structure) == [["a", "b", "c", "d"]]
    assert structure.blocks[0].widths == (3, 4, 5, 6, 2)
    assert structure.plain == ()


class FunctionalLeaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(F.leaky_relu(self.a(x), 0.1))


def test_functional_leaky_relu_continues_the_chain():
    assert modules_of(discover(FunctionalLeaky(), strict=True)) == [["a", "b"]]


def test_homogeneous_modules_continue_the_chain():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(4, 5), nn.LeakyReLU(0.2), nn.Identity(),
        nn.Linear(5, 3), nn.PReLU(),
        nn.Linear(3, 2),
    )
    structure = discover(model, strict=True)
    assert modules_of(structure) == [["0", "3", "6", "8"]]
    assert structure.plain == ("7.weight",)  # the PReLU slope: plain SGD


@pytest.mark.parametrize("make", [nn.Tanh, nn.GELU, nn.Sigmoid, lambda: nn.LayerNorm(4)],
                         ids=["Tanh", "GELU", "Sigmoid", "LayerNorm"])
def test_non_homogeneous_module_ends_the_chain_with_a_note(make):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), make(), nn.Linear(4, 2))
    name = type(make()).__name__
    structure = discover(model)
    assert modules_of(structure) == [["0", "2"]]
    assert "4.weight" in structure.plain and "4.bias" in structure.plain
    assert any("chain ends after 2" in note and name in note for note in structure.notes)


class Nested(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
        self.head = nn.ModuleDict({"act": act, "out": nn.Linear(4, 2)})

    def forward(self, x):
        return self.head["out"](self.head["act"](self.body(x)))


@pytest.mark.parametrize("make", [nn.Tanh, nn.GELU, nn.Sigmoid, lambda: nn.LayerNorm(4)],
                         ids=["Tanh", "GELU", "Sigmoid", "LayerNorm"])
def test_strict_discovery_raises_naming_the_module_path(make):
    model = Nested(make())
    with pytest.raises(StructureError, match=r"head\.act") as info:
        discover(model, strict=True)
    assert type(make()).__name__ in str(info.value)
    assert "body.2" in str(info.value)


def test_module_called_twice_is_left_to_plain_sgd():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            h = F.relu(self.b(h))
            h = F.relu(self.b(h))
            return self.c(h)

    structure = discover(Twice())
    assert structure.blocks == ()
    assert {"b.weight", "b.bias"} <= set(structure.plain)
    shared = [note for note in structure.notes if "called 2 times" in note]
    assert len(shared) == 1 and shared[0].startswith("b:")


def test_parameters_shared_between_modules_are_left_to_plain_sgd():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[4].weight = model[2].weight
    structure = discover(model)
    names = {layer.module for block in structure.blocks for layer in block.layers}
    assert "2" not in names and "4" not in names
    assert any("shared" in note for note in structure.notes)


def test_hidden_output_used_twice_ends_the_chain():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 4)
            self.c, self.d = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            h = F.relu(self.b(h)) + h  # skip connection: the output of a is used twice
            return self.d(F.relu(self.c(h)))

    structure = discover(Skip())
    assert modules_of(structure) == [["c", "d"]]
    assert {"a.weight", "b.weight"} <= set(structure.plain)
    assert any("chain ends after a" in note and "2 places" in note for note in structure.notes)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_sequential_falls_back_to_the_sequential_walk():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(),
                          nn.Linear(5, 2), Untraceable())
    with pytest.raises(Exception):  # noqa: B017 -- the fallback is needed: fx really fails
        torch.fx.symbolic_trace(model)
    structure = discover(model)
    assert modules_of(structure) == [["0", "2", "4"]]


def test_untraceable_module_that_is_not_sequential_raises_a_clear_error():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) if h.sum() > 0 else self.b(-h)

    with pytest.raises(StructureError, match="could not trace Custom"):
        discover(Custom())


def test_single_linear_model_has_no_block_and_all_parameters_plain():
    structure = discover(nn.Linear(3, 2))
    assert structure.blocks == ()
    assert structure.plain == ("weight", "bias")


def test_frozen_parameters_are_neither_in_blocks_nor_plain():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    assert "2.bias" not in discover(model).plain


# ------------------------------------------------------------------------------------------------
# Summary and explicit structures
# ------------------------------------------------------------------------------------------------

def test_summary_lists_widths_m_H_basis_dimension_and_plain_parameters():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(),
                          nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    structure = discover(model)
    m = 4 * 6 + 6 + 6 * 3 + 3 + 3 * 5 + 5
    H = 6 + 3
    block = structure.blocks[0]
    assert (block.num_weights, block.num_hidden, block.num_basis_paths) == (m, H, m - H)
    text = GSGD(model, lr=0.1).summary()
    assert "4-6-3-5" in text
    assert f"m = {m}" in text and f"H = {H}" in text and f"m - H = {m - H}" in text
    assert "plain SGD: 6.weight, 6.bias" in text
    assert "Tanh" in text  # the note saying why the chain ended


def test_blocks_from_layers_builds_the_same_structure_as_discovery():
    model = chain_net((3, 5, 4, 2), True, "relu")
    explicit = blocks_from_layers(model, [["0", "2", "4"]])
    assert explicit.blocks == discover(model).blocks
    with pytest.raises(StructureError, match="nope"):
        blocks_from_layers(model, [["0", "nope"]])


# ------------------------------------------------------------------------------------------------
# Plain parameters get exactly torch.optim.SGD
# ------------------------------------------------------------------------------------------------

class Mixed(nn.Module):
    """A G-block (a -> b), then LayerNorm and Tanh (plain SGD), then a final Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.b(F.relu(self.a(x))))))


def test_plain_parameters_are_updated_exactly_like_torch_sgd():
    torch.manual_seed(0)
    model = Mixed().to(F64)
    skeleton_init(model, discover(model))
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, dampening=0.1)
    opt = GSGD(model, **hyper)
    plain_names = {"norm.weight", "norm.bias", "out.weight", "out.bias"}
    assert set(opt.plain_parameters) == plain_names
    ref_params = dict(reference.named_parameters())
    sgd = torch.optim.SGD([ref_params[n] for n in sorted(plain_names)], **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(8, 4, generator=gen, dtype=F64)
        y = torch.randn(8, 3, generator=gen, dtype=F64)
        for net, o in ((model, opt), (reference, sgd)):
            o.zero_grad()
            # the reference's G-block follows the GSGD model, so plain grads are identical
            nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        sgd.step()
        with torch.no_grad():  # keep the reference's G-block in step with the GSGD model
            for name in ("a.weight", "a.bias", "b.weight", "b.bias"):
                ref_params[name].copy_(dict(model.named_parameters())[name])
    named = dict(model.named_parameters())
    for name in plain_names:
        assert torch.equal(named[name], ref_params[name]), name
        assert torch.equal(opt.state[named[name]]["momentum_buffer"],
                           sgd.state[ref_params[name]]["momentum_buffer"]), name
    assert not torch.equal(named["out.weight"], initial.out.weight)
