"""Automatic partition of a traced model into levels (composition levels).

Reference: "Model Fusion via Neuron Interpolation", section 3 (composition
levels) and appendix F.2 (partitioning schemes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxfuse._errors import PartitionError
from fxfuse._trace import module_path

from ._affine import affine_spec
from ._axes import propagate_neuron_axes
from ._ops import (
    CONV_FUNCS,
    LINEAR_FUNCS,
    MATMUL_FUNCS,
    MATMUL_METHODS,
    CHANNEL_NORM_FUNCS,
    LAST_NORM_FUNCS,
    SHAPE_ATTRS,
    SHAPE_METHODS,
    call_arg,
    is_norm_module,
    module_of,
    tensor_shape,
)

__all__ = ["Level", "LevelPlan", "partition_levels"]

LevelKind = Literal["affine", "residual", "general"]


@dataclass(frozen=True)
class Level:
    """One composition level: the graph segment between two consecutive cut points.

    Attributes:
        index: Position of the level, from 0.
        name: Readable name: the qualname of its main op, or the common prefix of
            its weighted ops (e.g. ``"layer1.0"`` for a ResNet block).
        kind: ``"affine"`` (one Linear/Conv, plus an eval-mode BatchNorm that folds
            into it), ``"residual"`` (contains a skip or a merge of two
            activations) or ``"general"``.
        nodes: Names of the graph nodes of the level, in graph order.
        input: Name of the node whose output the level consumes.
        output: Name of the node whose output is the level's output.
        neuron_axis: Dim of the output that holds the neurons (1 for NCHW
            feature maps, the last dim for Linear and token outputs).
        width: Number of neurons, ``output_shape[neuron_axis]``.
        output_shape: Shape of the level output on the example inputs.
        params: Qualnames of the parameters the level owns.
        is_head: Whether this is the last level (its output is the model output).
    """

    index: int
    name: str
    kind: LevelKind
    nodes: tuple[str, ...]
    input: str
    output: str
    neuron_axis: int
    width: int
    output_shape: tuple[int, ...]
    params: tuple[str, ...]
    is_head: bool


@dataclass(frozen=True, eq=False)
class LevelPlan:
    """An ordered, frozen partition of a traced model into levels.

    Supports ``len(plan)``, iteration and indexing (``plan[0]``, ``plan[-1]``).
    ``plan.gm`` is the GraphModule that was partitioned.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes import partition_levels
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> plan = partition_levels(fxfuse.trace(mlp, torch.randn(2, 4)))
        >>> [(lv.name, lv.kind, lv.width) for lv in plan]
        [('0', 'affine', 8), ('2', 'affine', 3)]
    """

    gm: GraphModule
    levels: tuple[Level, ...]
    input: str = field(default="x")

    def __len__(self) -> int:
        return len(self.levels)

    def __iter__(self) -> Iterator[Level]:
        return iter(self.levels)

    def __getitem__(self, i: int) -> Level:
        return self.levels[i]

    def __repr__(self) -> str:
        return f"LevelPlan({len(self)} levels of {type(self.gm).__name__})"

    def param_count(self, level: Level | int) -> int:
        """Number of scalar parameters the level owns."""
        lv = self.levels[level] if isinstance(level, int) else level
        params = dict(self.gm.named_parameters(remove_duplicate=False))
        return sum(params[p].numel() for p in lv.params)

    def split(self) -> list[GraphModule]:
        """One GraphModule per level; chaining them reproduces the model.

        Module ``i`` takes level ``i-1``'s output tensor (module 0 takes the model
        input) and returns level ``i``'s output. The modules share parameters
        with ``plan.gm``.

        Example:
            >>> import torch, fxfuse
            >>> from fxfuse.passes import partition_levels
            >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
            >>> x = torch.randn(2, 4)
            >>> plan = partition_levels(fxfuse.trace(mlp, x))
            >>> y = x
            >>> for level_module in plan.split():
            ...     y = level_module(y)
            >>> torch.allclose(y, mlp(x))
            True
        """
        by_name = {n.name: n for n in self.gm.graph.nodes}
        return [_level_module(self.gm, by_name, lv) for lv in self.levels]

    def dump(self) -> str:
        """A text table: index, name, kind, width, output shape, parameter count, node count."""
        from ._render import dump_text

        return dump_text(self)

    def to_dot(self) -> str:
        """Graphviz DOT source of the graph with one cluster per level."""
        from ._render import to_dot

        return to_dot(self)

    def to_html(self) -> str:
        """A self-contained HTML page: the level table and the partitioned graph."""
        from ._render import to_html

        return to_html(self)

    def save(self, path: str | os.PathLike) -> str:
        """Write the plan as ``.txt``, ``.dot``, ``.svg`` (needs Graphviz) or ``.html``.

        Returns:
            The path written, as a string.
        """
        from ._render import save

        return save(self, path)


def _level_module(gm: GraphModule, by_name: dict[str, Node], lv: Level) -> GraphModule:
    graph = Graph()
    env: dict[Node, Node] = {}
    inp = by_name[lv.input]
    x = graph.placeholder("x")
    x.meta = dict(inp.meta)
    env[inp] = x
    members = {by_name[n] for n in lv.nodes}

    def copy(n: Node) -> Node:
        if n not in env:
            # Only input-independent nodes (parameters, constants) may come from
            # another level; the dominator cut guarantees it for the rest.
            assert n in members or n.meta.get("fxfuse", {}).get("input_dependent") is False, n
            for a in n.all_input_nodes:
                copy(a)
            env[n] = graph.node_copy(n, lambda a: env[a])
        return env[n]

    for name in lv.nodes:
        copy(by_name[name])
    graph.output(env[by_name[lv.output]])
    graph.lint()
    return GraphModule(gm, graph, class_name=f"Level{lv.index}")


# --- classification of nodes -------------------------------------------------


def _param_names(gm: GraphModule, node: Node) -> list[str]:
    if node.op == "call_module":
        prefix = str(node.target)
        return [f"{prefix}.{n}" for n, _ in module_of(gm, node).named_parameters()]
    if node.op == "get_attr":
        try:
            attr = gm.get_parameter(str(node.target))
        except AttributeError:
            return []
        return [str(node.target)] if isinstance(attr, nn.Parameter) else []
    return []


def _is_affine_module(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(m, "transposed", False)


class _Roles:
    """Per-node facts the partition needs: param ownership and op roles."""

    def __init__(self, gm: GraphModule, reachable: set[Node]):
        self.gm = gm
        self.params: dict[Node, list[str]] = {}
        self.param_derived: set[Node] = set()
        for n in gm.graph.nodes:
            self.params[n] = _param_names(gm, n)
            if n.op == "get_attr" and self.params[n]:
                self.param_derived.add(n)
            elif n not in reachable and n.op in ("call_function", "call_method") and any(
                a in self.param_derived for a in n.all_input_nodes
            ):
                self.param_derived.add(n)  # e.g. weight.t(), weight * scale

    def uses_param(self, n: Node) -> bool:
        return any(a in self.param_derived for a in n.all_input_nodes)

    def is_weight(self, n: Node) -> bool:
        """Ops that carry a layer's weights (Linear, Conv, parameterised leaf modules)."""
        if n.op == "call_module":
            m = module_of(self.gm, n)
            return bool(self.params[n]) and not is_norm_module(m)
        if n.op == "call_function" and (n.target in LINEAR_FUNCS or n.target in CONV_FUNCS or n.target in MATMUL_FUNCS):
            return self.uses_param(n)
        if n.op == "call_method" and n.target in MATMUL_METHODS:
            return self.uses_param(n)
        return False

    def is_norm(self, n: Node) -> bool:
        if n.op == "call_module":
            return bool(self.params[n]) and is_norm_module(module_of(self.gm, n))
        return n.op == "call_function" and (n.target in CHANNEL_NORM_FUNCS or n.target in LAST_NORM_FUNCS)

    def is_affine_op(self, n: Node) -> bool:
        if n.op == "call_module":
            return _is_affine_module(module_of(self.gm, n))
        if n.op == "call_function" and (n.target in LINEAR_FUNCS or n.target in CONV_FUNCS):
            w = call_arg(n, 1, "weight")
            return isinstance(w, Node) and w in self.param_derived
        return False



def _input_dependence(gm: GraphModule, placeholder: Node) -> tuple[set[Node], set[Node]]:
    """Nodes reachable from the input, and the subset that depends on its *values*.

    Shape queries (``x.shape``, ``x.size()``) are reachable but not value-dependent.
    """
    reachable: set[Node] = {placeholder}
    values: set[Node] = {placeholder}
    for n in gm.graph.nodes:
        if n is placeholder:
            continue
        ins = n.all_input_nodes
        if any(a in reachable for a in ins):
            reachable.add(n)
            shape_query = (
                (n.op == "call_function" and getattr(n.target, "__name__", "") == "getattr" and n.args[1] in SHAPE_ATTRS)
                or (n.op == "call_method" and n.target in SHAPE_METHODS)
            )
            if not shape_query and any(a in values for a in ins):
                values.add(n)
    return reachable, values


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    prefix = []
    for items in zip(*parts):
        if all(i == items[0] for i in items):
            prefix.append(items[0])
        else:
            break
    return ".".join(prefix)


def _level_name(roles: _Roles, nodes: list[Node], output: Node) -> str:
    anchors = [module_path(n) for n in nodes if roles.is_weight(n)]
    if not anchors:
        anchors = [p.rpartition(".")[0] for n in nodes for p in roles.params[n]]
    anchors = list(dict.fromkeys(a for a in anchors if a))
    if not anchors:
        return output.name
    prefix = _common_prefix(anchors)
    if prefix:
        return prefix
    return "+".join(dict.fromkeys(a.split(".")[0] for a in anchors))


def partition_levels(gm: GraphModule) -> LevelPlan:
    """Cut a traced model into levels at its cut points, with no per-architecture code.

    A *cut point* is a node that every path from the input to the output passes
    through: the dominator chain of the output node, computed with
    ``networkx.immediate_dominators`` over the nodes reachable from the input.
    The segments between consecutive cut points are then grouped into levels:

    1. A segment holding a weighted op (Linear, Conv, a parameterised leaf
       module or a block of them) starts a level.
    2. A norm-only segment that directly follows an affine level (a Linear or
       Conv output) stays in that level, so BatchNorm folds into its conv.
    3. Every other segment (activations, pooling, flatten, positional
       embeddings, norms after blocks) joins the *following* level, so level
       outputs are pre-activations, as in the paper's MLP and VGG levels.
       Segments after the last weighted op join the last level (the head).
    4. A level must end on a tensor whose neuron axis is known (see below); a
       level that ends elsewhere (e.g. on attention heads merged by a reshape,
       as in LeViT's downsampling attention, which has no skip) is merged with
       the next one.

    The neuron axis of a level output comes from the op that produced it (dim 1
    after Conv/BatchNorm, the last dim after Linear/LayerNorm) and is carried
    through permutes, flattens, reshapes that keep it whole, indexing and
    reductions. It is never guessed from sizes.

    Parameters and constants (``get_attr`` nodes) belong to the level of their
    first user. Residual, attention and dense blocks fall inside single levels
    because their branches rejoin before the next cut point; a transformer
    block (attention and MLP with their two skips) is therefore one level.

    The pass only annotates ``node.meta["fxfuse"]`` (``"level"``,
    ``"neuron_axis"``, ``"input_dependent"``); it does not edit the graph.

    Args:
        gm: A GraphModule from :func:`fxfuse.trace` (it needs the shape metadata).

    Returns:
        The frozen plan.

    Raises:
        TypeError: ``gm`` is not a GraphModule.
        PartitionError: the graph has several inputs or outputs, lacks shape
            metadata, or a level output has no neuron axis.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes import partition_levels
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.LazyLinear(2))
        >>> _ = net(torch.randn(1, 3, 8, 8))
        >>> print(partition_levels(fxfuse.trace(net, torch.randn(1, 3, 8, 8))).dump())  # doctest: +NORMALIZE_WHITESPACE
        index  name  kind    width  output shape   params  nodes
        0      0     affine  4      (1, 4, 6, 6)   120     2
        1      4     affine  2      (1, 2)         290     3
    """
    if not isinstance(gm, GraphModule):
        raise TypeError(
            f"partition_levels expects a torch.fx.GraphModule, got {type(gm).__name__}; "
            "trace the model first: gm = fxfuse.trace(model, example_inputs)"
        )
    graph = gm.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PartitionError(
            f"the model has {len(placeholders)} inputs ({', '.join(p.name for p in placeholders) or 'none'}); "
            "partition_levels needs exactly one tensor input. Wrap the model in a module that takes "
            "one tensor and builds the other inputs inside forward()."
        )
    (placeholder,) = placeholders
    output = next(n for n in reversed(nodes) if n.op == "output")
    result = output.args[0]
    if not isinstance(result, Node) or tensor_shape(result) is None:
        if isinstance(result, Node) and "fxfuse" not in placeholder.meta:
            raise PartitionError(
                "the graph has no shape metadata; trace it with fxfuse.trace(model, example_inputs), "
                "which runs shape propagation"
            )
        raise PartitionError(
            f"the model returns {type(result).__name__ if not isinstance(result, Node) else 'a non-tensor value'} "
            f"(node `{output.name}`); partition_levels needs a single tensor output. "
            "Wrap the model so that forward() returns one tensor (e.g. the logits)."
        )

    reachable, values = _input_dependence(gm, placeholder)
    if result not in reachable:
        raise PartitionError(f"the output node `{result.name}` does not depend on the input `{placeholder.name}`")
    for n in nodes:
        n.meta.setdefault("fxfuse", {})["input_dependent"] = n in reachable

    # 1. cut points: dominator chain of the output over the reachable subgraph
    dg = nx.DiGraph()
    dg.add_nodes_from(reachable)
    for n in reachable:
        for u in n.users:
            if u in reachable and u.op != "output":
                dg.add_edge(n, u)
    idom = nx.immediate_dominators(dg, placeholder)
    cuts = [result]
    while cuts[-1] is not placeholder:
        cuts.append(idom[cuts[-1]])
    cuts.reverse()

    # 2. segments between consecutive cut points, with constants joining their first user
    seg_of: dict[Node, int] = {}
    k = 0
    for n in nodes[pos[placeholder] + 1 : pos[result] + 1]:
        if n in reachable:
            while pos[n] > pos[cuts[k + 1]]:
                k += 1
            seg_of[n] = k
    for n in reversed(nodes):
        if n not in reachable and n.op not in ("placeholder", "output"):
            user_segs = [seg_of[u] for u in n.users if u in seg_of]
            if user_segs:
                seg_of[n] = min(user_segs)
    segments: list[list[Node]] = [[] for _ in range(len(cuts) - 1)]
    for n in nodes:
        if n in seg_of:
            segments[seg_of[n]].append(n)

    # 3. group segments into levels
    roles = _Roles(gm, reachable)

    def role(seg: list[Node]) -> str:
        if any(roles.is_weight(n) for n in seg):
            return "weight"
        if any(roles.is_norm(n) for n in seg):
            return "norm"
        return "other"

    groups: list[list[int]] = []
    pending: list[int] = []
    for s, seg in enumerate(segments):
        r = role(seg)
        if r == "weight":
            groups.append(pending + [s])
            pending = []
        elif r == "norm" and not pending and groups and roles.is_affine_op(cuts[groups[-1][-1] + 1]):
            groups[-1].append(s)
        else:
            pending.append(s)
    if pending:
        if groups:
            groups[-1].extend(pending)
        else:
            groups.append(pending)

    # 4. a level must end where the neurons are defined: merge forward until they are
    axes = propagate_neuron_axes(gm)
    merged: list[list[int]] = []
    carry: list[int] = []
    for group in groups:
        carry = carry + group
        if axes.get(cuts[carry[-1] + 1]) is not None:
            merged.append(carry)
            carry = []
    if carry:
        out = cuts[carry[-1] + 1]
        raise PartitionError(
            f"the model output (node `{out.name}`, module `{module_path(out) or '<root>'}`) of shape "
            f"{tuple(tensor_shape(out))} has no neuron axis: the op that produced it (`{out.op}` "
            f"{out.target!r}) mixes or drops dims. Wrap the model so it returns logits from a Linear or "
            "Conv layer, or mark the enclosing module as a leaf with fxfuse.trace(..., leaf_modules=...)."
        )
    groups = merged

    # 5. describe each level
    by_name = {n.name: n for n in gm.graph.nodes}
    owned: set[str] = set()
    levels = []
    for i, group in enumerate(groups):
        members = [n for s in group for n in segments[s]]
        members.sort(key=pos.__getitem__)
        out = cuts[group[-1] + 1]
        inp = cuts[group[0]]
        axis = axes[out]
        shape = tuple(tensor_shape(out))
        params = []
        for n in members:
            for p in roles.params[n]:
                if p not in owned:
                    owned.add(p)
                    params.append(p)
        for n in members:
            n.meta["fxfuse"]["level"] = i
        merges = [n for n in members if len({a for a in n.all_input_nodes if a in values}) >= 2]
        level = Level(
            index=i,
            name=_level_name(roles, members, out),
            kind="residual" if merges else "general",
            nodes=tuple(n.name for n in members),
            input=inp.name,
            output=out.name,
            neuron_axis=axis,
            width=shape[axis],
            output_shape=shape,
            params=tuple(params),
            is_head=i == len(groups) - 1,
        )
        # the closed-form solver's own predicate decides "affine", so the two never disagree
        if not merges and affine_spec(_level_module(gm, by_name, level)) is not None:
            level = dataclasses.replace(level, kind="affine")
        levels.append(level)
    return LevelPlan(gm=gm, levels=tuple(levels), input=placeholder.name)

