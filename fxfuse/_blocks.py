"""Closed form inside blocks: every Linear/Conv2d (+ BatchNorm) of a level solved from its own grouped targets.

A level that is not one affine op (a ResNet basic or bottleneck block, an MLP
block) is solved op by op, in graph order (:func:`fxfuse.passes.block_spec`):

1. each *inner* unit's output is a hidden neuron space of the block. Its neurons
   are grouped (HF or KF, as the level's) from the base models' activations at
   that unit, on their Gram matrix as a ridge fit from the fused input reproduces
   them; its target is the grouped base activations, its input the fused model's
   own activation (the level run with the units solved so far). Solved in closed
   form from streamed second moments (:class:`fxfuse._solve.GramStats`), with the
   ridge chosen by generalised cross-validation, towards the start weights;
2. the units summed into the level's pre-activation (the branch's last conv and a
   1×1 shortcut) are fitted jointly to the level's grouped pre-activation targets
   minus the parameter-free terms of the fused model (its identity skip), so the
   skip's deviation is corrected. The level's neurons are grouped (importance-
   weighted, as any level's) on their pre-activations, the values fitted.

Neurons tied to others are not grouped anew (the spaces come from :func:`fxfuse.passes.neuron_spaces`):

- a unit whose output space holds the level input (a depthwise conv on the input, a squeeze-excitation's
  expanding conv whose gate multiplies the input) takes the grouping of the input, the previous level's;
- a unit in a space grouped earlier in the level (a depthwise conv after a 1×1 expansion) takes that grouping;
- a unit in the level's own space that is not a term of the sum (a branch gated by squeeze-excitation
  before the sum) takes the level's grouping, computed first from the base models' pre-activations;
- a level whose output keeps the input's neurons (a depthwise conv + norm, a gate x·σ(…), a block with no
  unit in its sum) takes the input's grouping as its own;
- a unit that is a term of the sum and is also read elsewhere in the level (PoolFormer's downsampling conv, the
  skip and the token mixer's input) is an inner unit whose fused value is a fixed term; the level's neurons are
  then that unit's: grouped first from the base models' level outputs, and the per-channel term beside it (a
  LayerScale) is fitted to the targets minus the fused unit;
- a parameter added to or concatenated with activations in the input's neurons (a ViT's class token and
  position embedding) is fused first, as the grouped mean of the base models' values with the input's grouping
  (:func:`grouped_constants`).

A norm (LayerNorm over the last dim, one-group GroupNorm) whose affine cannot fold into the op that reads it (β
before a zero-padded conv, as ConvNeXt's stem norm before its first depthwise conv; a pooling token mixer) has its
affine x̂·γ + β as a unit of its own, in its input's neurons, solved channel by channel on the normalised input x̂;
so has a LayerScale that cannot fold into a term of the sum (after no unit, after axis moves, after an inner unit:
γ·u on its input u; beside a skip it is fitted to the targets minus the fused skip). A depthwise conv is solved channel by channel (:class:`fxfuse._solve.DiagonalStats`), a grouped conv (ResNeXt,
RegNet) group by group. A grouped conv's spaces admit only permutations of whole groups and within groups, so
its input space (the inner unit before it) and its output space are grouped within groups matched one to one
across models (:func:`group_in_blocks`; one match for both), its output on the base models' values there, and
each fused group is fitted from that group's fused input channels. A norm with an
activation inside (timm's ``BatchNormAct2d``) is fitted to its value before the activation.

An attention whose q, k and v are slices of one Linear's output (a ViT's qkv, :class:`fxfuse.passes.Attention`)
has that Linear as an inner unit. Its output space is fixed for ``neuron_spaces`` (the reshape into heads mixes
axes), but attention is unchanged when whole heads are permuted, q's and k's dims within a head by one
permutation and v's by another: heads are matched across models and the dims grouped within matched heads
(:func:`group_attention`), the Linear is solved against those grouped q, k, v targets, its v rows are solved
again through the fused model's own attention (the attention output P_h X W_v,h is linear in W_v,h once q and k
are fixed; one least-squares problem per head against the base models' grouped attention outputs), and the
projection after the attention is a unit of the sum, fitted from the fused model's own attention output.
A unit whose rows run over grouped neurons (an MLP-Mixer token MLP's fc1 reads a (batch, channels, tokens)
tensor) is fitted to the base models' op run on the fused model's own rows (:func:`unit_is_shared`), since no
base model's rows match the fused channels one to one; a term that reaches the sum through axis moves (its fc2,
transposed back) is fitted to the level's grouped targets minus the fixed terms, moved back into its own layout
(:func:`_fit_moved_term`).
Each unit costs one pass over the fusion data; nothing but d×d statistics is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.fx import GraphModule

from ._collect import Capture
from ._solve import GramStats, affine_params, design_rows, grouped_sq_norm, read_affine, to_rows, unreproduced

__all__ = ["BlockResult", "fuse_block"]

# elements of one unfolded design chunk (float32: 32 MB), as for single-op levels
_DESIGN_CHUNK = 8 << 20


class OpTarget(NamedTuple):
    """What one op of a block level was fitted to, for its held-out error (:func:`held_out_errors`)."""

    value: str  # the captured value fitted (a node, ``"<node>:pre"``, or ``"__output__"``: the level output)
    axis: int | tuple[int, ...]  # its neuron axis (axes)
    matrix: Tensor  # the grouping matrix A of its targets Z A
    # a unit whose rows are fused neurons (unit_is_shared): (op, op input), the base models' op on the fused input
    shared: tuple[str, str] | None = None


@dataclass(frozen=True)
class BlockResult:
    grouping: Any
    error: float
    ridge: float
    rows: int
    columns: int
    ops: list[dict[str, Any]]
    targets: list[OpTarget]  # per op, what it was fitted to


def _env(level: GraphModule, x: Tensor, names: set[str], output: bool = True) -> dict[str, Tensor]:
    """Values of the named nodes when ``level`` runs on ``x``, and with ``output`` the level output as
    ``"__output__"``; without it the level runs only as far as the last named node."""
    cap = Capture(level, names, stop=not output)
    if cap.capture(x):
        cap.values["__output__"] = cap.output
    return cap.values


def _op_input_name(level: GraphModule, unit) -> str:
    if unit.spec.channel is not None:
        return unit.spec.channel.input
    node = next(n for n in level.graph.nodes if n.name == unit.spec.op_node)
    return node.args[0].name


def _chunks(h: Tensor, per_sample: int) -> list[slice]:
    step = max(1, _DESIGN_CHUNK // max(per_sample, 1))
    return [slice(s, s + step) for s in range(0, h.shape[0], step)]


@torch.no_grad()
def _unit_pass(i, prep, col, bspec, unit, *, last: bool):
    """One pass over the data for ``unit`` (or, with ``last``, for the sum): its Gram statistics.

    For the sum, also stores the base level outputs for the next level.
    """
    from ._engine import _check_finite

    fused = col.chains[-1][i]
    bases = [chain[i] for chain in col.chains[:-1]]
    units = bspec.terms if last else (unit,)
    op_in = [_op_input_name(fused, u) for u in units]
    in_names = set(op_in)
    want_base = {bspec.pre} if last else {unit.value}
    # a base level that is an inserted identity (models of different depth) has none of the block's inner
    # nodes: its inner neurons are left out, and its level output is its pre-activation
    use = range(len(bases)) if last else bases_with(prep, i, bases, want_base)
    # a unit whose rows are the fused model's neurons (an MLP-Mixer token MLP reads channels as rows): its targets
    # are the base models' op on the fused model's own rows, the rows being the same inputs for all of them
    shared = [bases[k].get_submodule(unit.spec.op) for k in use] if not last and unit_is_shared(i, prep, bspec, unit) \
        else None
    stats = GramStats()
    rows = 0
    for b, ins, _ in col.inputs(i):
        outs: list[list[Tensor]] = [[] for _ in bases]
        h = ins[-1]
        # chunk by samples so that the unfolded designs stay small: size them on one sample
        env1 = _env(fused, h[:1], in_names, output=False)
        cols = [design_rows(fused, u.spec, env1[name]) for u, name in zip(units, op_in)]
        per_sample = cols[0].shape[0] * sum(c.shape[1] for c in cols)
        for sl in _chunks(h, per_sample):
            envs_b = [_env(bases[k], ins[k][sl], want_base, output=last) for k in use] if shared is None else []
            env_f = _env(fused, h[sl], in_names | set(bspec.fixed), output=False)
            X = torch.cat([design_rows(fused, u.spec, env_f[name]) for u, name in zip(units, op_in)], 1)
            if last:
                Z = [to_rows(e[bspec.pre] if same_structure(prep, k, i) and bspec.pre in e else e["__output__"],
                             bspec.terms[0].axis) for k, e in zip(use, envs_b)]
                if bspec.fixed:
                    Z.append(to_rows(sum(env_f[f] for f in bspec.fixed), bspec.terms[0].axis))
                for k, e in enumerate(envs_b):
                    o = e["__output__"]
                    _check_finite(o, f"level {i} (`{prep.plans[k][i].name}`) of models[{k}]")
                    outs[k].append(o)
            elif shared is not None:
                Z = [to_rows(op(env_f[op_in[0]]), unit.axis) for op in shared]
            else:
                Z = [to_rows(e[unit.value], unit.axis) for e in envs_b]
            stats.add(X, torch.cat(Z, 1))
            rows += X.shape[0]
        if last:
            for k, parts in enumerate(outs):
                col.store(k, i, b, torch.cat(parts))
    from ._dist import all_reduce_number

    stats.reduce()  # the shards of a process group join here
    return stats, all_reduce_number(rows)


def same_structure(prep, k: int, i: int) -> bool:
    """Whether models[k]'s level i is its own level, not an inserted identity or merged levels (models of
    different depth), whose node names may coincide with the fused level's by accident."""
    al = getattr(prep, "alignment", None)
    return al is None or (i not in al.identity[k] and i not in al.merged[k])


def bases_with(prep, i: int, bases, names) -> list[int]:
    """The base models whose level ``i`` is their own and has nodes of all these names (a block's inner op)."""
    return [k for k, lv in enumerate(bases) if same_structure(prep, k, i) and has_nodes(lv, names)]


def has_nodes(level: GraphModule, names) -> bool:
    """Whether the level module has nodes of all these names."""
    have = {n.name for n in level.graph.nodes}
    return {n.split(":")[0] for n in names} <= have  # "<node>:pre" is a value of <node>


def input_neuron_space(i: int, prep, bspec) -> int | None:
    """The neuron space of the level input's grouped axis (the previous level's neurons); None for the first
    level, whose input (the model input) is the same for every model."""
    if i == 0 or not bspec.input_axes:
        return None
    axis = prep.fused_plan[i - 1].neuron_axis % len(bspec.input_axes)
    return bspec.input_axes[axis]


def positional_spaces(i: int, prep, bspec) -> set[int]:
    """Spaces of the level's positions (tokens, patches): the axes of its input and of its sum other than their
    neurons. They are never grouped: a unit whose outputs are positions (ResMLP's token-mixing Linear) keeps them,
    fused position t being the mean of the base models' position t."""
    out: set[int | None] = set()
    if bspec.pre_axes:
        out |= set(bspec.pre_axes) - {bspec.pre_axes[prep.fused_plan[i].neuron_axis % len(bspec.pre_axes)]}
    if i > 0 and bspec.input_axes:
        out |= set(bspec.input_axes) - {input_neuron_space(i, prep, bspec)}
    return out - {None}


def unit_is_shared(i: int, prep, bspec, unit) -> bool:
    """Whether ``unit``'s rows run over grouped neurons (the level input's, or an inner unit's): an MLP-Mixer token
    MLP's Linear reads a (batch, channels, tokens) tensor, so its rows are the fused model's channels, which the
    base models' rows do not match one to one."""
    if not unit.row_spaces:
        return False
    att = {a.unit for a in bspec.attention}
    grouped = {input_neuron_space(i, prep, bspec)} | {u.space for u in bspec.inner if u.output not in att
                                                      and u.space not in bspec.input_spaces}
    return bool(set(unit.row_spaces) & (grouped - {None} - positional_spaces(i, prep, bspec)))


def fixed_grouping(n_models: int, width: int, how: str):
    """Neuron c of every model to fused neuron c, averaged (the model input's channels, positions)."""
    from ._engine import Grouping, _cluster_matrix

    labels = torch.arange(width).repeat(n_models)
    return Grouping(labels, _cluster_matrix(labels, torch.ones(len(labels), dtype=torch.float64), width), 0.0, how)


@torch.no_grad()
def fold_params(level: GraphModule, folds) -> dict[str, Tensor]:
    """New values of the parameters that fold a block's norm affines into the units that read them
    (:class:`fxfuse.passes.Fold`); the norms' affines become the identity and the level's function is unchanged.

    Example:
        >>> import torch, timm, fxfuse
        >>> from fxfuse.passes import block_spec, partition_levels, rewrite_params
        >>> from fxfuse._blocks import fold_params
        >>> vit = timm.create_model("test_vit", img_size=32, num_classes=4, init_values=0.1).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> level = partition_levels(fxfuse.trace(vit, x)).split()[2]  # the first MLP half-block
        >>> h = torch.randn(2, 5, 64)
        >>> before = level(h)
        >>> _ = rewrite_params(level, fold_params(level, block_spec(level).folds), in_place=True)
        >>> torch.allclose(level(h), before, atol=1e-5), float(level.get_parameter("blocks.0.norm2.weight").min())
        (True, 1.0)
    """
    out: dict[str, Tensor] = {}

    def cur(name: str) -> Tensor:
        return out[name] if name in out else level.get_parameter(name).detach().to(torch.float64)

    for f in folds:
        op = level.get_submodule(f.op)
        W = cur(f"{f.op}.weight")
        b = cur(f"{f.op}.bias") if op.bias is not None else None
        g = cur(f.weight)
        W3 = W.reshape(W.shape[0], W.shape[1], -1)  # (out, in, kernel positions): a Linear has one position
        if f.bias is not None:  # the unit has no padding (block_spec): β reaches every kernel position
            b = b + W3.sum(2) @ cur(f.bias).reshape(-1)  # β may be shaped (1, 1, C) (an addcmul affine)
            out[f.bias] = torch.zeros_like(g)
        W3 = W3 * g.reshape(-1)[None, :, None]
        out[f.weight] = torch.ones_like(g)
        out[f"{f.op}.weight"] = W3.reshape(W.shape)
        if b is not None:
            out[f"{f.op}.bias"] = b
    return out


def input_grouping(i: int, prep, col, width: int):
    """The grouping of level ``i``'s input neurons (the fused level ``i-1``'s), or None when it is not known or
    not ``width`` wide. The first level's input is the model input: fused channel c is the mean of channel c."""
    if i == 0:
        return fixed_grouping(len(col.chains) - 1, width, "model input")
    g = col.groupings.get(i - 1)
    return g if g is not None and g.matrix.shape[1] == width else None


def _tied(g, how: str):
    import dataclasses

    if g.how == how or g.how.startswith(f"{how} ("):  # a chain of tied levels says it once
        return g
    return dataclasses.replace(g, how=f"{how} ({g.how})" if g.how else how)


@torch.no_grad()
def _tied_pass(i, prep, col, bspec, unit, A: Tensor, *, last: bool, axis: int):
    """One pass for a unit (or a level output) whose neurons are fixed by a known grouping ``A``: for a depthwise
    ``unit``, its per-channel statistics against T = Z A; with ``last``, the base level outputs are stored for
    the next level, the Gram matrix K of the grouped values is summed, and without a unit the level output's
    error against its targets. Returns (stats or None, K, error sum, target sum, rows)."""
    from ._dist import all_reduce_, all_reduce_number
    from ._engine import _check_finite
    from ._solve import DiagonalStats, diagonal_rows

    fused = col.chains[-1][i]
    bases = [chain[i] for chain in col.chains[:-1]]
    value = (bspec.pre if unit is not None else "__output__") if last else unit.value
    op_in = _op_input_name(fused, unit) if unit is not None else None
    stats = DiagonalStats() if unit is not None else None
    K = None
    sq_err = sq_t = 0.0
    rows = 0
    A = A.to(torch.float64)
    per_sample = None
    fixed = set(bspec.fixed) if last and unit is not None else set()  # a per-channel term's skip
    for b, ins, _ in col.inputs(i):
        outs: list[list[Tensor]] = [[] for _ in bases]
        h = ins[-1]
        if per_sample is None:  # the design's size per sample, from the first one
            per_sample = _per_sample(fused, unit, op_in, h) if unit is not None else 1 << 12
        for sl in _chunks(h, per_sample):
            envs_b = [_env(bases[k], ins[k][sl], {value}, output=last) for k in range(len(bases))]
            env_f = _env(fused, h[sl], ({op_in} if op_in else set()) | fixed, output=unit is None)
            Z = torch.cat([to_rows(e[value], axis) for e in envs_b], 1).to(torch.float64)
            A = A.to(Z.device)
            T = Z @ A
            if unit is not None:
                if fixed:  # a per-channel term beside a skip: fitted to the targets minus the fused skip
                    T = T - to_rows(sum(env_f[f] for f in fixed), axis).to(torch.float64)
                stats.add(diagonal_rows(fused, unit.spec, env_f[op_in]), T)
            else:
                out = to_rows(env_f["__output__"], axis).to(torch.float64)
                sq_err += float(((out - T) ** 2).sum())
                sq_t += float((T * T).sum())
            if last:
                K = Z.T @ Z if K is None else K.addmm_(Z.T, Z)
                for k, e in enumerate(envs_b):
                    o = e["__output__"]
                    _check_finite(o, f"level {i} (`{prep.plans[k][i].name}`) of models[{k}]")
                    outs[k].append(o)
            rows += Z.shape[0]
        if last:
            for k, parts in enumerate(outs):
                col.store(k, i, b, torch.cat(parts))
    if stats is not None:
        stats.reduce()
    if K is not None:
        all_reduce_(K)
    return stats, K, all_reduce_number(sq_err), all_reduce_number(sq_t), all_reduce_number(rows)


@torch.no_grad()
def _base_gram(i, col, bspec) -> Tensor:
    """K = ZᵀZ of the base models' pre-activations at the level's sum (one pass over the base models only)."""
    return _value_gram(i, col, bspec.pre, bspec.terms[0].axis)


@torch.no_grad()
def _value_gram(i, col, value: str, axis: int) -> Tensor:
    """K = ZᵀZ of all base models' values at node ``value`` (neurons on ``axis``); one pass over the bases only."""
    from ._dist import all_reduce_

    bases = [chain[i] for chain in col.chains[:-1]]
    K = None
    for _, ins, _ in col.inputs(i, which=list(range(len(bases)))):
        Z = torch.cat([to_rows(_env(lv, x, {value}, output=False)[value], axis) for lv, x in zip(bases, ins)], 1)
        Z = Z.to(torch.float64)
        K = Z.T @ Z if K is None else K.addmm_(Z.T, Z)
    all_reduce_(K)
    return K


def group_match_costs(gram: Tensor, scores: Tensor, widths: list[int], groups: int) -> list[Tensor]:
    """For each model m > 0, the (groups, groups) cost of matching the first model's group g with model m's group h:
    the cost of the best one-to-one pairing of their neurons (:func:`fxfuse._grouping.gram_pair_costs`); every
    width a multiple of ``groups``."""
    from scipy.optimize import linear_sum_assignment

    from ._grouping import gram_sq_dists, harmonic_weights

    starts = [sum(widths[:m]) for m in range(len(widths))]
    size = [w // groups for w in widths]
    costs = []
    for m in range(1, len(widths)):
        # the pair costs of the first model's neurons with model m's, once; then a small matching per group pair
        a = torch.arange(starts[0], starts[0] + widths[0], device=gram.device)
        b = torch.arange(starts[m], starts[m] + widths[m], device=gram.device)
        pair = (harmonic_weights(scores[a], scores[b]).to(gram.device) * gram_sq_dists(gram, a, b)).cpu().numpy()
        cost = torch.empty(groups, groups, dtype=torch.float64)
        s0, sm = size[0], size[m]
        for g in range(groups):
            for h in range(groups):
                c = pair[g * s0 : (g + 1) * s0, h * sm : (h + 1) * sm]
                r, col = linear_sum_assignment(c)
                cost[g, h] = float(c[r, col].sum())
        costs.append(cost)
    return costs


def group_attention(gram: Tensor, maps: list[tuple[Tensor, Tensor, Tensor]], fused: tuple[Tensor, Tensor, Tensor], *,
                    strategy: str, seed: int, cfg):
    """The grouping of an attention's q, k, v unit (:class:`fxfuse.passes.Attention`) from its neurons' Gram matrix.

    ``maps``: for each base model, its (q, k, v) index maps (Tensors of shape (heads, head dim)) into its unit's
    output, in the order of ``gram``'s blocks; ``fused``: the fused model's. Heads are matched one to one across
    models on the summed cost of the best pairing of their q·k dims (q's and k's values side by side: one
    permutation serves both, which leaves every attention logit unchanged) and of their v dims; then, within
    matched heads, the q·k dims and the v dims are grouped (HF or KF, as the level) like
    :func:`group_in_blocks`. Fused head g is the first model's head g.
    """
    from ._engine import GROUPINGS, Grouping, _cluster_matrix
    from ._grouping import hungarian_pairs, kernel_inertia

    heads = fused[0].shape[0]
    starts, s = [], 0
    for q, k, v in maps:
        starts.append(s)
        s += q.numel() + k.numel() + v.numel()
    dev = gram.device
    Q = torch.cat([s0 + q.flatten() for s0, (q, _, _) in zip(starts, maps)]).to(dev)
    K = torch.cat([s0 + k.flatten() for s0, (_, k, _) in zip(starts, maps)]).to(dev)
    V = torch.cat([s0 + v.flatten() for s0, (_, _, v) in zip(starts, maps)]).to(dev)
    g_qk = gram[Q][:, Q] + gram[K][:, K]
    g_v = gram[V][:, V]
    w_qk = [q.numel() for q, _, _ in maps]
    w_v = [v.numel() for _, _, v in maps]
    ones_qk = torch.ones(len(Q), dtype=torch.float64, device=dev)
    ones_v = torch.ones(len(V), dtype=torch.float64, device=dev)
    match = [hungarian_pairs(a + b) for a, b in zip(group_match_costs(g_qk, ones_qk, w_qk, heads),
                                                    group_match_costs(g_v, ones_v, w_v, heads))]
    qk, _ = group_in_blocks(g_qk, ones_qk, w_qk, fused[0].numel(), heads, match, strategy=strategy, seed=seed, cfg=cfg)
    vv, _ = group_in_blocks(g_v, ones_v, w_v, fused[2].numel(), heads, match, strategy=strategy, seed=seed + 1,
                            cfg=cfg)
    fq, fk, fv = (f.flatten().to(dev) for f in fused)
    labels = torch.empty(gram.shape[0], dtype=torch.long, device=dev)
    labels[Q] = fq[qk.labels.to(dev)]
    labels[K] = fk[qk.labels.to(dev)]
    labels[V] = fv[vv.labels.to(dev)]
    n = fq.numel() + fk.numel() + fv.numel()
    ones = torch.ones(gram.shape[0], dtype=torch.float64, device=dev)
    how = f"{GROUPINGS[strategy].how} within {heads} matched heads (q, k dims together)"
    return Grouping(labels, _cluster_matrix(labels, ones, n), kernel_inertia(gram, ones, labels, n), how), vv


@torch.no_grad()
def grouped_constants(i: int, prep, col, bspec) -> dict[str, Tensor]:
    """The fused values of the level's constants (:attr:`fxfuse.passes.BlockSpec.constants`): along the dim in the
    input's neurons, fused channel c is Σ_j A[j, c] p_j over the base models' channels j (A: the input's grouping,
    the mean of the grouped channels), as the input's values are grouped."""
    from ._errors import FxFuseError

    fused = col.chains[-1][i]
    bases = [chain[i] for chain in col.chains[:-1]]
    out = {}
    for q, dim in bspec.constants:
        p = fused.get_parameter(q)
        g = input_grouping(i, prep, col, p.shape[dim])
        if g is None:
            raise FxFuseError(f"level {i} (`{prep.fused_plan[i].name}`): `{q}` lives in the level input's neurons, "
                              "whose grouping is not known or not as wide; fuse this model with blocks='gradient'")
        P = torch.cat([b.get_parameter(q).detach().to(torch.float64) for b in bases], dim)
        A = g.matrix.to(device=P.device, dtype=torch.float64)
        out[q] = torch.movedim(torch.movedim(P, dim, -1) @ A, -1, dim).to(p.dtype)
    return out


@torch.no_grad()
def _values_through_attention(i: int, prep, col, unit, att, g_v, ops, targets, regularisation: str) -> None:
    """Refit the v rows of an attention's qkv unit through the fused model's own attention: for head h, the
    attention output is P_h X W_v,h (P_h the fused softmax(q kᵀ · scale), X the unit's input with its bias
    column), linear in W_v,h, so W_v,h is the least-squares fit of the base models' attention outputs grouped as
    v (``g_v``) from the design P_h X, one problem per head (:class:`fxfuse._solve.DiagonalStats`)."""
    from fxfuse.passes import rewrite_params
    from fxfuse.passes._ops import call_arg

    from ._solve import DiagonalStats

    fused = col.chains[-1][i]
    bases = [chain[i] for chain in col.chains[:-1]]
    sdpa = next(n for n in fused.graph.nodes if n.name == att.node)
    qn, kn = (call_arg(sdpa, j, name).name for j, name in ((0, "query"), (1, "key")))
    scale = call_arg(sdpa, 6, "scale")
    x_name = _op_input_name(fused, unit)
    fv = torch.tensor(att.v, dtype=torch.long).flatten()
    heads = len(att.v)
    A = g_v.matrix.to(torch.float64)
    stats = DiagonalStats()
    for _, ins, _ in col.inputs(i):
        h = ins[-1]
        env1 = _env(fused, h[:1], {x_name}, output=False)
        per_sample = design_rows(fused, unit.spec, env1[x_name]).numel() * heads * 4
        for sl in _chunks(h, per_sample):
            env_f = _env(fused, h[sl], {qn, kn, x_name}, output=False)
            q, k = env_f[qn].to(torch.float64), env_f[kn].to(torch.float64)
            s = scale if scale is not None else q.shape[-1] ** -0.5
            P = torch.softmax(q @ k.transpose(-1, -2) * s, -1)  # (B, H, N, N)
            X = design_rows(fused, unit.spec, env_f[x_name]).to(torch.float64)
            B, N = q.shape[0], q.shape[2]
            D = (P @ X.reshape(B, 1, N, -1)).permute(0, 2, 1, 3).reshape(B * N, heads, -1)
            Z = torch.cat([to_rows(_env(lv, x[sl], {att.node}, output=False)[att.node].to(torch.float64), (1, 3))
                           for lv, x in zip(bases, ins[:-1])], 1)  # (B·N, heads · head dim) per model
            stats.add(D, Z @ A.to(Z.device), dtype=env_f[x_name].dtype)  # D: a float64 copy
    stats.reduce()
    W0 = read_affine(fused, unit.spec)
    W, rss, t2, ridge = stats.solve(W0[:, fv], regularisation)
    W0[:, fv] = W
    rewrite_params(prep.fused_plan.gm, affine_params(fused, unit.spec, W0), in_place=True)
    ops.append({"op": f"{unit.spec.op} (v rows)", "role": "inner", "grouping": g_v.how, "error": rss / max(t2, 1e-300),
                "ridge": ridge, "rows": stats.rows, "columns": stats.d, "how": "per head, through the attention"})
    targets.append(OpTarget(att.node, (1, 3), g_v.matrix))  # the attention output, (batch, heads, tokens, head dim)


def _head_maps(att) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.tensor(m, dtype=torch.long) for m in (att.q, att.k, att.v))


def group_in_blocks(gram: Tensor, scores: Tensor, widths: list[int], k: int, groups: int, match, *, strategy: str,
                    seed: int, cfg):
    """Group neurons that a grouped conv reads or writes (``groups`` groups) group by group: a (Grouping, match), or
    None when a width or ``k`` is not a multiple of ``groups``.

    Each model's groups are matched one to one to the first model's (``match``: a list with one permutation per
    other model, computed here when None: Hungarian matching of the groups on the cost of the best one-to-one
    pairing of their neurons, as :func:`fxfuse._grouping.gram_pair_costs`), then the neurons of matched groups are
    grouped among themselves (HF or KF, as the level) into k / groups fused neurons, fused group g taking the
    first model's group g. The same ``match`` serves a grouped conv's input and output spaces, which move
    together.
    """
    from ._engine import GROUPINGS, Grouping, _cluster_matrix, group
    from ._grouping import hungarian_pairs, kernel_inertia

    if k % groups or any(w % groups for w in widths):
        return None
    starts = [sum(widths[:m]) for m in range(len(widths))]
    size = [w // groups for w in widths]

    def block(m: int, g: int) -> Tensor:
        return torch.arange(starts[m] + g * size[m], starts[m] + (g + 1) * size[m], device=gram.device)

    if match is None:
        match = [hungarian_pairs(c) for c in group_match_costs(gram, scores, widths, groups)]
    labels = torch.empty(sum(widths), dtype=torch.long, device=gram.device)
    per = k // groups
    for g in range(groups):
        parts = [block(0, g)] + [block(m, int(match[m - 1][g])) for m in range(1, len(widths))]
        idx = torch.cat(parts)
        sub = group(gram[idx][:, idx], scores[idx], [len(p) for p in parts], per, is_head=False, strategy=strategy,
                    seed=seed + g, cfg=cfg)
        labels[idx] = sub.labels.to(labels.device) + g * per
    how = f"{GROUPINGS[strategy].how} within {groups} matched groups"
    cost = kernel_inertia(gram, scores.to(torch.float64), labels, k)
    return Grouping(labels, _cluster_matrix(labels, scores, k), cost, how), match


def group_unit(gram: Tensor, widths: list[int], k: int, groups: int, match, *, strategy: str, seed: int, cfg,
               residual: Tensor | None = None, parts: int = 1):
    """An inner unit's grouping (uniform scores) and the match of groups it used: its ``parts`` alike when its
    output is chunked into parts used together (:func:`group_parts`), within matched groups
    (:func:`group_in_blocks`) when ``groups`` > 1 and the widths allow, else over all neurons (match None).
    ``residual``: as for :func:`fxfuse._engine.group` (the ``"distance"`` HF cost), over all neurons only."""
    from ._engine import group

    if parts > 1:
        return group_parts(gram, widths, k, parts, strategy=strategy, seed=seed, cfg=cfg, residual=residual), None
    ones = torch.ones(sum(widths), dtype=torch.float64, device=gram.device)
    blocked = group_in_blocks(gram, ones, widths, k, groups, match, strategy=strategy, seed=seed, cfg=cfg) \
        if groups > 1 else None
    if blocked is not None:
        return blocked
    return group(gram, ones, widths, k, is_head=False, strategy=strategy, seed=seed, cfg=cfg, residual=residual), None


def group_parts(gram: Tensor, widths: list[int], k: int, parts: int, *, strategy: str, seed: int, cfg,
                residual: Tensor | None = None):
    """The grouping of a unit whose output is chunked into ``parts`` equal parts used together (a GLU's
    x1 · act(x2), x1 and x2 the two halves of one Linear): neuron j of part p and neuron j of every other part are
    one *pair* neuron, whose Gram entries are the sums over parts, ⟨(z¹_j, z²_j), (z¹_i, z²_i)⟩ = Σ_p gram[p_j, p_i].
    The pairs are grouped (HF or KF, uniform scores) into k / parts fused pairs, and fused neuron c of part p takes
    the base neurons of part p whose pairs went to c, so every part is permuted alike. Each width a multiple of
    ``parts``.

    Example:
        >>> import torch
        >>> from fxfuse._blocks import group_parts
        >>> from fxfuse._config import make_config
        >>> z = torch.randn(50, 4, dtype=torch.float64)  # one model: parts [0, 1] and [2, 3]
        >>> z2 = z[:, [1, 0, 3, 2]]  # the same neurons, the pairs swapped alike in both parts
        >>> Z = torch.cat([z, z2], 1)
        >>> g = group_parts(Z.T @ Z, [4, 4], 4, 2, strategy="hf", seed=0, cfg=make_config("hf-linear"))
        >>> g.labels.tolist()
        [0, 1, 2, 3, 1, 0, 3, 2]
    """
    from ._engine import Grouping, group

    offsets = [sum(widths[:m]) for m in range(len(widths))]
    halves = [w // parts for w in widths]
    idx = [torch.cat([o + p * h + torch.arange(h) for o, h in zip(offsets, halves)]).to(gram.device)
           for p in range(parts)]
    pair_gram = sum(gram[ix][:, ix] for ix in idx)
    pair_res = sum(residual[ix] for ix in idx) if residual is not None else None
    ones = torch.ones(sum(halves), dtype=torch.float64, device=gram.device)
    g = group(pair_gram, ones, halves, k // parts, is_head=False, strategy=strategy, seed=seed, cfg=cfg,
              residual=pair_res)
    labels = torch.empty(sum(widths), dtype=g.labels.dtype, device=g.labels.device)
    matrix = torch.zeros(sum(widths), k, dtype=g.matrix.dtype, device=g.matrix.device)
    for p, ix in enumerate(idx):
        labels[ix] = g.labels + p * (k // parts)
        matrix[ix, p * (k // parts) : (p + 1) * (k // parts)] = g.matrix
    return Grouping(labels, matrix, g.cost, f"{g.how}, {parts} parts alike")


def _per_sample(fused, unit, op_in, h) -> int:
    from ._solve import diagonal_rows

    x = _env(fused, h[:1], {op_in}, output=False)[op_in]
    X = diagonal_rows(fused, unit.spec, x)
    return X.shape[0] * X.shape[1] * X.shape[2]


def _solve_diagonal(i, prep, col, bspec, u, g, ops, targets, *, last: bool, axis: int, regularisation: str):
    """Solve a depthwise unit channel by channel (a grouped conv group by group) against its neurons' grouping
    ``g``; writes it."""
    from fxfuse.passes import rewrite_params

    fused = col.chains[-1][i]
    stats, K, _, _, rows = _tied_pass(i, prep, col, bspec, u, g.matrix, last=last, axis=axis)
    W, rss, t2, ridge = stats.solve(read_affine(fused, u.spec), regularisation)
    rewrite_params(prep.fused_plan.gm, affine_params(fused, u.spec, W), in_place=True)
    err = rss / max(t2, 1e-300)
    ops.append({"op": u.spec.op, "role": "sum" if last else "inner", "grouping": g.how, "error": err,
                "ridge": ridge, "rows": rows, "columns": stats.d,
                "how": "per group" if u.spec.groups != 1 else "per channel"})
    targets.append(OpTarget(bspec.pre if last else u.value, axis, g.matrix))
    return K, err, ridge, rows, stats.d


def fuse_block(i: int, prep, scores: list[Tensor], col, cfg, bspec) -> BlockResult:
    """Solve level ``i`` op by op in closed form (see the module docstring); writes the fused parameters."""
    from fxfuse.passes import attention_heads, rewrite_params

    if bspec.folds:  # LayerNorm affines and LayerScales go into the Linear units next to them first
        rewrite_params(prep.fused_plan.gm, fold_params(col.chains[-1][i], bspec.folds), in_place=True)

    from ._engine import group
    from ._grouping import kernel_inertia
    from ._methods import get_method

    method = get_method(cfg.method)
    fused = col.chains[-1][i]
    bases = [chain[i] for chain in col.chains[:-1]]
    lv = prep.fused_plan[i]
    if bspec.constants:  # values in the input's neurons (a class token, a position embedding): grouped means
        rewrite_params(prep.fused_plan.gm, grouped_constants(i, prep, col, bspec), in_place=True)
    ops: list[dict[str, Any]] = []
    targets: list[OpTarget] = []
    # neurons tied to the level input use its grouping; a space grouped once keeps its grouping
    by_space: dict[int, Any] = {}
    group_match: dict[str, list[Tensor]] = {}  # grouped conv (output node) -> its groups' match, from its input

    positional = positional_spaces(i, prep, bspec)

    def known(u):
        if u.space is None:
            return None
        if u.space not in by_space and u.space in positional:  # outputs that are positions are never grouped
            by_space[u.space] = fixed_grouping(len(bases), fused.get_submodule(u.spec.op).weight.shape[0],
                                               "positions (fixed)")
        if u.space not in by_space and u.space in bspec.input_spaces:
            width = fused.get_parameter(u.spec.op).numel() if u.spec.channel else \
                fused.get_submodule(u.spec.op).weight.shape[0]
            g = input_grouping(i, prep, col, width)
            if g is not None:
                by_space[u.space] = _tied(g, "level input")
        return by_space.get(u.space)

    widths = [p[i].width for p in prep.plans]
    s = torch.cat([sc[i] for sc in scores])
    # a tied level whose neurons are an inner unit's, not the input's (a downsampling conv read by the skip and by a
    # branch ending in a LayerScale: PoolFormer)
    inner_tied = bspec.tied and bspec.pre_space is not None and bspec.pre_space not in bspec.input_spaces
    if ((not bspec.tied or inner_tied) and bspec.pre_space is not None
            and any(u.space == bspec.pre_space for u in bspec.inner)):
        # an inner unit in the level's own neurons (the last conv of a branch gated by squeeze-excitation before
        # the sum, a downsampling conv before a residual sum): group the level first, from the base models'
        # pre-activations
        K = _base_gram(i, col, bspec)
        by_space[bspec.pre_space] = group(K, s.to(K.device), widths, lv.width, is_head=lv.is_head,
                                          strategy=method.grouping, seed=cfg.seed + i, cfg=cfg)

    def untied(what: str):
        from ._errors import FxFuseError

        return FxFuseError(f"level {i} (`{lv.name}`): the neurons of {what} are the level input's, but the input's "
                           "grouping is not known or not as wide; fuse this model with blocks='gradient'")

    # 1. inner units, in graph order
    for j, u in enumerate(bspec.inner):
        g = known(u)
        if u.spec.depthwise and g is None:
            raise untied(f"the per-channel affine `{u.spec.op}`" if u.spec.channel else
                         f"the depthwise conv `{u.spec.op}`")
        if u.spec.depthwise:
            _solve_diagonal(i, prep, col, bspec, u, g, ops, targets, last=False, axis=u.axis,
                            regularisation=cfg.regularisation)
            continue
        if u.spec.groups != 1:
            # a grouped conv: its neurons are grouped on the base models' values (every base has the unit, see
            # fxfuse._engine._block_spec), then each group is fitted from its own fused input channels
            if g is None:
                K = _value_gram(i, col, u.value, u.axis)
                widths_u = [lv.get_submodule(u.spec.op).weight.shape[0] for lv in bases]
                g, _ = group_unit(K, widths_u, fused.get_submodule(u.spec.op).weight.shape[0], u.spec.groups,
                                  group_match.get(u.output), strategy=method.grouping, seed=cfg.seed + 1000 * i + j,
                                  cfg=cfg)
                if u.space is not None:
                    by_space[u.space] = g
            _solve_diagonal(i, prep, col, bspec, u, g, ops, targets, last=False, axis=u.axis,
                            regularisation=cfg.regularisation)
            continue
        stats, rows = _unit_pass(i, prep, col, bspec, u, last=False)
        lam, V = stats.eig_for(cfg.regularisation)
        att = next((a for a in bspec.attention if a.unit == u.output), None)
        if att is not None:
            # the q, k, v of an attention: grouped within heads matched across models (every base has the unit,
            # see fxfuse._engine._block_spec)
            gram, _ = stats.grouping_gram(lam, V, ridge=cfg.regularisation == "gcv")
            g, g_v = group_attention(gram, [_head_maps(attention_heads(lv, att.node)) for lv in bases],
                                     _head_maps(att), strategy=method.grouping, seed=cfg.seed + 1000 * i + j, cfg=cfg)
        if g is None:
            gram, _ = stats.grouping_gram(lam, V, ridge=cfg.regularisation == "gcv")
            unit_widths = [bases[k].get_submodule(u.spec.op).weight.shape[0]
                           for k in bases_with(prep, i, bases, {u.output})]
            # the input of a grouped conv (read by every base) is grouped within matched groups, which the
            # conv's output then follows
            reader = next((v for v in bspec.inner if v.spec.groups != 1 and u.space is not None
                           and v.in_space == u.space), None) if len(unit_widths) == len(bases) else None
            g, match = group_unit(gram, unit_widths, fused.get_submodule(u.spec.op).weight.shape[0],
                                  reader.spec.groups if reader else 1, None, strategy=method.grouping,
                                  seed=cfg.seed + 1000 * i + j, cfg=cfg, residual=unreproduced(stats.K, gram),
                                  parts=u.parts)
            if match is not None:
                group_match[reader.output] = match
            if u.space is not None:
                by_space[u.space] = g
        W, rd = stats.solve_for(cfg.regularisation, lam, V, g.matrix.to(stats.C.device), W0=read_affine(fused, u.spec))
        rewrite_params(prep.fused_plan.gm, affine_params(fused, u.spec, W), in_place=True)
        t2 = grouped_sq_norm(g.matrix, stats.K)
        ops.append({"op": u.spec.op, "role": "inner", "grouping": g.how, "error": rd.rss / max(t2, 1e-300),
                    "ridge": rd.relative, "rows": rows, "columns": stats.d})
        shared = (u.spec.op, _op_input_name(fused, u)) if unit_is_shared(i, prep, bspec, u) else None
        targets.append(OpTarget(u.value, u.axis, g.matrix, shared))
        if att is not None:  # v again, through the fused model's own attention pattern
            _values_through_attention(i, prep, col, u, att, g_v, ops, targets, cfg.regularisation)
    if bspec.tied:
        # 2'. the level output keeps its input's neurons (a depthwise conv, a gated input): its grouping is the
        # input's, and a depthwise term is solved channel by channel against it
        if inner_tied:
            g = by_space[bspec.pre_space]
        else:
            g = input_grouping(i, prep, col, lv.width)
            if g is None:
                raise untied("its output")
            g = _tied(g, "level input")
        axis = bspec.terms[0].axis if bspec.terms else lv.neuron_axis
        if bspec.terms:
            K, err, ridge, rows, columns = _solve_diagonal(i, prep, col, bspec, bspec.terms[0], g, ops, targets, last=True,
                                                            axis=axis, regularisation=cfg.regularisation)
        else:
            _, K, sq_err, sq_t, rows = _tied_pass(i, prep, col, bspec, None, g.matrix, last=True, axis=axis)
            err, ridge, columns = sq_err / max(sq_t, 1e-300), 0.0, 0
        import dataclasses

        g = dataclasses.replace(g, cost=kernel_inertia(K, s.to(K), g.labels.to(K.device), lv.width))
        return BlockResult(g, err, ridge, rows, columns, ops, targets)
    if bspec.moves:
        # 2''. one term moved into the sum (an MLP-Mixer token MLP's fc2, transposed back onto the channels)
        return _fit_moved_term(i, prep, col, cfg, bspec, by_space, s, widths, ops, targets)
    # 2. the units of the sum, jointly, against the level's grouped pre-activations minus the fixed terms
    stats, rows = _unit_pass(i, prep, col, bspec, None, last=True)
    # the level's neurons are grouped on their pre-activations, the values the sum's units are fitted to
    # (after the activation, dead neurons would tie and pair arbitrarily)
    K = stats.K[: sum(widths), : sum(widths)]
    g = by_space.get(bspec.pre_space) if bspec.pre_space is not None else None
    if g is None:
        g = group(K, s.to(K.device), widths, lv.width, is_head=lv.is_head, strategy=method.grouping,
                  seed=cfg.seed + i, cfg=cfg)
    A = g.matrix
    if bspec.fixed:
        A = torch.cat([A, -torch.eye(lv.width, dtype=A.dtype, device=A.device)])
    W0 = torch.cat([read_affine(fused, u.spec) for u in bspec.terms])
    lam, V = stats.eig_for(cfg.regularisation)
    W, rd = stats.solve_for(cfg.regularisation, lam, V, A, W0=W0)
    params: dict[str, Tensor] = {}
    start = 0
    for u in bspec.terms:
        d = read_affine(fused, u.spec).shape[0]
        params.update(affine_params(fused, u.spec, W[start : start + d]))
        start += d
    rewrite_params(prep.fused_plan.gm, params, in_place=True)
    # relative to the level's whole pre-activation target (skip included): a zero-initialised last norm
    # (timm's zero_init_last) leaves the branch's own target at zero
    t2 = grouped_sq_norm(g.matrix, K)
    err = rd.rss / max(t2, 1e-300)
    ops.append({"op": "+".join(u.spec.op for u in bspec.terms), "role": "sum", "grouping": g.how, "error": err,
                "ridge": rd.relative, "rows": rows, "columns": stats.d})
    targets.append(OpTarget(bspec.pre, bspec.terms[0].axis, g.matrix))
    return BlockResult(g, err, rd.relative, rows, stats.d, ops, targets)


@torch.no_grad()
def _fit_moved_term(i, prep, col, cfg, bspec, by_space, s, widths, ops, targets) -> BlockResult:
    """Fit the sum's one term that reaches it through axis moves (:attr:`fxfuse.passes.BlockSpec.moves`).

    The level's neurons are grouped first: by the grouping of their space when it is known (the level input's,
    through the identity skip), else from the base models' values at the sum. The term is then fitted to the
    grouped targets minus the fixed terms (the fused skip), moved back into the term's own layout: an MLP-Mixer
    token MLP's fc2 has rows (sample, fused channel) and the tokens as columns, so the targets are never grouped
    on the term's own output axis. One pass over the data; writes the term."""
    import dataclasses

    from fxfuse.passes import move_index, rewrite_params

    from ._dist import all_reduce_, all_reduce_number
    from ._engine import _check_finite, group
    from ._grouping import kernel_inertia
    from ._methods import get_method
    from ._solve import from_rows

    fused = col.chains[-1][i]
    bases = [chain[i] for chain in col.chains[:-1]]
    lv = prep.fused_plan[i]
    u = bspec.terms[0]
    axis = lv.neuron_axis % max(len(bspec.pre_axes), 1)
    space = bspec.pre_axes[axis] if bspec.pre_axes else None
    g = by_space.get(space) if space is not None else None
    if g is None and space is not None and space == input_neuron_space(i, prep, bspec):
        g0 = input_grouping(i, prep, col, lv.width)
        g = _tied(g0, "level input") if g0 is not None else None
    tied = g is not None
    if g is None:
        K = _value_gram(i, col, bspec.pre, axis)
        g = group(K, s.to(K.device), widths, lv.width, is_head=lv.is_head, strategy=get_method(cfg.method).grouping,
                  seed=cfg.seed + i, cfg=cfg)
    nodes = {n.name: n for n in fused.graph.nodes}
    unit_shape = nodes[u.output].meta["fxfuse"]["shape"]
    sum_shape = nodes[bspec.pre.split(":")[0]].meta["fxfuse"]["shape"]
    back = torch.argsort(move_index(fused, u.output, bspec.moves))  # the sum's elements back in the term's layout
    op_in = _op_input_name(fused, u)
    A = g.matrix.to(torch.float64)
    stats = GramStats()
    K = None
    t2 = 0.0
    for b, ins, _ in col.inputs(i):
        outs: list[list[Tensor]] = [[] for _ in bases]
        h = ins[-1]
        per_sample = design_rows(fused, u.spec, _env(fused, h[:1], {op_in}, output=False)[op_in]).numel()
        for sl in _chunks(h, per_sample):
            envs_b = [_env(lv_b, x[sl], {bspec.pre}) for lv_b, x in zip(bases, ins)]
            env_f = _env(fused, h[sl], {op_in} | set(bspec.fixed), output=False)
            Z = torch.cat([to_rows(e[bspec.pre], axis) for e in envs_b], 1).to(torch.float64)
            K = Z.T @ Z if K is None else K.addmm_(Z.T, Z)
            A = A.to(Z.device)
            T = Z @ A
            t2 += float((T * T).sum())
            if bspec.fixed:
                T = T - to_rows(sum(env_f[f] for f in bspec.fixed), axis).to(torch.float64)
            m = h[sl].shape[0]
            T = from_rows(T, sum_shape, axis).reshape(m, -1)[:, back.to(T.device)].reshape(m, *unit_shape[1:])
            stats.add(design_rows(fused, u.spec, env_f[op_in]), to_rows(T, u.axis))
            for k, e in enumerate(envs_b):
                _check_finite(e["__output__"], f"level {i} (`{prep.plans[k][i].name}`) of models[{k}]")
                outs[k].append(e["__output__"])
        for k, parts in enumerate(outs):
            col.store(k, i, b, torch.cat(parts))
    stats.reduce()  # its rows are then all ranks' rows
    all_reduce_(K)
    t2 = all_reduce_number(t2)
    rows = stats.rows
    lam, V = stats.eig_for(cfg.regularisation)
    n_out = stats.C.shape[1]
    W, rd = stats.solve_for(cfg.regularisation, lam, V, torch.eye(n_out, dtype=torch.float64, device=stats.C.device),
                            W0=read_affine(fused, u.spec))
    rewrite_params(prep.fused_plan.gm, affine_params(fused, u.spec, W), in_place=True)
    err = rd.rss / max(t2, 1e-300)  # relative to the level's whole target, skip included
    ops.append({"op": u.spec.op, "role": "sum", "grouping": g.how, "error": err, "ridge": rd.relative, "rows": rows,
                "columns": stats.d, "how": "through axis moves"})
    targets.append(OpTarget(bspec.pre, axis, g.matrix))
    if tied:
        g = dataclasses.replace(g, cost=kernel_inertia(K, s.to(K), g.labels.to(K.device), lv.width))
    return BlockResult(g, err, rd.relative, rows, stats.d, ops, targets)


@torch.no_grad()
def held_out_errors(i: int, prep, hcol, targets: list[OpTarget]) -> list[float | None]:
    """Relative errors ‖f − Z A‖² / ‖Z A‖² of the solved level ``i`` on the held-out samples (``held_out``): for each
    :class:`OpTarget` in ``targets``, the fused model's value against the base models' values grouped by A
    (``"__output__"``: the level output). None where a base model lacks the value (an inserted identity level).
    Also stores the held-out level outputs for the next level."""
    from ._dist import all_reduce_

    bases = [chain[i] for chain in hcol.chains[:-1]]
    fused = hcol.chains[-1][i]
    names = {v for v, _, _, sh in targets if v != "__output__"} | {sh[1] for *_, sh in targets if sh is not None}
    sums = torch.zeros(len(targets), 2, dtype=torch.float64)
    missing = torch.zeros(len(targets), dtype=torch.float64)
    for b, ins, _ in hcol.inputs(i):
        envs = [_env(lv, x, names) for lv, x in zip(bases, ins[:-1])]
        env_f = _env(fused, ins[-1], names)
        for k, e in enumerate(envs):
            hcol.store(k, i, b, e["__output__"])
        hcol.store(len(bases), i, b, env_f["__output__"])
        for t, (value, axis, A, shared) in enumerate(targets):
            if value not in env_f or not all(value in e for e in envs):
                missing[t] = 1.0
                continue
            if shared is not None:
                Z = torch.cat([to_rows(lv.get_submodule(shared[0])(env_f[shared[1]]), axis) for lv in bases], 1)
            else:
                Z = torch.cat([to_rows(e[value], axis) for e in envs], 1)
            Z = Z.to(torch.float64)
            T = Z @ A.to(Z)
            diff = to_rows(env_f[value], axis).to(torch.float64) - T
            sums[t, 0] += float((diff * diff).sum())
            sums[t, 1] += float((T * T).sum())
    all_reduce_(sums)
    all_reduce_(missing)
    return [None if missing[t] > 0 else float(sums[t, 0] / sums[t, 1].clamp_min(1e-300)) for t in range(len(targets))]
