"""torch.compile for the fast step: graphs over a flat tuple of tensors.

A call's arguments are split into its tensors (the graph's only inputs) and its structure
(lists, tuples, named tuples, None, numbers, routes, flags), which the graph closes over as
constants: one graph per structure, guards on a flat tuple of tensors. Each graph gets a code
object of its own, since dynamo's recompile limit counts per code object: no process-wide setting
needs changing.
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable, Iterator

import torch


class CompileFailed(RuntimeError):
    """torch.compile could not build a graph; nothing was written."""


class _TensorSlot:
    """Marks where a tensor stood in a call's arguments."""

    def __repr__(self) -> str:
        return "<tensor>"


_SLOT = _TensorSlot()


def flatten(x: object, tensors: list[torch.Tensor], tokens: list) -> None:
    """Append ``x``'s tensors to ``tensors`` and its structure, as a flat sequence of tokens, to
    ``tokens`` (a sequence: its type and length, then its items; anything else: itself)."""
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        tokens.append(_SLOT)
    elif isinstance(x, (list, tuple)):
        tokens.append(type(x))
        tokens.append(len(x))
        for item in x:
            flatten(item, tensors, tokens)
    else:
        tokens.append(x)


def unflatten(tokens: Iterator, tensors: Iterator[torch.Tensor]) -> object:
    """The object :func:`flatten` described, with the tensors put back in order."""
    token = next(tokens)
    if token is _SLOT:
        return next(tensors)
    if isinstance(token, type) and issubclass(token, (list, tuple)):
        items = [unflatten(tokens, tensors) for _ in range(next(tokens))]
        return token(items) if token in (list, tuple) else token(*items)
    return token


class FlatCompiled:
    """``fn`` compiled with the tensors of its arguments as the graph's only inputs."""

    def __init__(self, fn: Callable, threads: int) -> None:
        self.fn, self.threads = fn, threads
        self.graphs: dict[tuple, Callable] = {}

    def __call__(self, *args):
        tensors: list[torch.Tensor] = []
        tokens: list = []
        flatten(args, tensors, tokens)
        structure = tuple(tokens)
        graph = self.graphs.get(structure)
        if graph is not None:
            return graph(*tensors)
        graph = self._compile(structure)
        start = time.perf_counter()
        try:  # torch.compile builds the graph on this first call, before it runs
            out = graph(*tensors)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            raise CompileFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") \
                from exc
        finally:
            _COMPILE_SECONDS[0] += time.perf_counter() - start
        self.graphs[structure] = graph
        return out

    def prepared(self, *args) -> tuple[Callable, list[torch.Tensor]] | None:
        """(graph, flat tensors) of a call like ``self(*args)`` whose graph is already built
        (None if it is not): a caller that repeats the call with a few tensors swapped can skip
        the flattening."""
        tensors: list[torch.Tensor] = []
        tokens: list = []
        flatten(args, tensors, tokens)
        graph = self.graphs.get(tuple(tokens))
        return None if graph is None else (graph, tensors)

    def _compile(self, structure: tuple) -> Callable:
        fn = self.fn

        def graph(*tensors):
            return fn(*unflatten(iter(structure), iter(tensors)))

        name = f"gsgd_{fn.__name__}_{len(self.graphs)}"
        code = graph.__code__.replace(co_name=name)
        fresh = types.FunctionType(code, graph.__globals__, name, graph.__defaults__,
                                   graph.__closure__)
        options = {"cpp.threads": self.threads} if self.threads >= 1 else None
        return torch.compile(fresh, dynamic=False, options=options)


_COMPILE_SECONDS = [0.0]


def compile_seconds() -> float:
    """Seconds this process has spent building graphs (each graph's first call, which also
    runs it once) so far: the one-off cost of ``compile=True``, to report apart from step
    times."""
    return _COMPILE_SECONDS[0]


@functools.cache
def compiled(fn: Callable, threads: int = -1) -> Callable:
    """``fn`` compiled by torch.compile (lazily, once per process and call structure; static
    shapes), called like ``fn``; :class:`CompileFailed` if a graph cannot be built. ``threads``
    >= 1 fixes the kernels' thread count (inductor's ``cpp.threads``)."""
    return FlatCompiled(fn, threads)


def _probe(x: torch.Tensor) -> torch.Tensor:
    return (x * 2 + 1).sum()


@functools.cache
def compiler_works(device: str = "cpu") -> bool:
    """Can torch.compile build and run a graph on ``device`` here (on the CPU inductor needs a
    C++ compiler)? Tried once per process, on a tiny function."""
    try:
        compiled(_probe)(torch.ones(4, device=device))
    except CompileFailed:
        return False
    return True
