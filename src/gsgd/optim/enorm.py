r"""ENorm: equi-normalisation (Stock, Graham, Gribonval, Jegou, ICLR 2019) as a post-step.

After an optimizer step, every hidden unit u of every G-block is rescaled by the group G
(docs/math.md section 1; the network function does not change) so that the layer norms balance:

.. code-block:: text

    ||in_u||  = sqrt( sum over (in, taps) of W^{k-1}[u, :, :]^2  +  b^{k-1}[u]^2 )   (u's bias too)
    ||out_u|| = sqrt( sum over (out, taps) of W^{k}[:, u, :]^2 )
    d_u = sqrt( ||out_u|| / (c * ||in_u||) )
    W^{k-1}[u, :, :] *= d_u,   b^{k-1}[u] *= d_u,   W^{k}[:, u, :] /= d_u

One sweep visits the hidden layers k = 1 .. n-1 of a block in order (Gauss-Seidel: each layer
uses the norms as left by the layers before it); a cycle is ``iterations`` sweeps. After a layer
is visited its units satisfy ||out_u|| = c * ||in_u|| exactly; visiting the next layer disturbs
that, and repeated sweeps converge (block coordinate descent on a convex function of log d) to the
state where every hidden unit satisfies

    ||out_u|| = c * ||in_u||,

the unique minimiser over G of  sum_l c^(-2 l) (||W^l||^2 + ||b^l||^2)  (l = 0 .. n-1 counts the
layers of the block). With c = 1 that is the weight-decay cost the paper minimises; c > 1 makes
deeper layers relatively larger. A unit with ||in_u|| = 0 or ||out_u|| = 0 is left alone (d = 1).

Gradient-like companions transform inversely, so that they stay expressed in the new coordinates
(a weight scaled by d has its gradient scaled by 1/d): ``p.grad`` and the optimizer's
``momentum_buffer`` / ``exp_avg`` / ``grad_avg`` take d^-1, second moments (``exp_avg_sq``,
``max_exp_avg_sq``, ``square_avg``, ``sum``) take d^-2. Exceptions by optimizer: PathSGD's buffer
holds g / gamma, which scales like the weight (d^+1); GSGD's buffer holds dL/dv on basis paths,
which G leaves unchanged (d^0). With those, ENorm after an invariant optimizer (GSGD, PathSGD)
changes only the representation: the function trajectory is the same as without it. An unknown
tensor state raises, unless its power is given in ``state_powers``.

Differences from the authors' public code (facebookresearch/enorm), on purpose: biases are
rescaled with their unit (the authors' code leaves them out, which changes the function), each
layer uses the current norms (the authors' code computes the next layer's norms before applying
the current factors), and momentum buffers are transformed for Linear layers as well as convs.

Baselines without anything to build here: plain SGD and Adam are torch's own. SGD started from the
paper's skeleton initialisation (:func:`gsgd.group.skeleton_init`) is the fair control for G-SGD.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from gsgd.group import rescale_hidden_layer
from gsgd.optim.common import bind_blocks, check_hyper_parameters, resolve_params
from gsgd.structure import Block, Structure, layer_view

__all__ = [
    "STATE_POWERS",
    "ENorm",
    "ENormSGD",
    "balance_factors",
    "enorm_cost",
    "enorm_sweep_",
    "optimizer_state_powers",
    "unit_norms",
]

# How optimizer state scales when its parameter is multiplied by d: as d ** power.
STATE_POWERS: dict[str, int] = {
    "momentum_buffer": -1,  # SGD
    "exp_avg": -1,  # Adam, AdamW, NAdam, RAdam, Adamax
    "grad_avg": -1,  # RMSprop(centered=True)
    "exp_avg_sq": -2,  # Adam family
    "max_exp_avg_sq": -2,  # Adam(amsgrad=True)
    "square_avg": -2,  # RMSprop, Adadelta
    "sum": -2,  # Adagrad
}




def optimizer_state_powers(optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """:data:`STATE_POWERS`, corrected for the project's invariant optimizers."""
    from gsgd.optim.gsgd import GSGD
    from gsgd.optim.pathsgd import PathSGD

    powers = dict(STATE_POWERS)
    if isinstance(optimizer, PathSGD):
        powers["momentum_buffer"] = 1  # a buffer of g / gamma transforms like the weights
    elif isinstance(optimizer, GSGD):
        powers["momentum_buffer"] = 0  # dL/dv on basis paths is G-invariant
    return powers


# ------------------------------------------------------------------------------------------------
# Pure maths on (out, in, taps) views
# ------------------------------------------------------------------------------------------------

def unit_norms(w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(||in_u||, ||out_u||) of the hidden units between ``w_in`` and ``w_out`` (bias in ||in||)."""
    sq_in = w_in.square().sum(dim=(1, 2))
    if b_in is not None:
        sq_in = sq_in + b_in.square()
    return sq_in.sqrt(), w_out.square().sum(dim=(0, 2)).sqrt()


def balance_factors(in_norm: torch.Tensor, out_norm: torch.Tensor, c: float = 1.0
                    ) -> torch.Tensor:
    """d_u = sqrt(||out_u|| / (c ||in_u||)); 1 where either norm is 0."""
    alive = (in_norm > 0) & (out_norm > 0)
    ratio = out_norm / (c * torch.where(alive, in_norm, torch.ones_like(in_norm)))
    return torch.where(alive, ratio.sqrt(), torch.ones_like(ratio))


def enorm_cost(weights: list[torch.Tensor], biases: list[torch.Tensor | None], c: float = 1.0
               ) -> torch.Tensor:
    """sum_l c^(-2 l) (||W^l||^2 + ||b^l||^2): what repeated ENorm sweeps minimise over G."""
    total = weights[0].new_zeros(())
    for l, (w, b) in enumerate(zip(weights, biases, strict=True)):
        sq = w.square().sum() + (0 if b is None else b.square().sum())
        total = total + sq * c ** (-2 * l)
    return total


@torch.no_grad()
def enorm_sweep_(weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                 c: float = 1.0) -> list[torch.Tensor]:
    """One ENorm sweep over the hidden layers, in place; returns d for each hidden layer."""
    factors = []
    for k in range(1, len(weights)):
        w_in, b_in, w_out = weights[k - 1], biases[k - 1], weights[k]
        d = balance_factors(*unit_norms(w_in, b_in, w_out), c)
        rescale_hidden_layer(w_in, b_in, w_out, d)
        factors.append(d)
    return factors


# ------------------------------------------------------------------------------------------------
# The post-step
# ------------------------------------------------------------------------------------------------

class ENorm:
    """Equi-normalise the G-blocks of ``model`` after each optimizer step.

    Use ``enorm.step()`` after ``optimizer.step()``, or ``enorm.attach()`` once to run it as the
    optimizer's step post-hook. With ``optimizer`` given, only blocks whose parameters it holds
    are balanced, and its state (momentum buffers, Adam moments) is transformed with the weights.

    Args:
        model: the network; its G-blocks come from :func:`gsgd.discover` unless ``structure``.
        optimizer: any ``torch.optim.Optimizer`` over (some of) the model's parameters, or None.
        c: asymmetric scaling: the balanced state has ||out_u|| = c ||in_u||.
        iterations: sweeps per :meth:`step` (the paper uses one after every SGD step).
        state_powers: extra optimizer state keys and how they scale (``{"key": power}``: the
            tensor scales like weight ** power); merged over :func:`optimizer_state_powers`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 c: float = 1.0, iterations: int = 1, *, structure: Structure | None = None,
                 state_powers: dict[str, int] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"ENorm: needs the model (an nn.Module), got {type(model).__name__}")
        if not (isinstance(c, float | int) and math.isfinite(c) and c > 0):
            raise ValueError(f"ENorm: invalid c={c!r}: must be a finite number > 0")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"ENorm: invalid iterations={iterations!r}: must be an int >= 1")
        if structure is None:
            from gsgd.discovery import discover

            structure = discover(model)
        self.structure = structure
        self.optimizer = optimizer
        self.c = float(c)
        self.iterations = iterations
        self.state_powers = {**optimizer_state_powers(optimizer), **(state_powers or {})}
        named = dict(model.named_parameters())
        groups = optimizer.param_groups if optimizer is not None else \
            [{"params": list(named.values())}]
        self._blocks = [(block, ws, bs) for block, ws, bs, _ in
                        bind_blocks("ENorm", structure, named, groups, one_group=False)]
        self._named = list(named.items())

    @property
    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self._named}

    def _views(self, block: Block, weights: list[nn.Parameter], biases: list[nn.Parameter | None]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        ws = [layer_view(w.detach(), layer) for w, layer in zip(weights, block.layers, strict=True)]
        return ws, [None if b is None else b.detach() for b in biases]

    @torch.no_grad()
    def step(self) -> list[list[torch.Tensor]]:
        """One ENorm cycle on every block; returns the total factors d per block, hidden layer."""
        used = []
        for block, weights, biases in self._blocks:
            ws, bs = self._views(block, weights, biases)
            total = [torch.ones_like(w[:, 0, 0]) for w in ws[:-1]]
            for _ in range(self.iterations):
                for t, d in zip(total, enorm_sweep_(ws, bs, self.c), strict=True):
                    t.mul_(d)
            self._transform_companions(block, weights, biases, total)
            used.append(total)
        return used

    def _companion(self, p: nn.Parameter | None, key: str) -> torch.Tensor | None:
        if p is None:
            return None
        if key == "grad":
            return p.grad
        if self.optimizer is None:
            return None
        return self.optimizer.state.get(p, {}).get(key)

    def _transform_companions(self, block: Block, weights: list[nn.Parameter],
                              biases: list[nn.Parameter | None],
                              factors: list[torch.Tensor]) -> None:
        powers = {"grad": -1}
        if self.optimizer is not None:
            for p in (q for q in weights + biases if q is not None):
                for key, value in self.optimizer.state.get(p, {}).items():
                    if not (isinstance(value, torch.Tensor) and value.shape == p.shape):
                        continue  # step counters and other scalars do not scale
                    if key not in self.state_powers:
                        raise ValueError(
                            f"ENorm: does not know how the optimizer state {key!r} of "
                            f"{type(self.optimizer).__name__} (for {self._names.get(id(p), '?')})"
                            " transforms under a rescaling; pass state_powers={key: k} if it "
                            "scales like weight ** k"
                        )
                    powers[key] = self.state_powers[key]
        for key, power in powers.items():
            for k, d in enumerate(factors):
                into, out_of = block.layers[k], block.layers[k + 1]
                w_in = self._companion(weights[k], key)
                b_in = self._companion(biases[k], key)
                w_out = self._companion(weights[k + 1], key)
                if w_in is None and b_in is None and w_out is None:
                    continue
                rescale_hidden_layer(None if w_in is None else layer_view(w_in, into), b_in,
                                     None if w_out is None else layer_view(w_out, out_of),
                                     d.pow(power))

    @torch.no_grad()
    def imbalance(self) -> float:
        """max over hidden units (norms > 0) of |log(||out_u|| / (c ||in_u||))|; 0: balanced."""
        worst = 0.0
        for block, weights, biases in self._blocks:
            ws, bs = self._views(block, weights, biases)
            for k in range(1, len(ws)):
                n_in, n_out = unit_norms(ws[k - 1], bs[k - 1], ws[k])
                alive = (n_in > 0) & (n_out > 0)
                if bool(alive.any()):
                    gap = (n_out[alive] / (self.c * n_in[alive])).log().abs().max()
                    worst = max(worst, float(gap))
        return worst

    def attach(self, optimizer: torch.optim.Optimizer | None = None):
        """Run :meth:`step` after every ``optimizer.step()`` (a step post-hook); returns its handle.

        Defaults to the optimizer given at construction.
        """
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise ValueError("ENorm.attach: no optimizer given (here or at construction)")
        return optimizer.register_step_post_hook(self._post_hook)

    def _post_hook(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.step()


class ENormSGD(torch.optim.SGD):
    """torch.optim.SGD followed by one ENorm cycle after every step (Stock et al., ICLR 2019).

    ``ENormSGD(model, lr=0.1, momentum=0.9, c=1.0)``; or ``ENormSGD(params, ..., model=model)``.
    The SGD update and its state are torch's; the ENorm cycle (:attr:`enorm`, holding ``c`` and
    ``iterations``) is the first step post-hook, so hooks registered later see balanced weights.
    Momentum buffers are transformed by ENorm with the weights (module docstring).
    """

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        c: float = 1.0,
        iterations: int = 1,
        maximize: bool = False,
        *,
        model: nn.Module | None = None,
        structure: Structure | None = None,
    ) -> None:
        check_hyper_parameters("ENormSGD", dict(lr=lr, momentum=momentum, dampening=dampening,
                                                weight_decay=weight_decay, nesterov=nesterov,
                                                maximize=maximize))
        params, model, _ = resolve_params("ENormSGD", params, model)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self.enorm = ENorm(model, self, c=c, iterations=iterations, structure=structure)
        self.enorm.attach(self)

    def __getstate__(self) -> dict:
        """torch's state plus the ENorm cycle, so that copies and pickles balance too."""
        return {**super().__getstate__(), "enorm": self.enorm}

    def __setstate__(self, state: dict) -> None:
        copied = "enorm" not in self.__dict__  # not torch's load_state_dict on a live one
        super().__setstate__(state)
        if copied:  # torch starts a copy with no hooks: attach the cycle again
            self.enorm.optimizer = self
            self.enorm.attach(self)
