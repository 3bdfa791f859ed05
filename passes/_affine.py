"""Which levels can be solved in closed form: the one affinity predicate.

Both the partition's level kind (``"affine"``) and the closed-form solver use
:func:`affine_spec`, so a level is reported affine exactly when it is solved
in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.fx import GraphModule, Node

from ._ops import is_foldable_norm_module, is_transparent

__all__ = ["AffineSpec", "affine_spec"]


@dataclass(frozen=True)
class AffineSpec:
    """The single Linear/Conv2d of an affine level, and the BatchNorm folded after it."""

    op: str  # qualname of the Linear or Conv2d module in the level GraphModule
    op_node: str
    norm: str | None  # qualname of the foldable BatchNorm, if any
    is_conv: bool
    has_bias_column: bool


def affine_spec(level: GraphModule) -> AffineSpec | None:
    """Describe a level GraphModule's affine op, or None if it cannot be solved in closed form.

    Closed form needs a ``call_module`` Linear or Conv2d (groups=1, zero padding)
    whose output is the level output, optionally through one eval-mode BatchNorm.
    """
    nodes = list(level.graph.nodes)
    out = next(n for n in nodes if n.op == "output").args[0]
    norm = None
    node = out
    while is_transparent(level, node) and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    if node.op == "call_module":
        m = level.get_submodule(node.target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not is_foldable_norm_module(m):
                return None
            norm = str(node.target)
            node = node.args[0]
    if not isinstance(node, Node) or node.op != "call_module" or len(node.users) != 1:
        return None
    m = level.get_submodule(node.target)
    weighted = [n for n in nodes if n.op == "call_module" and any(True for _ in level.get_submodule(n.target).parameters())]
    if [n.target for n in weighted if n.target != norm] != [node.target]:
        return None
    if any(n.op == "get_attr" for n in nodes):
        return None
    if type(m) is nn.Linear or (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward):
        is_conv = False
    elif isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward:
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        is_conv = True
    else:
        return None
    return AffineSpec(str(node.target), node.name, norm, is_conv, m.bias is not None or norm is not None)
