"""The one table of how shape ops move tensor dims: used by neuron-axis propagation and neuron spaces.

For permute, transpose, flatten, reshape and its relatives, reductions and basic
indexing, :func:`dim_map` says where each dim of the op's first tensor input
lands in its output, which dims it mixes, and which it slices. Both
:mod:`._axes` (one axis carried forward) and :mod:`._spaces` (every axis, tied
by union-find) read it, so the two can never disagree on an op.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ._ops import call_arg, module_of, tensor_shape

__all__ = ["DimMap", "dim_map", "REDUCTIONS", "RESHAPES"]

REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "norm")
RESHAPES = ("reshape", "view", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")


@dataclass(frozen=True)
class DimMap:
    """How the dims of an op's input (its first tensor argument) map onto its output.

    Attributes:
        source: The input node.
        to_out: For each input dim, the output dim it becomes, or None (reduced,
            indexed away, or mixed with other dims).
        mixed_in: Input dims whose values are merged with other dims or scattered
            (reshape/flatten that split or merge them, advanced indexing).
        mixed_out: Output dims that do not come whole from one input dim.
        sliced: Input dims kept but only partly (``x[:, 1:]``): the output dim is a
            subset of the input's entries.
        reason: Why dims are mixed or sliced, for messages.
    """

    source: Node
    to_out: tuple[int | None, ...]
    mixed_in: tuple[int, ...] = ()
    mixed_out: tuple[int, ...] = ()
    sliced: tuple[int, ...] = ()
    reason: str = ""


def _norm(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _dims_arg(args: Sequence[Any]) -> list[int] | None:
    """Dims given either as varargs ``permute(0, 2, 1)`` or as one sequence ``permute((0, 2, 1))``."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    return list(args) if all(isinstance(a, int) for a in args) else None


def _reshape(x: Node, sx, so, reason: str) -> DimMap:
    """An axis survives a reshape when it lands whole at the same offset: prod(out[:k]) == prod(in[:d])."""
    to_out: list[int | None] = []
    for d in range(len(sx)):
        before = math.prod(sx[:d])
        hit = None
        for k in range(len(so)):
            if math.prod(so[:k]) == before and so[k] == sx[d]:
                hit = k
                break
            if math.prod(so[:k]) > before:
                break
        to_out.append(hit)
    mixed_in = tuple(d for d, k in enumerate(to_out) if k is None and sx[d] != 1)
    hit_out = {k for k in to_out if k is not None}
    mixed_out = tuple(k for k in range(len(so)) if k not in hit_out and so[k] != 1)
    return DimMap(x, tuple(to_out), mixed_in, mixed_out, reason=reason)


def _flatten(x: Node, sx, start: int, end: int) -> DimMap:
    n = len(sx)
    start, end = _norm(start, n), _norm(end, n)
    big = [d for d in range(start, end + 1) if sx[d] != 1]
    to_out: list[int | None] = []
    for d in range(n):
        if d < start:
            to_out.append(d)
        elif d > end:
            to_out.append(d - (end - start))
        else:
            to_out.append(start if len(big) <= 1 and (not big or big[0] == d) else None)
    mixed = len(big) > 1
    return DimMap(x, tuple(to_out), tuple(range(start, end + 1)) if mixed else (), (start,) if mixed else (),
                  reason="flatten mixes axes")


def _index(x: Node, sx, so, index: Any) -> DimMap:
    index = index if isinstance(index, tuple) else (index,)
    n = len(sx)
    if any(isinstance(i, (Node, torch.Tensor, list)) for i in index):
        return DimMap(x, (None,) * n, tuple(range(n)), tuple(range(len(so))), reason="advanced indexing")
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    full: list[Any] = []
    for i in index:
        full.extend([slice(None)] * (n - consumed) if i is Ellipsis else [i])
    full.extend([slice(None)] * (n - sum(1 for i in full if i is not None)))
    to_out: list[int | None] = []
    sliced = []
    k = 0
    for i in full:
        if i is None:  # a new dim of size 1
            k += 1
            continue
        if isinstance(i, slice):
            if i != slice(None):
                sliced.append(len(to_out))
            to_out.append(k)
            k += 1
        else:
            to_out.append(None)  # an integer index drops the dim
    return DimMap(x, tuple(to_out), sliced=tuple(sliced), reason="partial slice")


def dim_map(gm: GraphModule, node: Node) -> DimMap | None:
    """Where the dims of ``node``'s input go, for shape ops; None for any other op.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes._semantics import dim_map
        >>> gm = fxfuse.trace(torch.nn.Flatten(), torch.randn(2, 3, 1, 1))
        >>> dim_map(gm, next(n for n in gm.graph.nodes if n.op == "call_module")).to_out
        (0, 1, 1, 1)
    """
    so = tensor_shape(node)
    if node.op == "call_module":
        m = module_of(gm, node)
        x = node.args[0] if node.args else None
        if isinstance(m, nn.Flatten) and isinstance(x, Node) and tensor_shape(x) is not None:
            return _flatten(x, tensor_shape(x), m.start_dim, m.end_dim)
        return None
    if node.op not in ("call_function", "call_method") or so is None:
        return None
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    x = node.args[0] if node.args else None
    sx = tensor_shape(x)
    if not isinstance(x, Node) or sx is None:
        return None
    n = len(sx)
    args = list(node.args[1:])
    if t is operator.getitem:
        return _index(x, sx, so, node.args[1])
    if name == "permute":
        dims = _dims_arg(args if args else node.kwargs.get("dims", ()))
        if dims is None:
            return None
        order = [_norm(d, n) for d in dims]
        return DimMap(x, tuple(order.index(d) for d in range(n)))
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (_norm(d, n) for d in (call_arg(node, 1, "dim0"), call_arg(node, 2, "dim1")))
        return DimMap(x, tuple(d1 if d == d0 else d0 if d == d1 else d for d in range(n)))
    if name == "t" or (name == "getattr" and args and args[0] in ("mT", "T")):
        d0, d1 = n - 2, n - 1
        return DimMap(x, tuple(d1 if d == d0 else d0 if d == d1 else d for d in range(n)))
    if name == "flatten":
        return _flatten(x, sx, call_arg(node, 1, "start_dim", 0), call_arg(node, 2, "end_dim", -1))
    if name in RESHAPES:
        return _reshape(x, sx, so, "reshape mixes axes")
    if name in REDUCTIONS:
        dim = call_arg(node, 1, "dim", None)
        if dim is None or not isinstance(dim, (int, list, tuple)):
            return DimMap(x, (None,) * n)  # reduced to a scalar
        keep = bool(call_arg(node, 2, "keepdim", False))
        dims = {_norm(d, n) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        to_out: list[int | None] = []
        k = 0
        for d in range(n):
            if d in dims:
                to_out.append(None)
                k += keep
            else:
                to_out.append(k)
                k += 1
        return DimMap(x, tuple(to_out))
    return None
