"""Which levels can be solved in closed form: the one affinity predicate.

Both the partition's level kind (``"affine"``) and the closed-form solver use
:func:`affine_spec`, so a level is reported affine exactly when it is solved
in closed form.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ._ops import call_arg, computes_like, is_foldable_norm_module, is_transparent, norm_activation, tensor_shape

__all__ = ["AffineSpec", "Attention", "ChannelAffine", "BlockSpec", "BlockUnit", "Fold", "affine_spec",
           "attention_heads", "block_spec", "move_index"]


@dataclass(frozen=True)
class AffineSpec:
    """The single Linear/Conv2d of an affine level, and the BatchNorm folded after it."""

    op: str  # qualname of the Linear or Conv2d module in the level GraphModule
    op_node: str
    norm: str | None  # qualname of the foldable BatchNorm, if any
    is_conv: bool
    has_bias_column: bool
    depthwise: bool = False  # a depthwise Conv2d (groups = in = out channels): solved channel by channel
    groups: int = 1  # a grouped Conv2d (1 < groups, not depthwise): solved group by group
    # a per-channel affine as a unit of its own (``op``: γ's qualname, ``depthwise``: its neurons are its input's):
    # a norm's affine that cannot fold into the op that reads it, or a LayerScale after no unit
    channel: ChannelAffine | None = None


@dataclass(frozen=True)
class ChannelAffine:
    """A per-channel map y_c = γ_c·u_c (+ β_c) solved as a unit: u is the normalised input x̂ of a ``layer_norm``
    over the last dim or a one-group ``group_norm`` (channels on dim 1), or, for a LayerScale or a plain affine
    ``addcmul(β, γ, x)`` (ResMLP's ``Affine`` norms), the input itself."""

    kind: str  # "layer_norm", "group_norm", "affine" or "scale"
    weight: str  # qualname of γ
    bias: str | None  # qualname of β
    eps: float | None
    input: str  # the node the affine reads
    axis: int  # the channel axis of the input and output


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
    weighted = [n for n in nodes if n.op == "call_module" and any(True for _ in level.get_submodule(n.target).parameters())]
    if [n.target for n in weighted if n.target != norm] != [node.target]:
        return None
    if any(n.op == "get_attr" for n in nodes):
        return None
    op = _unit_op(level, node)
    if op is None or op.depthwise or op.groups != 1:  # a depthwise conv alone is a block (its output space is its input's)
        return None
    return AffineSpec(op.op, op.op_node, norm, op.is_conv, op.has_bias_column or norm is not None)


# elementwise activations a block's sum may pass through on its way to the level output
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Mish)
_ACT_FUNCS = ("relu", "relu6", "leaky_relu", "gelu", "silu", "elu", "hardswish", "tanh", "sigmoid", "mish")
_ADDS = ("add", "iadd", "add_", "__add__", "__iadd__")


@dataclass(frozen=True)
class BlockUnit:
    """One weighted op of a block level with the BatchNorm folded after it: solved as one affine map."""

    spec: AffineSpec
    output: str  # node whose value is the unit's output: the BatchNorm's, else the op's
    axis: int  # neuron axis of that output: 1 for Conv2d, -1 for Linear
    act: bool = False  # the norm applies an activation after itself (timm's BatchNormAct2d)
    space: int | None = None  # index of the output's neuron space in the level's neuron_spaces
    in_space: int | None = None  # index of the op input's neuron space (its channels or features)
    # neuron spaces of the op input's other axes but the batch (an MLP-Mixer token MLP's rows are channels)
    row_spaces: tuple[int, ...] = ()
    # the output is chunked into this many equal parts on its neuron axis (a GLU's x1 · act(x2)): neuron j of
    # every part moves together, so the parts are grouped as one
    parts: int = 1

    @property
    def value(self) -> str:
        """The captured value the unit is fitted to (:class:`fxfuse._collect.Capture`): its output, or for a
        norm with an activation, the norm's output before the activation (``"<node>:pre"``)."""
        return f"{self.output}:pre" if self.act else self.output


@dataclass(frozen=True)
class Fold:
    """A norm's per-channel affine in front of a unit, folded into the unit's Linear/Conv2d before the block is solved.

    ``kind="norm"`` (the only kind): γ, β of a LayerNorm, a one-group GroupNorm or a plain affine
    ``addcmul(β, γ, x)`` (ResMLP's ``Affine``) in front of the unit (W ← W·diag γ, b ← b + Wβ). The norm's
    affine is then the identity (γ = 1, β = 0), so the level computes the same function. (LayerScales are
    per-channel units, never folded.)
    """

    kind: str
    weight: str  # qualname of γ
    bias: str | None  # qualname of β
    op: str  # qualname of the unit's Linear
    node: str  # the norm node


@dataclass(frozen=True)
class Attention:
    """A ``scaled_dot_product_attention`` whose q, k and v are all slices of one unit's output (a ViT's qkv Linear),
    reached through data movement only (reshape, permute, unbind, …).

    ``q[h][d]`` is the unit's output feature at head h, dim d of q (likewise ``k``, ``v``): within a head, q's and
    k's dims may be permuted together and v's dims on their own, and whole heads may be permuted, whatever the
    reshape; the unit's output space is otherwise fixed (:func:`fxfuse.passes.neuron_spaces`).
    """

    node: str  # the attention node
    unit: str  # the unit's output node
    q: tuple[tuple[int, ...], ...]
    k: tuple[tuple[int, ...], ...]
    v: tuple[tuple[int, ...], ...]

    @property
    def heads(self) -> int:
        return len(self.q)


@dataclass(frozen=True)
class BlockSpec:
    """A level whose weighted ops are all Linear/Conv2d (+ BatchNorm) units, solvable op by op in closed form.

    The level output is an elementwise activation (or nothing) of a sum: the
    ``terms`` units plus parameter-free ``fixed`` nodes (an identity skip). Every
    other unit is ``inner``: its output is a hidden neuron space of the block,
    solved before the terms, in graph order.
    """

    inner: tuple[BlockUnit, ...]
    terms: tuple[BlockUnit, ...]
    fixed: tuple[str, ...]
    pre: str  # the sum (pre-activation) value: a node, or ``"<node>:pre"`` (see :attr:`BlockUnit.value`)
    folds: tuple[Fold, ...] = ()  # LayerNorm affines and LayerScales folded into units first
    input_spaces: tuple[int, ...] = ()  # neuron spaces that hold the level input's axes
    pre_space: int | None = None  # the neuron space of the sum (the level's own neurons)
    tied: bool = False  # the level output stays in the input's neuron space (depthwise terms, or none)
    attention: tuple[Attention, ...] = ()  # attentions fed by one inner unit (q, k, v grouped by heads)
    # parameters used as values in the level input's neurons (a ViT's class token and position embedding):
    # (qualname, the dim in the input's neurons); fused as the grouped mean of the base models' values
    constants: tuple[tuple[str, int], ...] = ()
    # the single term reaches the sum through these axis moves (an MLP-Mixer token MLP's transpose back), in order
    moves: tuple[str, ...] = ()
    input_axes: tuple[int | None, ...] = ()  # neuron space of each axis of the level input
    pre_axes: tuple[int | None, ...] = ()  # neuron space of each axis of the sum

    @property
    def units(self) -> tuple[BlockUnit, ...]:
        return self.inner + self.terms


def _is_activation(gm: GraphModule, n: Node) -> bool:
    if n.op == "call_module":
        return type(gm.get_submodule(str(n.target))) in _ACT_MODULES
    if n.op in ("call_function", "call_method"):
        return getattr(n.target, "__name__", str(n.target)) in _ACT_FUNCS
    return False


def _is_add(n: Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False
    name = getattr(n.target, "__name__", str(n.target))
    return name in _ADDS and len(n.args) == 2 and not n.kwargs


def _unit_op(level: GraphModule, node: Node) -> AffineSpec | None:
    """The Linear or Conv2d (zero padding; any groups) called at ``node`` as an AffineSpec without a norm, or None."""
    m = level.get_submodule(str(node.target))
    if computes_like(m, nn.Linear):
        is_conv = False
    elif computes_like(m, nn.Conv2d):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        return AffineSpec(str(node.target), node.name, None, True, m.bias is not None, depthwise,
                          1 if depthwise else m.groups)
    else:
        return None
    return AffineSpec(str(node.target), node.name, None, is_conv, m.bias is not None)


def block_spec(level: GraphModule, _unfold: frozenset[str] = frozenset()) -> BlockSpec | None:
    """Describe a level as Linear/Conv2d (+ BatchNorm) units summed into its output, or None.

    Covers plain and residual blocks (ResNet basic and bottleneck blocks with
    identity, 1×1 or pooled 1×1 shortcuts; MLP blocks; an MLP-Mixer token MLP,
    whose last Linear reaches the sum through a transpose) whose every weighted
    module is such a unit. Single-op levels are :func:`affine_spec`'s.
    ``_unfold``: norms whose affine must be a per-channel unit, not folded (their γ does not meet the input
    features of the op that reads them: an MLP-Mixer's norm before the token MLP).
    """
    nodes = list(level.graph.nodes)
    attr_users = _per_channel_affines(level, nodes)
    if attr_users is None:
        return None
    norms, scales, constants = attr_users
    units: dict[str, BlockUnit] = {}  # output node name -> unit
    op_of_norm: dict[str, str] = {}
    for n in nodes:
        if n.op != "call_module" or not any(True for _ in level.get_submodule(str(n.target)).parameters()):
            continue
        m = level.get_submodule(str(n.target))
        if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1 and m.elementwise_affine:
            # a LayerNorm module over the last dim: its affine folds like a functional layer_norm's
            norms[n.name] = (f"{n.target}.weight", None if m.bias is None else f"{n.target}.bias", "layer_norm")
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            src = n.args[0] if n.args else None
            act = norm_activation(m) if not is_foldable_norm_module(m) else None
            if ((act is None and not is_foldable_norm_module(m)) or not isinstance(src, Node) or src.name not in units
                    or len(src.users) != 1 or units[src.name].spec.norm is not None):
                return None
            u = units.pop(src.name)
            spec = dataclasses.replace(u.spec, norm=str(n.target), has_bias_column=True)
            units[n.name] = BlockUnit(spec, n.name, u.axis, act=act is not None)
            op_of_norm[n.name] = src.name
            continue
        spec = _unit_op(level, n)
        if spec is None:
            return None
        units[n.name] = BlockUnit(spec, n.name, 1 if spec.is_conv else -1)
    if not units:
        return None
    by_name = {n.name: n for n in nodes}

    def strip(n: Node) -> Node:
        while True:
            if n.name in scales:  # a LayerScale: the identity once folded
                n = scales[n.name][0]
            elif is_transparent(level, n) and len(n.all_input_nodes) == 1:
                n = n.all_input_nodes[0]
            else:
                return n

    folds: list[Fold] = []
    for ln, (w, b, kind) in norms.items():  # a norm's only reader must be a Linear/Conv2d unit (with a bias for β)
        readers = [u for u in by_name[ln].users if not _reads_shape(u)]
        # a per-channel affine commutes with picking tokens (a ViT's class token) and with moving axes
        # (channels-last and back) on the way to the unit
        while len(readers) == 1 and (is_transparent(level, readers[0]) or _picks_tokens(readers[0])
                                     or _moves_axes(level, readers[0]) or _pools_tokens(readers[0])):
            readers = [u for u in readers[0].users if not _reads_shape(u)]
        unit = next((u for u in units.values() if len(readers) == 1 and u.spec.op_node == readers[0].name), None)
        if (unit is None or unit.spec.depthwise or unit.spec.groups != 1 or unit.spec.norm is not None or ln in _unfold
                or (b is not None and (not unit.spec.has_bias_column or not _no_padding(level, unit.spec)))):
            # no unit to fold into (β would meet a padded conv, or the reader is depthwise or no unit): the
            # affine is a per-channel unit of its own, its neurons the input's (checked on the spaces)
            node = by_name[ln]
            if kind == "affine":  # addcmul(β, γ, x): no normalisation; the channel axis is γ's
                eps = None
                x = next(a for a in node.args[1:3] if not (isinstance(a, Node) and a.op == "get_attr"))
                axis = _param_axis(level, next(a for a in node.args[1:3] if a is not x))
            else:
                if node.op == "call_module":
                    eps = level.get_submodule(str(node.target)).eps
                else:
                    eps = call_arg(node, 4, "eps", 1e-5)  # layer_norm's and group_norm's fifth argument
                axis = -1 if kind == "layer_norm" else 1
                x = node.args[0]
            aff = ChannelAffine(kind, w, b, eps, x.name, axis)
            units[ln] = BlockUnit(AffineSpec(w, ln, None, False, b is not None, depthwise=True, channel=aff), ln, axis)
            continue
        folds.append(Fold("norm", w, b, unit.spec.op, ln))
    for mul, (src, g) in list(scales.items()):
        # a LayerScale is a per-channel unit of its own, in its input's neurons: beside a skip it is fitted to the
        # level's targets minus the skip, and the op before it to its own targets. (Folding γ into that op, as a
        # term of the sum, was measured worse: ConvNeXt-atto seed 0, kf-linear 93.3 vs 98.0, hf-linear 96.7 vs 98.0.)
        axis = _scale_axis(by_name[mul], level.get_parameter(g))
        if axis is None:
            return None
        aff = ChannelAffine("scale", g, None, None, src.name, axis)
        units[mul] = BlockUnit(AffineSpec(g, mul, None, False, False, depthwise=True, channel=aff), mul, axis)
        del scales[mul]

    out = strip(next(n for n in nodes if n.op == "output").args[0])
    if not isinstance(out, Node):
        return None
    node = out
    if node.name not in units and not _is_add(node) and _is_activation(level, node) and len(node.all_input_nodes) == 1:
        node = strip(node.all_input_nodes[0])
        if node.name in units and units[node.name].act:  # two activations in a row
            return None
    terms: list[str] = []
    fixed: list[str] = []
    moves: dict[str, tuple[str, ...]] = {}
    if node.name in units or _is_add(node):
        stack = [node]
        while stack:
            raw = stack.pop()
            n = strip(raw)
            if n.name in units and n is not node and sum(not _reads_shape(r) for r in n.users) > 1:
                # a unit also read elsewhere in the level (a downsampling conv that is both the skip and the
                # branch's input): an inner unit, its fused value a fixed term of the sum
                fixed.append(n.name)
            elif n.name in units:
                terms.append(n.name)
            elif _is_add(n) and (n is node or len(n.users) == 1):
                if not all(isinstance(a, Node) for a in n.args):
                    return None
                stack.extend(reversed(n.args))
            elif n is not node and (moved := _moved_unit(level, raw, units)) is not None:
                terms.append(moved[0])  # a unit whose output is transposed (reshaped, …) into the sum
                moves[moved[0]] = moved[1]
            else:
                fixed.append(n.name)
    pre = node
    if not terms:
        # no unit feeds the output (a squeeze-excitation gate x·σ(W₂ act(W₁ mean x))): every unit is inner
        # and the output must stay in the input's neuron space (checked below)
        pre, fixed = out, []
    if moves and (len(terms) != 1 or move_index(level, terms[0], moves[terms[0]]) is None):
        return None  # one term through axis moves, solved alone; the moves must permute each sample's elements
    term_units = [units[t] for t in terms]
    if any(u.act for u in term_units) and not (len(terms) == 1 and pre.name == terms[0]):
        return None  # an activation inside a sum
    if any(u.spec.depthwise for u in term_units) and (len(terms) != 1 or (fixed and term_units[0].spec.channel is None)):
        return None  # a depthwise term is solved alone (its neurons are its input's); a per-channel affine with a skip
    if any(u.spec.groups != 1 for u in term_units):
        return None  # a grouped conv is solved group by group as an inner unit only

    term_set = set(terms)
    term_ops = {units[t].spec.op_node for t in terms}

    def ancestors(n: Node) -> set[str]:
        seen: set[str] = set()
        todo = list(n.all_input_nodes)
        while todo:
            a = todo.pop()
            if a.name not in seen:
                seen.add(a.name)
                todo.extend(a.all_input_nodes)
        return seen

    for name in fixed:  # computed by the fused model before the sum (an identity skip, a gated branch)
        if ancestors(by_name[name]) & (term_set | term_ops):
            return None
    for name, u in units.items():
        up = ancestors(by_name[u.spec.op_node])
        if up & (term_set | term_ops):  # nothing is computed from a term before the sum
            return None
    inner = tuple(units[n.name] for n in nodes if n.name in units and n.name not in term_set)
    term_units = tuple(units[t] for t in terms)
    tied = not terms or term_units[0].spec.depthwise
    pre_value = term_units[0].value if len(terms) == 1 and pre.name == terms[0] else pre.name
    attention = []
    for n in nodes:  # an attention is solved through its q, k, v unit only when it is one unit's data moved
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "scaled_dot_product_attention":
            att = attention_heads(level, n.name)
            if att is None or att.unit not in {u.output for u in inner}:
                return None
            attention.append(att)
    bspec = BlockSpec(inner, term_units, tuple(fixed), pre_value, tuple(folds), tied=tied, attention=tuple(attention),
                      constants=tuple((c, -1) for c in constants), moves=moves.get(terms[0], ()) if terms else ())
    res = _with_spaces(level, bspec, out)
    if isinstance(res, frozenset):  # folds whose γ does not meet the unit's input features: per-channel units
        return block_spec(level, res) if not _unfold else None
    return res


def _moved_unit(level: GraphModule, n: Node, units: dict) -> tuple[str, tuple[str, ...]] | None:
    """``(unit output, move nodes in order)`` when ``n`` is a unit's output moved by permutes, transposes, flattens
    or reshapes with constant arguments (and ops that are the identity in eval mode), each read only there."""
    chain: list[str] = []
    cur = n
    while cur.name not in units:
        if sum(not _reads_shape(u) for u in cur.users) != 1:
            return None
        if is_transparent(level, cur) and len(cur.all_input_nodes) == 1:
            cur = cur.all_input_nodes[0]
        elif _moves_axes(level, cur) and isinstance(cur.args[0], Node) and cur.all_input_nodes == [cur.args[0]]:
            chain.append(cur.name)
            cur = cur.args[0]
        else:
            return None
    if not chain or sum(not _reads_shape(u) for u in cur.users) != 1:
        return None
    return cur.name, tuple(reversed(chain))


def move_index(level: GraphModule, start: str, moves: tuple[str, ...]) -> Tensor | None:
    """Where each element of one sample of the last of ``moves`` comes from in one sample of node ``start``: a
    permutation of ``range(n)`` (flat positions), or None when the moves do not permute each sample's elements
    (they mix the batch dim, or a shape is unknown).

    Example:
        >>> import torch, fxfuse
        >>> class T(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.transpose(1, 2)
        >>> gm = fxfuse.trace(T(), torch.randn(2, 2, 3))
        >>> move_index(gm, "x", ("transpose",))
        tensor([0, 3, 1, 4, 2, 5])
    """
    by_name = {n.name: n for n in level.graph.nodes}
    shape = tensor_shape(by_name.get(start))
    if shape is None or not shape or shape[0] < 2:
        return None
    per = math.prod(shape[1:])
    t = torch.arange(shape[0] * per).reshape(shape)
    for name in moves:
        n = by_name[name]
        if n.op == "call_module":
            t = level.get_submodule(str(n.target))(t)
        elif n.op == "call_method":
            t = getattr(t, str(n.target))(*n.args[1:], **n.kwargs)
        else:
            t = n.target(t, *n.args[1:], **n.kwargs)
    if t.dim() == 0 or t.shape[0] != shape[0] or tensor_shape(by_name[moves[-1]]) != tuple(t.shape):
        return None
    t = t.reshape(shape[0], -1)
    if not torch.equal(t, t[:1] + per * torch.arange(shape[0])[:, None]) or \
            not torch.equal(t[0].sort().values, torch.arange(per)):
        return None
    return t[0]


_MOVES = ("reshape", "view", "permute", "transpose", "flatten", "unflatten", "unbind", "chunk", "split", "squeeze",
          "unsqueeze", "contiguous", "clone")


def _reads_shape(n: Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: reads no values."""
    import builtins

    if n.op == "call_function" and n.target is builtins.getattr:
        return len(n.args) > 1 and n.args[1] in ("shape", "ndim", "dtype", "device")
    return n.op == "call_method" and n.target in ("size", "dim")


def _moves_data(level: GraphModule, n: Node) -> bool:
    """An op that only moves, splits or picks elements (or is the identity in eval mode)."""
    import operator

    if is_transparent(level, n):
        return True
    if n.op == "call_function" and n.target is operator.getitem:
        return True
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_method", "call_function") and name in _MOVES


def attention_heads(level: GraphModule, node: str) -> Attention | None:
    """The :class:`Attention` at the ``scaled_dot_product_attention`` node ``node`` of ``level``, or None when its
    q, k and v are not all moved data of one Linear's output (4-d, heads on dim 1) or it has a mask.

    Which of the Linear's features lands where in q, k and v is read by running the level once on zeros with the
    Linear's output replaced by its feature indices, so any reshape and permute order is understood.

    Example:
        >>> import torch, timm, fxfuse
        >>> from fxfuse.passes import attention_heads, partition_levels
        >>> vit = timm.create_model("test_vit", img_size=32, num_classes=4).eval()
        >>> level = partition_levels(fxfuse.trace(vit, torch.randn(2, 3, 32, 32))).split()[3]  # blocks.1.attn
        >>> sdpa = next(n.name for n in level.graph.nodes if "attention" in n.name)
        >>> att = attention_heads(level, sdpa)
        >>> att.unit, att.heads, len(att.q[0]), att.k[1][0], att.v[0][:3]
        ('blocks_1_attn_qkv', 2, 32, 96, (128, 129, 130))
    """
    import torch
    from torch.fx import Interpreter

    by_name = {n.name: n for n in level.graph.nodes}
    sdpa = by_name[node]
    args = [call_arg(sdpa, j, name) for j, name in enumerate(("query", "key", "value"))]
    if call_arg(sdpa, 3, "attn_mask") is not None or not all(isinstance(a, Node) for a in args):
        return None
    path: set[str] = set()
    roots: set[str] = set()
    for a in args:  # back from q, k, v through data movement to a unit (a Linear module)
        todo = [a]
        while todo:
            n = todo.pop()
            if n.name in path:
                continue
            if n.op == "call_module" and computes_like(level.get_submodule(str(n.target)), nn.Linear):
                roots.add(n.name)
                continue
            if not _moves_data(level, n) or not n.all_input_nodes:
                return None
            path.add(n.name)
            todo.extend(x for x in n.all_input_nodes if not _reads_shape(x) and not _is_shape_value(x))
    if len(roots) != 1:
        return None
    unit = by_name[next(iter(roots))]
    for name in path | roots:  # the unit's output reaches nothing else
        if any(u.name not in path and u is not sdpa and not _reads_shape(u) for u in by_name[name].users):
            return None
    shape = tensor_shape(unit)
    placeholder = next(n for n in level.graph.nodes if n.op == "placeholder")
    in_shape = tensor_shape(placeholder)
    if shape is None or in_shape is None:
        return None
    found: dict[str, list] = {}

    class _Stop(Exception):
        pass

    class _Probe(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is unit:  # the output's features, numbered (exact in float32 below 2²⁴)
                out = torch.arange(out.shape[-1], dtype=out.dtype, device=out.device).expand(out.shape).clone()
            if n is sdpa:
                found["qkv"] = [self.env[a] for a in args]
                raise _Stop
            return out

    p = next(level.parameters(), None)
    x = torch.zeros(in_shape, dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else "cpu")
    try:
        with torch.no_grad():
            _Probe(level).run(x)
    except _Stop:
        pass
    except Exception:  # noqa: BLE001 - a level that does not run on zeros is not probed
        return None
    maps = []
    for t in found.get("qkv", []):
        if t.dim() != 4 or not bool((t == t[:1, :, :1, :]).all()):
            return None  # the same features at every sample and token, heads on dim 1
        maps.append(t[0, :, 0, :].round().long())
    if len(maps) != 3:
        return None
    q, k, v = maps
    if q.shape != k.shape or v.shape[0] != q.shape[0]:
        return None
    every = torch.cat([m.flatten() for m in maps]).sort().values
    if not torch.equal(every, torch.arange(shape[-1], device=every.device)):
        return None  # each feature once
    return Attention(node, unit.name, *(tuple(tuple(r) for r in m.tolist()) for m in maps))


def _is_shape_value(n: Node) -> bool:
    """A value computed from shapes only (``x.shape[0]``)."""
    import operator

    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        if m.name in seen:
            continue
        seen.add(m.name)
        if _reads_shape(m):
            continue
        if m.op == "call_function" and m.target is operator.getitem:
            todo.append(m.args[0])
            continue
        return False
    return True


def _with_spaces(level: GraphModule, bspec: BlockSpec, out: Node) -> BlockSpec | frozenset[str] | None:
    """``bspec`` with the neuron space of every unit's output and the level input's spaces, or None when a unit or
    the output must share the input's neurons (a depthwise conv, a tied output) and does not; the norm nodes of
    folds whose γ does not meet their unit's input features, when there are such."""
    import warnings

    from ._spaces import neuron_spaces

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an op without a handler fixes its spaces; membership is all that is read
        spaces = neuron_spaces(level)
    where: dict[tuple[str, int], int] = {}
    for s in spaces:
        for name, dim in s.nodes:
            where[(name, dim)] = s.index
    by_name = {n.name: n for n in level.graph.nodes}
    inputs = tuple(sorted({s for (name, _), s in where.items() if by_name[name].op == "placeholder"}))

    def space(name: str, axis: int) -> int | None:
        shape = by_name[name].meta.get("fxfuse", {}).get("shape")
        return None if shape is None else where.get((name, axis % len(shape)))

    units = []
    known = set(inputs)
    for u in bspec.units:
        s = space(u.output, u.axis)
        if u.spec.depthwise and (s is None or s not in known):
            return None  # a depthwise conv's neurons are those of its input, which must be grouped already
        if s is not None:
            known.add(s)
        x = by_name[u.spec.channel.input] if u.spec.channel else by_name[u.spec.op_node].args[0]
        axis = u.spec.channel.axis if u.spec.channel else (1 if u.spec.is_conv else -1)
        rows: tuple[int, ...] = ()
        if isinstance(x, Node) and tensor_shape(x) is not None:
            nd = len(tensor_shape(x))
            rows = tuple(r for a in range(1, nd) if a != axis % nd and (r := space(x.name, a)) is not None)
        units.append(dataclasses.replace(u, space=s, in_space=space(x.name, axis) if isinstance(x, Node) else None,
                                         row_spaces=rows, parts=_chunks_of(level, by_name[u.output], u.axis)))
    if bspec.tied:
        # the output keeps the neurons of the level input, or (with a per-channel term: a LayerScale after a
        # downsampling conv, PoolFormer) those of an inner unit grouped in the level (the level is grouped there)
        out_spaces = {s for (name, _), s in where.items() if name == out.name}
        inner_grouped = {u.space for u in units[: len(bspec.inner)] if not u.spec.depthwise} if bspec.terms else set()
        if not out_spaces & (set(inputs) | (inner_grouped - {None})):
            return None
    tensor_space = {(name, dim): s.index for s in spaces for name, dim in s.tensors}
    units_by_op = {u.spec.op: u for u in bspec.units}
    unfold = []
    for f in bspec.folds:  # γ must scale the unit's input channels one to one
        u = units_by_op[f.op]
        gamma = level.get_parameter(f.weight)
        at = space(by_name[u.spec.op_node].args[0].name, u.axis)
        g_dim = next((d for d, k in enumerate(gamma.shape) if k != 1), 0)  # (1, 1, C) for an addcmul affine
        if gamma.numel() != level.get_submodule(u.spec.op).weight.shape[1] or at is None or \
                tensor_space.get((f.weight, g_dim)) != at:
            unfold.append(f.node)
    if unfold:  # block_spec tries those norms as per-channel units
        return frozenset(unfold)
    constants = []
    unit_spaces = {u.space for u in units} | {u.in_space for u in units}
    for q, _ in bspec.constants:  # one dim in the input's neurons, the others (tokens) in no unit's space
        p = level.get_parameter(q)
        dims = [d for d in range(p.ndim) if tensor_space.get((q, d)) in inputs]
        if len(dims) != 1 or any(tensor_space.get((q, d)) in unit_spaces - {None} for d in range(p.ndim)
                                 if d != dims[0] and p.shape[d] != 1):
            return None
        constants.append((q, dims[0]))
    n_in = len(bspec.inner)
    pre = bspec.pre.split(":")[0]
    # through axis moves, the sum's neurons are not on the term's output axis: the caller reads them off pre_axes
    pre_space = space(pre, bspec.terms[0].axis) if bspec.terms and not bspec.moves else None

    def axes(node: Node | None) -> tuple[int | None, ...]:
        shape = tensor_shape(node)
        return () if shape is None else tuple(space(node.name, a) for a in range(len(shape)))

    placeholder = next((n for n in level.graph.nodes if n.op == "placeholder"), None)
    return dataclasses.replace(bspec, inner=tuple(units[:n_in]), terms=tuple(units[n_in:]), input_spaces=inputs,
                               pre_space=pre_space, constants=tuple(constants), input_axes=axes(placeholder),
                               pre_axes=axes(by_name[pre]))


def _chunks_of(level: GraphModule, out: Node, axis: int) -> int:
    """How many equal parts ``out`` (a unit's output) is chunked into on its neuron ``axis`` when a ``chunk`` is
    its only reader (through ops that are the identity in eval mode), else 1."""
    n = out
    while True:
        readers = [u for u in n.users if not _reads_shape(u)]
        if len(readers) != 1:
            return 1
        r = readers[0]
        if is_transparent(level, r) and len(r.all_input_nodes) == 1:
            n = r
            continue
        break
    shape = tensor_shape(n)
    is_chunk = (r.op == "call_method" and r.target == "chunk") or (r.op == "call_function" and r.target is torch.chunk)
    if not is_chunk or shape is None or r.args[0] is not n:
        return 1
    m, dim = call_arg(r, 1, "chunks"), call_arg(r, 2, "dim", 0)
    if not isinstance(m, int) or not isinstance(dim, int) or dim % len(shape) != axis % len(shape) or \
            shape[axis] % m:
        return 1
    return m


def _moves_axes(level: GraphModule, n: Node) -> bool:
    """A permute, transpose, flatten or reshape: it moves axes (whether it keeps the channel axis whole is
    checked on the neuron spaces)."""
    if n.op == "call_module":
        return isinstance(level.get_submodule(str(n.target)), nn.Flatten)
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_method", "call_function") and name in ("permute", "transpose", "flatten", "reshape", "view")


def _pools_tokens(n: Node) -> bool:
    """A mean over some dims (global average pooling of tokens or positions): it commutes with a per-channel
    affine as long as the channel axis is kept, which the neuron spaces check."""
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_method", "call_function") and name == "mean"


def _no_padding(level: GraphModule, spec: AffineSpec) -> bool:
    if not spec.is_conv:
        return True
    return all(p == 0 for p in level.get_submodule(spec.op).padding)


def _picks_tokens(n: Node) -> bool:
    """``x[:, 0]``-style indexing that leaves the last (channel) dim whole."""
    import operator

    if n.op != "call_function" or n.target is not operator.getitem or not isinstance(n.args[0], Node):
        return False
    shape = n.args[0].meta.get("fxfuse", {}).get("shape")
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    return (shape is not None and len(index) < len(shape)
            and all(isinstance(i, (int, slice)) and not isinstance(i, bool) for i in index))


def _attr_chain_root(n: Node) -> Node | None:
    """The get_attr node under a chain of shape ops on a parameter (``gamma.reshape(1, -1, 1, 1)``), or None."""
    while n.op != "get_attr":
        if n.op != "call_method" or n.target not in ("reshape", "view") or len(n.all_input_nodes) != 1:
            return None
        n = n.all_input_nodes[0]
    return n


def _per_channel_affines(level: GraphModule, nodes: list[Node]):
    """The level's parameters used outside modules, when each is the affine of a ``layer_norm`` over the last
    dim, the γ of a LayerScale (a multiplication) or a value added to or concatenated with the level's activations
    (a class token, a position embedding; whether it lives in the input's neurons is checked on the spaces):
    ``({norm node: (γ, β)}, {mul node: (other input, γ)}, [constant])`` with parameter qualnames; None when some
    other op uses a parameter."""
    norms: dict[str, tuple[str, str | None]] = {}
    scales: dict[str, tuple[Node, str]] = {}
    constants: list[str] = []
    for n in nodes:
        if n.op != "get_attr":
            continue
        if _is_param(level, n) and n.users and all(_uses_as_value(u, n) for u in n.users):
            constants.append(str(n.target))
            continue
        for user in _users_through_views(n):
            name = getattr(user.target, "__name__", str(user.target))
            if user.op == "call_function" and name == "layer_norm":
                w, b = call_arg(user, 2, "weight"), call_arg(user, 3, "bias")
                shape = call_arg(user, 1, "normalized_shape")
                if w is None or len(tuple(shape)) != 1 or not all(a is None or (isinstance(a, Node) and
                                                                                   a.op == "get_attr") for a in (w, b)):
                    return None
                norms[user.name] = (str(w.target), None if b is None else str(b.target), "layer_norm")
            elif user.op == "call_function" and name == "group_norm":
                # one group: normalised over channels and positions together, so channels may be permuted
                w, b = call_arg(user, 2, "weight"), call_arg(user, 3, "bias")
                if call_arg(user, 1, "num_groups") != 1 or w is None or not all(
                        a is None or (isinstance(a, Node) and a.op == "get_attr") for a in (w, b)):
                    return None
                norms[user.name] = (str(w.target), None if b is None else str(b.target), "group_norm")
            elif user.op == "call_function" and name == "addcmul":
                # β + γ·x with γ, β parameters that vary along one dim (ResMLP's Affine, shaped (1, 1, C))
                b, *factors = user.args[:3]
                ps = [a for a in factors if isinstance(a, Node) and a.op == "get_attr"]
                xs = [a for a in factors if not (isinstance(a, Node) and a.op == "get_attr")]
                if (len(user.args) != 3 or user.kwargs or len(ps) != 1 or len(xs) != 1 or not isinstance(xs[0], Node)
                        or not (isinstance(b, Node) and b.op == "get_attr") or _param_axis(level, ps[0]) is None
                        or _param_axis(level, b) != _param_axis(level, ps[0])):
                    return None
                norms[user.name] = (str(ps[0].target), str(b.target), "affine")
            elif (user.op == "call_function" and name == "mul") or (user.op == "call_method" and user.target == "mul"):
                if len(user.args) != 2 or user.kwargs:
                    return None
                roots = [(_attr_chain_root(a) if isinstance(a, Node) else None) for a in user.args]
                if sum(r is not None for r in roots) != 1:
                    return None
                k = 0 if roots[0] is not None else 1
                other = user.args[1 - k]
                gamma = roots[k]
                p = level.get_parameter(str(gamma.target)) if _is_param(level, gamma) else None
                if p is None or p.ndim != 1 or not isinstance(other, Node):
                    return None
                scales[user.name] = (other, str(gamma.target))
            else:
                return None
    return norms, scales, constants


def _param_axis(level: GraphModule, n: Node) -> int | None:
    """The one dim, counted from the end, along which the parameter at ``n`` is longer than 1 (γ shaped
    (1, 1, C): -1), or None."""
    if not _is_param(level, n):
        return None
    shape = tuple(level.get_parameter(str(n.target)).shape)
    dims = [d - len(shape) for d, k in enumerate(shape) if k != 1]
    return dims[0] if len(dims) == 1 else None


def _users_through_views(n: Node) -> list[Node]:
    """``n``'s users, a ``reshape``/``view`` whose users all multiply (γ shaped for a LayerScale on channels first,
    ``gamma.reshape(1, -1, 1, 1)``) replaced by those multiplications."""
    def is_mul(u: Node) -> bool:
        return (u.op == "call_function" and getattr(u.target, "__name__", "") == "mul") or \
            (u.op == "call_method" and u.target == "mul")

    out: list[Node] = []
    for u in n.users:
        if u.op == "call_method" and u.target in ("reshape", "view") and u.users and all(is_mul(m) for m in u.users):
            out.extend(u.users)
        else:
            out.append(u)
    return out


def _scale_axis(mul: Node, gamma) -> int | None:
    """The output axis a LayerScale's γ (a vector, maybe viewed as (C, 1, 1)) scales, or None."""
    out = tensor_shape(mul)
    arg = next((a for a in mul.args if isinstance(a, Node) and _attr_chain_root(a) is not None), None)
    shape = tensor_shape(arg) if arg is not None and arg.op != "get_attr" else tuple(gamma.shape)
    if out is None or shape is None or len(shape) > len(out):
        return None
    dims = [d for d, n in enumerate(shape) if n != 1]
    if len(dims) != 1 or shape[dims[0]] != gamma.numel():
        return None
    axis = len(out) - len(shape) + dims[0]
    return axis if out[axis] == gamma.numel() else None


def _uses_as_value(user: Node, attr: Node) -> bool:
    """``user`` adds ``attr`` to activations, concatenates it with them, or moves, expands or resamples it (no
    multiplication, no norm, no matmul: a value in some neurons, not a map of them)."""
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
    if user.op not in ("call_method", "call_function"):
        return False
    if name in ("add", "iadd", "__add__", "cat", "concat", "expand", "expand_as", "resample_abs_pos_embed"):
        return True
    return False


def _is_param(level: GraphModule, n: Node) -> bool:
    try:
        level.get_parameter(str(n.target))
        return True
    except AttributeError:
        return False
