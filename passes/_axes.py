"""Neuron-axis propagation: which dim of each tensor holds the neurons.

The axis is taken from the op that produced a tensor and carried through
shape-changing ops by their semantics (permute, flatten, reshape, indexing,
reductions). It is never guessed from sizes alone: sizes are only used to
check that a reshape keeps the axis intact.
"""

from __future__ import annotations

import operator

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
from ._semantics import DimMap, dim_map

__all__ = ["propagate_neuron_axes"]


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _first_tensor_arg(node: Node) -> Node | None:
    for a in node.all_input_nodes:
        if tensor_shape(a) is not None:
            return a
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
        if isinstance(m, nn.Flatten):
            return _through(dim_map(gm, node), axes)
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

    shape_op = dim_map(gm, node)
    if shape_op is not None:  # permute, transpose, flatten, reshape, reductions, indexing
        return _through(shape_op, axes)
    # elementwise ops, activations, pooling, padding, interpolation, dropout, softmax...; ops with
    # several tensor inputs may get the axis from a later one
    return _broadcast_axis(node, axes, out_shape)


def _through(shape_op: DimMap | None, axes: dict[Node, int | None]) -> int | None:
    """The neuron axis after a shape op, from the shared table of op semantics."""
    ax = axes.get(shape_op.source) if shape_op is not None else None
    if ax is None or ax in shape_op.mixed_in:
        return None
    return shape_op.to_out[ax]


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
