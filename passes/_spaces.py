"""Neuron spaces: the tensor axes that must be permuted together.

Found by union-find over tensor axes with one small handler per op, run over the
traced graph in order. An axis entry is either ``("node", node_name, dim)`` for an
activation or ``("tensor", qualname, dim)`` for a parameter or buffer. A space is
*free* when permuting all its entries together leaves the model's function
unchanged; it is *fixed* when it touches the model input or output, a reshape
that mixes axes, a concatenation, a grouped op, or an op with no handler.
Only spaces that hold a parameter or buffer axis tied to an activation, of
length > 1, are reported; other axes (conv kernels) are never permuted.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxfuse._errors import FxFuseError

from ._ops import call_arg, module_of, tensor_shape
from ._semantics import DimMap, dim_map

__all__ = ["NeuronSpace", "NeuronSpaces", "neuron_spaces", "permute", "check_neuron_spaces"]

Entry = tuple[str, str, int]


@dataclass(frozen=True)
class NeuronSpace:
    """One set of axes that are permuted together.

    Attributes:
        index: Position in :attr:`NeuronSpaces.spaces`.
        size: Length of every axis in the space.
        tensors: ``(qualname, dim)`` of the parameters and buffers in the space.
        nodes: ``(node_name, dim)`` of the activations in the space.
        fixed: Whether the space must not be permuted.
        reason: Why it is fixed (the op or node that fixed it), else ``""``.
    """

    index: int
    size: int
    tensors: tuple[tuple[str, int], ...]
    nodes: tuple[tuple[str, int], ...]
    fixed: bool
    reason: str


@dataclass(frozen=True, eq=False)
class NeuronSpaces:
    """The neuron spaces of a traced model (see :func:`neuron_spaces`)."""

    gm: GraphModule
    spaces: tuple[NeuronSpace, ...]
    unknown_ops: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.spaces)

    def __iter__(self):
        return iter(self.spaces)

    def __getitem__(self, i: int) -> NeuronSpace:
        return self.spaces[i]

    @property
    def free(self) -> list[NeuronSpace]:
        return [s for s in self.spaces if not s.fixed]

    @property
    def coverage(self) -> str:
        """``"free / all"`` spaces."""
        return f"{len(self.free)}/{len(self.spaces)}"

    def space_of(self, tensor: str, dim: int) -> NeuronSpace:
        """The space holding axis ``dim`` of parameter or buffer ``tensor``."""
        for s in self.spaces:
            if (tensor, dim) in s.tensors:
                return s
        raise KeyError(f"{tensor!r} dim {dim} is in no neuron space")

    def __repr__(self) -> str:
        return f"NeuronSpaces({self.coverage} free, unknown ops: {list(self.unknown_ops)})"


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Entry, Entry] = {}
        self.size: dict[Entry, int] = {}
        self.fixed: dict[Entry, str] = {}

    def add(self, e: Entry, n: int) -> None:
        if e not in self.parent:
            self.parent[e] = e
            self.size[e] = n

    def find(self, e: Entry) -> Entry:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def union(self, a: Entry, b: Entry) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            # axes of different lengths cannot share a permutation: keep both, fixed
            self.fix(a, f"size mismatch {self.size[ra]} vs {self.size[rb]}")
            self.fix(b, f"size mismatch {self.size[ra]} vs {self.size[rb]}")
            return
        self.parent[rb] = ra
        if rb in self.fixed and ra not in self.fixed:
            self.fixed[ra] = self.fixed[rb]

    def fix(self, e: Entry, reason: str) -> None:
        r = self.find(e)
        self.fixed.setdefault(r, reason)


_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.exp,
    torch.neg, torch.abs, torch.clamp, torch.where, torch.sqrt, torch.rsqrt, torch.erf, torch.square, torch.addcmul,
    F.relu, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.relu6, F.leaky_relu, F.elu,
    F.mish, F.softplus, F.dropout, F.hardtanh,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "exp", "neg", "abs", "clamp", "sqrt", "rsqrt",
    "pow", "contiguous", "clone", "float", "double", "half", "to", "type_as", "add_", "mul_", "sub_", "div_",
    "relu_", "sigmoid_", "clamp_", "square", "masked_fill", "detach", "addcmul",
}
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.modules.dropout._DropoutNd, nn.Hardtanh, nn.PReLU,
)
_POOL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                 nn.modules.pooling._AdaptiveMaxPoolNd)
_POOL_FUNCS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool1d,
               F.avg_pool1d, F.max_pool1d, F.interpolate, F.pad}
_KNOWN_STATE: dict[type, set[str]] = {
    nn.Linear: {"weight", "bias"},
    nn.modules.conv._ConvNd: {"weight", "bias"},
    nn.modules.batchnorm._BatchNorm: {"weight", "bias", "running_mean", "running_var"},
    nn.LayerNorm: {"weight", "bias"},
    nn.GroupNorm: {"weight", "bias"},
    nn.PReLU: {"weight"},
}


class _Builder:
    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.uf = _UnionFind()
        self.unknown: dict[str, None] = {}
        self.state = dict(gm.named_parameters(remove_duplicate=False))
        self.state.update(dict(gm.named_buffers(remove_duplicate=False)))
        for name, t in self.state.items():
            for d in range(t.ndim):
                self.uf.add(("tensor", name, d), t.shape[d])
            if not t.is_floating_point() or name.rpartition(".")[2].startswith("_tensor_constant"):
                # index tables and constants captured by tracing are data, not neuron weights
                self.fix_tensor(name, f"constant `{name}`")

    # -- helpers -------------------------------------------------------------------------------
    def ax(self, node: Any, d: int) -> Entry | None:
        shape = tensor_shape(node)
        if shape is None:
            return None
        d = d + len(shape) if d < 0 else d
        if not 0 <= d < len(shape):
            return None
        e = ("node", node.name, d)
        self.uf.add(e, shape[d])
        return e

    def t(self, name: str, d: int) -> Entry | None:
        t = self.state.get(name)
        if t is None or not -t.ndim <= d < t.ndim:
            return None
        return ("tensor", name, d % t.ndim)

    def union(self, *entries: Entry | None) -> None:
        es = [e for e in entries if e is not None]
        for e in es[1:]:
            self.uf.union(es[0], e)

    def fix_node(self, node: Any, reason: str, dims: Iterable[int] | None = None) -> None:
        shape = tensor_shape(node)
        if shape is None:
            return
        for d in dims if dims is not None else range(len(shape)):
            e = self.ax(node, d)
            if e is not None:
                self.uf.fix(e, reason)

    def fix_tensor(self, name: str, reason: str) -> None:
        t = self.state.get(name)
        if t is None:
            return
        for d in range(t.ndim):
            self.uf.fix(("tensor", name, d), reason)

    def same(self, a: Any, b: Any) -> None:
        """Unify all dims of two tensors with equal shapes."""
        sa, sb = tensor_shape(a), tensor_shape(b)
        if sa is None or sb is None or len(sa) != len(sb):
            return
        for d in range(len(sa)):
            if sa[d] == sb[d]:
                self.union(self.ax(a, d), self.ax(b, d))
            else:
                self.fix_node(a, "shape change", [d])
                self.fix_node(b, "shape change", [d])

    def broadcast(self, out: Node, inputs: Iterable[Any]) -> None:
        so = tensor_shape(out)
        for a in inputs:
            sa = tensor_shape(a)
            if sa is None or so is None:
                continue
            off = len(so) - len(sa)
            for d in range(len(sa)):
                if sa[d] == so[d + off] and sa[d] != 1:
                    self.union(self.ax(a, d), self.ax(out, d + off))

    def unknown_op(self, node: Node, label: str) -> None:
        self.unknown[label] = None
        for a in [*node.all_input_nodes, node]:
            self.fix_node(a, f"unknown op {label}")
            if a.op == "get_attr":
                self.fix_tensor(str(a.target), f"unknown op {label}")
        if node.op == "call_module":
            for name, _ in module_of(self.gm, node).named_parameters():
                self.fix_tensor(f"{node.target}.{name}", f"unknown op {label}")
            for name, _ in module_of(self.gm, node).named_buffers():
                self.fix_tensor(f"{node.target}.{name}", f"unknown op {label}")

    # -- handlers ------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.fix_node(node, f"model input `{node.name}`")
            elif node.op == "output":
                for a in node.all_input_nodes:
                    self.fix_node(a, "model output")
            elif node.op == "get_attr":
                if str(node.target) in self.state and tensor_shape(node) is not None:
                    for d in range(len(tensor_shape(node))):
                        self.union(self.ax(node, d), self.t(str(node.target), d))
                elif tensor_shape(node) is not None:
                    self.fix_node(node, f"constant `{node.target}`")
            elif node.op == "call_module":
                self.module(node, module_of(self.gm, node))
            else:
                self.function(node)

    def linear(self, node: Node, x: Any, w: str | None, b: str | None) -> None:
        self.union(self.ax(x, -1), self.t(w, 1) if w else None)
        self.union(self.ax(node, -1), self.t(w, 0) if w else None, self.t(b, 0) if b else None)
        sx, so = tensor_shape(x), tensor_shape(node)
        if sx and so:
            for d in range(len(sx) - 1):
                self.union(self.ax(x, d), self.ax(node, d))

    def module(self, node: Node, m: nn.Module) -> None:
        p = str(node.target)
        x = node.args[0] if node.args else None
        has = lambda n: f"{p}.{n}" if getattr(m, n, None) is not None else None  # noqa: E731
        held = {n for n, _ in m.named_parameters()} | {n for n, t in m.named_buffers() if t.ndim > 0}
        expected = _KNOWN_STATE.get(next((c for c in _KNOWN_STATE if isinstance(m, c)), None), set())
        if held - expected:
            # a subclass with extra tensors (e.g. a per-channel gain): permuting only the
            # known ones would change the function
            self.unknown_op(node, type(m).__name__)
        elif isinstance(m, nn.Linear):
            self.linear(node, x, f"{p}.weight", has("bias"))
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            self.conv(node, x, f"{p}.weight", has("bias"), m.groups)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            self.same(x, node)
            self.union(self.ax(node, 1), *(self.t(f"{p}.{n}", 0) for n in ("weight", "bias", "running_mean", "running_var")
                                          if getattr(m, n, None) is not None))
        elif isinstance(m, nn.LayerNorm):
            self.same(x, node)
            nd = len(m.normalized_shape)
            for k in range(1, nd + 1):
                self.union(self.ax(node, -k), has("weight") and self.t(has("weight"), -k), has("bias") and self.t(has("bias"), -k))
            if type(m).forward is not nn.LayerNorm.forward:  # e.g. a channels-first subclass used as a leaf
                self.unknown_op(node, type(m).__name__)
        elif isinstance(m, nn.GroupNorm):
            self.same(x, node)
            self.union(self.ax(node, 1), has("weight") and self.t(has("weight"), 0), has("bias") and self.t(has("bias"), 0))
            if m.num_groups not in (1, m.num_channels):
                self.fix_node(node, "GroupNorm groups", [1])
        elif isinstance(m, _ELEMENTWISE_MODULES):
            if isinstance(m, nn.PReLU) and m.weight.numel() > 1:
                self.union(self.ax(node, 1), self.t(f"{p}.weight", 0))
            self.same(x, node)
        elif isinstance(m, _POOL_MODULES):
            self.channels_only(node, x)
        elif isinstance(m, nn.Flatten) and dim_map(self.gm, node) is not None:
            self.shape_op(node, dim_map(self.gm, node))
        elif isinstance(m, nn.Softmax):
            self.same(x, node)
        else:
            self.unknown_op(node, type(m).__name__)

    def conv(self, node: Node, x: Any, w: str, b: str | None, groups: int) -> None:
        self.union(self.ax(x, 0), self.ax(node, 0))
        sx, so = tensor_shape(x), tensor_shape(node)
        if sx is None or so is None:
            return
        self.fix_node(node, "spatial positions", range(2, len(so)))
        if groups == 1:
            self.union(self.ax(x, 1), self.t(w, 1))
            self.union(self.ax(node, 1), self.t(w, 0), self.t(b, 0) if b else None)
        elif groups == sx[1] == so[1]:  # depthwise
            self.union(self.ax(x, 1), self.ax(node, 1), self.t(w, 0), self.t(b, 0) if b else None)
        else:
            self.fix_node(x, f"grouped conv (groups={groups})", [1])
            self.fix_node(node, f"grouped conv (groups={groups})", [1])
            self.fix_tensor(w, f"grouped conv (groups={groups})")
            if b:
                self.fix_tensor(b, f"grouped conv (groups={groups})")

    def channels_only(self, node: Node, x: Any) -> None:
        """Pooling, padding, interpolation: batch and channels pass through, positions change."""
        sx, so = tensor_shape(x), tensor_shape(node)
        if sx is None or so is None or len(sx) != len(so):
            return self.unknown_op(node, str(node.target))
        self.union(self.ax(x, 0), self.ax(node, 0))
        self.union(self.ax(x, 1), self.ax(node, 1))
        self.fix_node(node, "spatial positions", range(2, len(so)))

    def shape_op(self, node: Node, m: DimMap) -> None:
        """Tie or fix dims as the shared table of op semantics says (permute, reshape, indexing...)."""
        for d, k in enumerate(m.to_out):
            if k is None:
                continue
            if d in m.sliced:
                self.fix_node(m.source, m.reason, [d])
                self.fix_node(node, m.reason, [k])
            elif d not in m.mixed_in:
                self.union(self.ax(m.source, d), self.ax(node, k))
        if m.mixed_in:
            self.fix_node(m.source, m.reason, m.mixed_in)
        if m.mixed_out:
            self.fix_node(node, m.reason, m.mixed_out)

    def function(self, node: Node) -> None:
        t = node.target
        name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        args = node.args
        x = args[0] if args else None
        if tensor_shape(node) is None and name not in ("chunk", "split", "unbind", "getitem"):
            return  # shape queries and other non-tensor values
        if t is operator.getitem and isinstance(x, Node) and tensor_shape(x) is None:
            self.fix_node(node, "item of a split")  # its source is fixed already
            return
        m = dim_map(self.gm, node)
        if m is not None:
            return self.shape_op(node, m)
        if t is F.linear:
            w, b = call_arg(node, 1, "weight"), call_arg(node, 2, "bias")
            self.union(self.ax(x, -1), self.ax(w, 1))
            self.union(self.ax(node, -1), self.ax(w, 0), self.ax(b, 0))
            for d in range(len(tensor_shape(x)) - 1):
                self.union(self.ax(x, d), self.ax(node, d))
        elif t in (F.conv1d, F.conv2d, F.conv3d):
            w, b = call_arg(node, 1, "weight"), call_arg(node, 2, "bias")
            groups = call_arg(node, 6, "groups", 1)
            self.union(self.ax(x, 0), self.ax(node, 0))
            self.fix_node(node, "spatial positions", range(2, len(tensor_shape(node))))
            if groups == 1:
                self.union(self.ax(x, 1), self.ax(w, 1))
                self.union(self.ax(node, 1), self.ax(w, 0), self.ax(b, 0))
            elif groups == tensor_shape(x)[1] == tensor_shape(node)[1]:
                self.union(self.ax(x, 1), self.ax(node, 1), self.ax(w, 0), self.ax(b, 0))
            else:
                self.unknown_op(node, f"grouped {name}")
        elif t in (F.batch_norm, torch.batch_norm):
            self.same(x, node)
            self.union(self.ax(node, 1), *(self.ax(a, 0) for a in node.args[1:5] if isinstance(a, Node)))
        elif t in (F.group_norm, torch.group_norm):
            self.same(x, node)
            groups, c = call_arg(node, 1, "num_groups"), tensor_shape(node)[1]
            self.union(self.ax(node, 1), self.ax(call_arg(node, 2, "weight"), 0), self.ax(call_arg(node, 3, "bias"), 0))
            if groups not in (1, c):  # channels may only move within their group
                self.fix_node(node, "GroupNorm groups", [1])
        elif name == "resample_abs_pos_embed":  # timm: interpolates the positions, keeps the channels (last dim)
            n = len(tensor_shape(node))
            self.union(self.ax(x, -1), self.ax(node, -1))
            self.fix_node(x, "position embedding positions", range(n - 1))
            self.fix_node(node, "position embedding positions", range(n - 1))
        elif name == "roll":
            dims = call_arg(node, 2, "dims", None)
            n = len(tensor_shape(x))
            rolled = set() if dims is None else {d % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
            if dims is None:
                self.fix_node(node, "roll over all elements")
            for d in range(n):
                if d in rolled:
                    self.fix_node(node, "rolled axis", [d])
                    self.fix_node(x, "rolled axis", [d])
                elif dims is not None:
                    self.union(self.ax(x, d), self.ax(node, d))
        elif t in (F.layer_norm, torch.layer_norm):
            self.same(x, node)
            self.union(self.ax(node, -1), self.ax(call_arg(node, 2, "weight"), -1), self.ax(call_arg(node, 3, "bias"), -1))
        elif t in _ELEMENTWISE_FUNCS or name in _ELEMENTWISE_METHODS or name in ("softmax", "log_softmax"):
            self.broadcast(node, [a for a in node.all_input_nodes if tensor_shape(a) is not None])
        elif t in _POOL_FUNCS:
            self.channels_only(node, x)
        elif name in ("cat", "concat", "concatenate"):
            items = [a for a in args[0] if isinstance(a, Node)]
            n = len(tensor_shape(node))
            dim = call_arg(node, 1, "dim", 0) % n
            for a in items:
                for d in range(n):
                    if d == dim:
                        self.fix_node(a, "cat", [d])
                    else:
                        self.union(self.ax(a, d), self.ax(node, d))
            self.fix_node(node, "cat", [dim])
        elif name in ("expand", "expand_as", "repeat", "broadcast_to"):
            self.broadcast(node, [x])
        elif name in ("matmul", "__matmul__", "bmm") or t in (torch.matmul, operator.matmul, torch.bmm):
            a, b = args[0], args[1]
            self.union(self.ax(a, -1), self.ax(b, -2))
            self.union(self.ax(node, -1), self.ax(b, -1))
            self.union(self.ax(node, -2), self.ax(a, -2))
        elif name == "scaled_dot_product_attention":
            q, k, v = args[:3]
            self.union(self.ax(q, -1), self.ax(k, -1))
            self.union(self.ax(node, -1), self.ax(v, -1))
            self.union(self.ax(node, -2), self.ax(q, -2))
            self.union(self.ax(k, -2), self.ax(v, -2))
        elif name in ("chunk", "split", "unbind", "tensor_split"):
            self.fix_node(x, f"{name} splits an axis")
        else:
            self.unknown_op(node, name)

    def result(self) -> NeuronSpaces:
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        groups: dict[Entry, list[Entry]] = {}
        for e in self.uf.parent:
            groups.setdefault(self.uf.find(e), []).append(e)
        spaces = []
        for root, entries in groups.items():
            tensors = tuple(sorted((name, d) for kind, name, d in entries if kind == "tensor"))
            if not tensors:
                continue
            nodes = tuple(sorted(((name, d) for kind, name, d in entries if kind == "node"), key=lambda e: (order[e[0]], e[1])))
            size = self.uf.size[root]
            if not nodes or size == 1:
                continue  # kernel axes and length-1 axes are not neuron axes; they are never permuted
            spaces.append((tensors, nodes, size, self.uf.fixed.get(root, "")))
        spaces.sort(key=lambda s: s[0])
        out = tuple(
            NeuronSpace(i, size, tensors, nodes, bool(reason), reason)
            for i, (tensors, nodes, size, reason) in enumerate(spaces)
        )
        return NeuronSpaces(self.gm, out, tuple(self.unknown))


def neuron_spaces(gm: GraphModule) -> NeuronSpaces:
    """Find the groups of parameter axes that must be permuted together.

    Runs one handler per op over the traced graph (in graph order) and joins
    tensor axes with union-find: Linear and Conv tie their weight's input axis to
    the input's channels and their output axis to the output's; norms, activations,
    residual adds and broadcasting ops tie matching axes; permutes, transposes,
    flattens and reshapes carry axes along when they keep them whole. The model
    input and output, axes that a reshape or flatten mixes, concatenated axes,
    grouped convolutions and every axis an unknown op touches are *fixed*. An op
    with no handler is listed in a warning and in ``unknown_ops``; it is never
    silently permuted through.

    Args:
        gm: A GraphModule from :func:`fxfuse.trace` (it needs the shape metadata).

    Returns:
        The frozen spaces; ``spaces.free`` are the permutable ones.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes import neuron_spaces
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> spaces = neuron_spaces(fxfuse.trace(mlp, torch.randn(2, 4)))
        >>> [(s.tensors, s.fixed) for s in spaces.free]
        [((('0.bias', 0), ('0.weight', 0), ('2.weight', 1)), False)]
    """
    if not isinstance(gm, GraphModule):
        raise TypeError(f"neuron_spaces expects a GraphModule, got {type(gm).__name__}; trace the model with fxfuse.trace")
    b = _Builder(gm)
    b.run()
    spaces = b.result()
    if spaces.unknown_ops:
        warnings.warn(
            f"neuron_spaces: no handler for {', '.join(spaces.unknown_ops)}; the spaces they touch are fixed",
            stacklevel=2,
        )
    return spaces


def permute(
    gm: GraphModule, spaces: NeuronSpaces, perms: Mapping[int, Tensor], *, in_place: bool = False
) -> GraphModule:
    """Permute the parameters of free neuron spaces; the function is unchanged.

    Args:
        gm: The GraphModule the spaces were computed on.
        spaces: From :func:`neuron_spaces`.
        perms: Space index -> permutation, Tensor of shape (space.size,).
        in_place: Edit ``gm`` itself instead of a deep copy.

    Returns:
        The permuted GraphModule (a new one unless ``in_place``).
    """
    out = gm if in_place else copy.deepcopy(gm)
    state = dict(out.named_parameters(remove_duplicate=False))
    state.update(dict(out.named_buffers(remove_duplicate=False)))
    done: set[tuple[str, int]] = set()
    with torch.no_grad():
        for idx, perm in perms.items():
            space = spaces[idx]
            if space.fixed:
                raise ValueError(f"neuron space {idx} is fixed ({space.reason}); only free spaces can be permuted")
            perm = torch.as_tensor(perm, dtype=torch.long)
            if perm.shape != (space.size,) or not torch.equal(perm.sort().values, torch.arange(space.size)):
                raise ValueError(f"perms[{idx}] must be a permutation of range({space.size}), got shape {tuple(perm.shape)}")
            for name, d in space.tensors:
                if (name, d) in done:
                    continue
                done.add((name, d))
                t = state[name]
                t.copy_(t.index_select(d, perm.to(t.device)))
    return out


def check_neuron_spaces(
    gm: GraphModule, example_inputs: Tensor | Sequence[Tensor], *, seed: int = 0, rtol: float = 1e-4,
    atol: float = 1e-5,
) -> NeuronSpaces:
    """Self-check: permute every free space at random; the output must not change.

    ``example_inputs`` is a Tensor or a tuple of Tensors, as for :func:`fxfuse.trace`.

    Returns:
        The spaces (``spaces.coverage`` reports "free / all").

    Raises:
        FxFuseError: the outputs changed; the message names the first space that
            breaks the function on its own.
    """
    from fxfuse._trace import as_input_tuple

    inputs = as_input_tuple(example_inputs)
    spaces = neuron_spaces(gm)
    gen = torch.Generator().manual_seed(seed)
    perms = {s.index: torch.randperm(s.size, generator=gen) for s in spaces.free}
    with torch.no_grad():
        ref = gm(*inputs)
        got = permute(gm, spaces, perms)(*inputs)
    if torch.allclose(got, ref, rtol=rtol, atol=atol):
        return spaces
    for idx, perm in perms.items():
        with torch.no_grad():
            if not torch.allclose(permute(gm, spaces, {idx: perm})(*inputs), ref, rtol=rtol, atol=atol):
                s = spaces[idx]
                raise FxFuseError(
                    f"neuron space {idx} (size {s.size}; tensors {list(s.tensors)[:6]}) changes the model's output "
                    "when permuted: a handler joined axes that are not equivalent. Please report this model."
                )
    raise FxFuseError("permuting all free neuron spaces together changes the output, though each alone does not")
