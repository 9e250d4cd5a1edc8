r"""Path-SGD (Neyshabur, Salakhutdinov, Srebro, NeurIPS 2015) on the G-blocks of a model.

Path-SGD is the diagonal approximation of steepest descent with respect to the (squared) l2 path
regulariser ``phi(w) = sum over paths p of v_p^2`` (docs/math.md section 9):

.. code-block:: text

    w_e <- w_e - lr * g_e / gamma_e
    gamma_e = sum over paths p through e of prod_{e' in p, e' != e} w_e'^2 = A(tail e) * B(head e)

    A(input) = A(bias node) = 1,   A(l+1, j) = sum_i sum_t W^l[j, i, t]^2 A(l, i) + b^l[j]^2
    B(output) = 1,                 B(l, i)   = sum_j sum_t W^l[j, i, t]^2 B(l+1, j)

A is a forward pass of the squared-weight network on an all-ones input, B a backward pass from
the outputs; for a bias of node b, gamma = B(b). Each G-block found by :func:`gsgd.discover` is a
network of its own here (A = 1 at its input units, B = 1 at its output units); convolutions are
treated on the channel multigraph (the kh*kw taps of a channel pair are parallel edges), so for a
conv block this is Path-SGD of that multigraph, not of the pixel-level graph with shared weights.
Parameters outside every block get plain SGD (torch.optim.SGD's update) with the same
hyper-parameters.

Under a rescaling g in G a weight into unit u scales by c_u, its gradient by 1/c_u and gamma by
1/c_u^2, so g/gamma transforms like the weight and the step commutes with g: a network and its
rescaled copy stay rescaled copies of each other, step after step. Choices that keep this:

* momentum (heavy ball, dampening, Nesterov as in torch.optim.SGD) acts on the scaled gradient
  ``g / gamma`` (the buffer transforms like the weights);
* ``weight_decay`` is the l2 *path* regulariser ``lambda/2 * phi(w)``: its gradient is
  ``lambda * w_e * gamma_e``, so after the Path-SGD scaling it adds ``lambda * w_e`` to the
  direction. (Weight-space L2 added to g before the scaling would break the invariance.)
* an edge with gamma_e = 0 (every path through it has another zero edge) gets direction 0; in a
  ReLU net its gradient is 0 too.

The authors' public PyTorch code computes the scaling but never applies it (its parameter
generator is consumed before use); this implementation applies it and is tested for invariance.

Baselines without anything to build here: plain SGD and Adam are torch's own. SGD started from the
paper's skeleton initialisation (:func:`gsgd.group.skeleton_init`) is the fair control for G-SGD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from gsgd.optim.common import (
    GBlockOptimizer,
    momentum_direction,
    plain_sgd_update,
)
from gsgd.structure import Block, Structure, layer_view

__all__ = [
    "PathSGD",
    "path_norm_squared",
    "path_potentials",
    "path_scales",
    "path_sgd_direction",
    "path_sgd_update_",
]


# ------------------------------------------------------------------------------------------------
# Pure maths on (out, in, taps) weight views
# ------------------------------------------------------------------------------------------------

def path_potentials(weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                    work: list[torch.Tensor] | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A and B of every node layer 0..n of a chain of ``(out, in, taps)`` weights.

    A(l) sums, over paths from the inputs and bias nodes to node layer l, the product of squared
    weights (A = 1 at inputs and bias nodes); B(l) does the same over paths from l to the outputs.
    ``work``: one reusable tensor shaped like each weight for the squares (else fresh ones).
    """
    squares = [_tap_sum(w.square() if work is None else torch.mul(w, w, out=out))
               for w, out in zip(weights, work or [None] * len(weights), strict=True)]
    a = [weights[0].new_ones(weights[0].shape[1])]
    for s, b in zip(squares, biases, strict=True):
        nxt = s @ a[-1]
        a.append(nxt if b is None else nxt + b.square())
    back = [weights[-1].new_ones(weights[-1].shape[0])]
    for s in reversed(squares):
        back.append(s.T @ back[-1])
    return a, back[::-1]


def _tap_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the taps of an ``(out, in, taps)`` tensor (a view when there is one tap)."""
    return t[..., 0] if t.shape[-1] == 1 else t.sum(dim=-1)


def _inverse(x: torch.Tensor) -> torch.Tensor:
    """1 / x where x > 0, else 0 (x >= 0: a potential A or B)."""
    return torch.where(x > 0, x.reciprocal(), torch.zeros((), dtype=x.dtype, device=x.device))


def path_scales(weights: list[torch.Tensor], biases: list[torch.Tensor | None]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """gamma for every weight, ``A(tail) * B(head)`` shaped ``(out, in, 1)``, and B(head) per bias.

    The weight scales broadcast against the ``(out, in, taps)`` views (parallel taps share them).
    """
    a, b = path_potentials(weights, biases)
    gw = [torch.outer(b[l + 1], a[l])[:, :, None] for l in range(len(weights))]
    gb = [None if bias is None else b[l + 1] for l, bias in enumerate(biases)]
    return gw, gb


def path_norm_squared(weights: list[torch.Tensor], biases: list[torch.Tensor | None]
                      ) -> torch.Tensor:
    """phi(w) = sum over all paths of the squared path value = sum of A over the outputs."""
    return path_potentials(weights, biases)[0][-1].sum()


def path_sgd_direction(weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                       grads: list[torch.Tensor], grad_biases: list[torch.Tensor | None],
                       weight_decay: float = 0.0
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Path-SGD direction ``g / gamma + weight_decay * w`` (0 where gamma = 0), weights and biases.

    ``weight_decay * w`` is ``grad(weight_decay / 2 * phi) / gamma``, the path regulariser's term.
    """
    a, b = path_potentials(weights, biases)
    inv_a, inv_b = [_inverse(x) for x in a], [_inverse(x) for x in b]
    # 1 / gamma = 1 / (A(tail) B(head)) as an outer product of inverses: 0 where gamma = 0
    dws = [g * torch.outer(inv_b[l + 1], inv_a[l])[:, :, None] for l, g in enumerate(grads)]
    dbs = [None if g is None else g * inv_b[l + 1] for l, g in enumerate(grad_biases)]
    if weight_decay:
        for d, w in zip(dws, weights, strict=True):
            d.add_(w, alpha=weight_decay)
        for d, b in zip(dbs, biases, strict=True):
            if d is not None:
                d.add_(b, alpha=weight_decay)
    return dws, dbs


def path_sgd_update_(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None,
                     inv_a: torch.Tensor, inv_b: torch.Tensor, lr: float, momentum: float,
                     dampening: float, weight_decay: float, sign: float = 1.0,
                     scratch: torch.Tensor | None = None) -> None:
    """One Path-SGD step of an ``(out, in, taps)`` weight, in place and without weight-sized
    temporaries (:func:`path_sgd_direction` and heavy-ball momentum, not nesterov):

        d = sign * g / gamma + wd * w,  1 / gamma = outer(1 / B(head), 1 / A(tail))
        buf = momentum * buf + (1 - dampening) * d          (a zero ``buf``, dampening 0: buf = d)
        w  -= lr * buf                                        (no momentum: w -= lr * d)

    ``scratch``: a reusable ``(out, in)`` matrix for 1 / gamma (work, not state).
    """
    inv = (torch.outer(inv_b, inv_a) if scratch is None
           else torch.outer(inv_b, inv_a, out=scratch))[:, :, None]
    if buf is None:
        if weight_decay:
            w.mul_(1 - lr * weight_decay)
        w.addcmul_(g, inv, value=-lr * sign)
        return
    buf.mul_(momentum).addcmul_(g, inv, value=(1 - dampening) * sign)
    if weight_decay:
        buf.add_(w, alpha=weight_decay * (1 - dampening))
    w.add_(buf, alpha=-lr)


# ------------------------------------------------------------------------------------------------
# The optimizer
# ------------------------------------------------------------------------------------------------

class PathSGD(GBlockOptimizer):
    r"""Path-SGD (Neyshabur et al., 2015) on every G-block, plain SGD elsewhere.

    .. code-block:: text

        gamma = A(tail) * B(head)                       (squared-weight forward / backward pass)
        d     = g / gamma + weight_decay * w            (weight decay = l2 path regulariser)
        buf   = momentum * buf + (1 - dampening) * d    (heavy ball on the scaled gradient)
        s     = d + momentum * buf if nesterov else buf
        w    <- w - lr * s

    Invariant under the rescaling group G, with or without momentum and weight decay (module
    docstring). Cost per step O(m): two matrix-vector sweeps and elementwise work per block.

    Args:
        params: an ``nn.Module`` (its G-blocks are discovered), or parameters / param groups
            together with ``model=`` (or ``structure=``).
        lr, momentum, dampening, nesterov: as in ``torch.optim.SGD``.
        weight_decay: lambda of the path regulariser lambda/2 * sum_p v_p^2 on G-block parameters;
            ordinary L2 (torch.optim.SGD's) on the parameters left to plain SGD.
        maximize: step up the objective (torch.optim.SGD's ``maximize``).
        model, structure: where the G-blocks come from when ``params`` is not a module.
    """

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        *,
        model: nn.Module | None = None,
        structure: Structure | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self._setup("PathSGD", params, defaults, model, structure)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One Path-SGD step on the G-blocks, plain SGD on the other parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for block, weights, biases, gi in self._blocks:
            self._update_block(block, weights, biases, self.param_groups[gi])
        plain_ids = {id(p) for p in self._plain}
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in plain_ids and p.grad is not None]
            self._refuse_sparse(params)
            plain_sgd_update(self, params, group)
        return loss

    def _refuse_sparse(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"PathSGD: sparse gradient for {self._names.get(id(p), '?')}")

    def _update_block(self, block: Block, weights: list[nn.Parameter],
                      biases: list[nn.Parameter | None], group: dict) -> None:
        """Path-SGD on one block. A parameter whose grad is None is not touched (gamma still
        reads its weights). Weights take :func:`path_sgd_update_` (in place) unless nesterov;
        biases and nesterov the plain form (:func:`path_sgd_direction`)."""
        params = [p for p in weights + biases if p is not None]
        if all(p.grad is None for p in params):
            return
        self._refuse_sparse(params)
        ws = [layer_view(w, layer) for w, layer in zip(weights, block.layers, strict=True)]
        work = [self._work(v.shape[0], v.shape[1] * v.shape[2], v, slot=l).view(v.shape)
                for l, v in enumerate(ws)]
        a, b = path_potentials(ws, biases, work)
        inv_a, inv_b = [_inverse(x) for x in a], [_inverse(x) for x in b]
        lr, mu, damp, wd = group["lr"], group["momentum"], group["dampening"], \
            group["weight_decay"]
        sign = -1.0 if group["maximize"] else 1.0  # the step of -L, as torch.optim.SGD
        for l, (w, v) in enumerate(zip(weights, ws, strict=True)):
            if w.grad is None:
                continue
            g = layer_view(w.grad, block.layers[l])
            if mu and group["nesterov"]:
                d = sign * g * torch.outer(inv_b[l + 1], inv_a[l])[:, :, None]
                if wd:
                    d = d + wd * v
                s = momentum_direction(self.state[w], d.view(w.shape), mu, damp, True)
                w.add_(s, alpha=-lr)
                continue
            buf = None
            first = False
            if mu:
                state = self.state[w]
                first = "momentum_buffer" not in state
                if first:
                    state["momentum_buffer"] = torch.zeros_like(w,
                                                                memory_format=torch.preserve_format)
                buf = layer_view(state["momentum_buffer"], block.layers[l])
            scratch = work[l].view(-1)[:v.shape[0] * v.shape[1]].view(v.shape[0], v.shape[1])
            path_sgd_update_(v, g, buf, inv_a[l], inv_b[l + 1], lr, mu, 0.0 if first else damp,
                             wd, sign, scratch)
        for l, bias in enumerate(biases):
            if bias is None or bias.grad is None:
                continue
            d = sign * bias.grad * inv_b[l + 1]
            if wd:
                d = d + wd * bias
            s = momentum_direction(self.state[bias], d, mu, damp, bool(group["nesterov"]))
            bias.add_(s, alpha=-lr)
