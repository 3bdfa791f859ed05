"""Neuron-axis propagation: which dim of each tensor holds the neurons.

The axis is taken from the op that produced a tensor and carried through
shape-changing ops by their semantics (permute, flatten, reshape, indexing,
reductions). It is never guessed from sizes alone: sizes are only used to
check that a reshape keeps the axis intact.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ._ops import (
    CHANNEL_NORM_FUNCS,
    CONV_FUNCS,
    CONV_T_FUNCS,
    LAST_NORM_FUNCS,
    LINEAR_FUNCS,
    MATMUL_FUNCS,
    MATMUL_METHODS,
    call_arg,
    module_of,
    tensor_shape,
)

__all__ = ["propagate_neuron_axes"]

_REDUCE = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "norm")
_RESHAPE = ("reshape", "view", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _first_tensor_arg(node: Node) -> Node | None:
    for a in node.all_input_nodes:
        if tensor_shape(a) is not None:
            return a
    return None


def _dims_arg(args: Sequence[Any]) -> list[int] | None:
    """Dims given either as varargs ``permute(0, 2, 1)`` or as one sequence ``permute((0, 2, 1))``."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    if all(isinstance(a, int) for a in args):
        return list(args)
    return None


def _reshape_axis(in_shape, out_shape, axis: int) -> int | None:
    """Where ``axis`` lands after a reshape, or None if the reshape splits or merges it."""
    before = math.prod(in_shape[:axis])
    size = in_shape[axis]
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) == before and out_shape[k] == size:
            return k
        if math.prod(out_shape[:k]) > before:
            break
    return None


def _index_axis(index: Any, in_ndim: int, axis: int) -> int | None:
    """Axis after ``x[index]`` for basic indexing (ints, slices, None, Ellipsis)."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, (Node, torch.Tensor, list)) for i in index):
        return None  # advanced indexing; left to the shape fallback
    n_consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (in_ndim - n_consumed))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (in_ndim - sum(1 for i in expanded if i is not None)))
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == axis:
            return out_dim if isinstance(i, slice) else None
        if isinstance(i, slice):
            out_dim += 1
        in_dim += 1
    return None


def _broadcast_axis(node: Node, axes: dict[Node, int | None], out_shape) -> int | None:
    """Axis of an elementwise op with broadcasting: right-align each input's axis."""
    for a in node.all_input_nodes:
        ax, s = axes.get(a), tensor_shape(a)
        if ax is None or s is None:
            continue
        cand = ax + len(out_shape) - len(s)
        if 0 <= cand < len(out_shape) and out_shape[cand] == s[ax]:
            return cand
    return None


def _module_axis(m: nn.Module, out_ndim: int) -> int | None:
    if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                      nn.modules.instancenorm._InstanceNorm)):
        return 1
    if isinstance(m, (nn.Linear, nn.Bilinear)) or type(m) is nn.LayerNorm:
        return out_ndim - 1
    return None


def _last_param_module_axis(m: nn.Module, out_ndim: int) -> int | None:
    """For opaque leaf modules: the axis of the last parameterised submodule."""
    for sub in reversed(list(m.modules())):
        if any(True for _ in sub.parameters(recurse=False)):
            return _module_axis(sub, out_ndim)
    return None


def _node_axis(gm: GraphModule, node: Node, axes: dict[Node, int | None]) -> int | None:
    out_shape = tensor_shape(node)
    src = _first_tensor_arg(node)
    in_shape = tensor_shape(src)
    in_axis = axes.get(src) if src is not None else None
    tuple_axis = None
    if out_shape is None:
        # tuple-valued ops (chunk, split, unbind) keep one axis for all their items
        if node.op in ("call_method", "call_function") and in_axis is not None:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if name in ("chunk", "split", "tensor_split"):
                tuple_axis = in_axis
            elif name == "unbind":
                d = _norm_dim(call_arg(node, 1, "dim", 0), len(in_shape))
                tuple_axis = None if d == in_axis else in_axis - (d < in_axis)
        return tuple_axis
    ndim = len(out_shape)

    if node.op == "placeholder" or node.op == "get_attr":
        return None
    if node.op == "call_module":
        m = module_of(gm, node)
        ax = _module_axis(m, ndim)
        if ax is not None:
            return ax
        if in_shape is not None and in_axis is not None and len(in_shape) == ndim and out_shape[in_axis] == in_shape[in_axis]:
            return in_axis
        if isinstance(m, nn.Flatten) and in_axis is not None:
            return _flatten_axis(in_shape, in_axis, m.start_dim, m.end_dim)
        return _last_param_module_axis(m, ndim)

    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if node.op == "call_function":
        if t in LINEAR_FUNCS:
            return ndim - 1
        if t in CONV_FUNCS or t in CONV_T_FUNCS or t in CHANNEL_NORM_FUNCS:
            return 1
        if t in LAST_NORM_FUNCS:
            return ndim - 1
        if t is operator.getitem:
            base = node.args[0]
            if isinstance(base, Node) and tensor_shape(base) is None:
                return axes.get(base)  # item of a tuple from chunk/split/unbind
            if in_axis is None:
                return None
            return _index_axis(node.args[1], len(in_shape), in_axis)
        if name in ("cat", "concat", "concatenate"):
            for a in node.args[0] if node.args else ():
                if isinstance(a, Node) and axes.get(a) is not None:
                    return axes[a]
            return None
        if name == "stack":
            items = node.args[0]
            for a in items:
                if isinstance(a, Node) and axes.get(a) is not None:
                    d = _norm_dim(call_arg(node, 1, "dim", 0), ndim)
                    return axes[a] + (d <= axes[a])
            return None
    if t in MATMUL_FUNCS or name in MATMUL_METHODS:
        if name == "einsum":
            return None
        a, b = (x for x in node.args[:2])
        if isinstance(b, Node) and axes.get(b) is not None and axes[b] == len(tensor_shape(b)) - 1:
            return ndim - 1
        if isinstance(a, Node) and axes.get(a) is not None and len(tensor_shape(a)) >= 2 and axes[a] == len(tensor_shape(a)) - 2:
            return ndim - 2
        return None

    if in_axis is None:
        # ops with several tensor inputs may get the axis from a later one
        return _broadcast_axis(node, axes, out_shape)
    in_ndim = len(in_shape)
    args = list(node.args[1:])
    if name == "permute":
        dims = _dims_arg(args if args else node.kwargs.get("dims", ()))
        if dims is None:
            return None
        return [_norm_dim(d, in_ndim) for d in dims].index(in_axis)
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (_norm_dim(d, in_ndim) for d in (call_arg(node, 1, "dim0"), call_arg(node, 2, "dim1")))
        return d1 if in_axis == d0 else d0 if in_axis == d1 else in_axis
    if name == "t" or (name == "getattr" and args and args[0] in ("mT", "T")):
        last = (in_ndim - 2, in_ndim - 1)
        return last[1] if in_axis == last[0] else last[0] if in_axis == last[1] else in_axis
    if name == "flatten":
        start = call_arg(node, 1, "start_dim", 0)
        end = call_arg(node, 2, "end_dim", -1)
        return _flatten_axis(in_shape, in_axis, start, end)
    if name in _RESHAPE:
        return _reshape_axis(in_shape, out_shape, in_axis)
    if name in _REDUCE:
        dim = call_arg(node, 1, "dim", None)
        if dim is None:
            return None
        keep = bool(call_arg(node, 2, "keepdim", False))
        dims = [_norm_dim(d, in_ndim) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        if in_axis in dims:
            return None
        return in_axis if keep else in_axis - sum(d < in_axis for d in dims)
    # elementwise ops, activations, pooling, padding, interpolation, dropout, softmax...
    return _broadcast_axis(node, axes, out_shape)


def _flatten_axis(in_shape, axis: int, start: int, end: int) -> int | None:
    n = len(in_shape)
    start, end = _norm_dim(start, n), _norm_dim(end, n)
    if axis < start:
        return axis
    if axis > end:
        return axis - (end - start)
    others = [in_shape[d] for d in range(start, end + 1) if d != axis]
    return start if all(s == 1 for s in others) else None


def propagate_neuron_axes(gm: GraphModule) -> dict[Node, int | None]:
    """Neuron axis of every node's output (None where no axis is defined).

    Also stores it as ``node.meta["fxfuse"]["neuron_axis"]``.
    """
    axes: dict[Node, int | None] = {}
    for node in gm.graph.nodes:
        try:
            axes[node] = _node_axis(gm, node, axes)
        except (ValueError, TypeError, IndexError):
            axes[node] = None
        if tensor_shape(node) is not None:
            node.meta.setdefault("fxfuse", {})["neuron_axis"] = axes[node]
    return axes
