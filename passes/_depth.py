"""Models of different depth: cross-layer alignment (CLA) of their levels, and exact identity levels.

Reference: "On Cross-Layer Alignment for Model Fusion of Heterogeneous Neural
Networks" (CLAFusion), section 3.1 (the CLA problem, linear CKA, Algorithm 1) and
section 3.2 (balancing depth by adding identity layers).

:func:`align_depth` is an analysis pass: from the models' level plans and their
level outputs on the same samples it returns a frozen :class:`DepthAlignment`.
:func:`insert_identity` is a rewriting pass: it returns a new GraphModule with
identity levels inserted, checked numerically.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxfuse._errors import AlignmentError

from ._partition import Level, LevelPlan, partition_levels

__all__ = ["DepthAlignment", "align_depth", "cla_dp", "insert_identity", "linear_cka", "merge_levels", "pinned_levels"]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centred kernel alignment (CKA) of two representations of the same samples (CLAFusion, Eq. 2).

    Each sample is flattened and the features are centred over the samples (the
    paper's H_p written on the feature side is a typo: CKA centres over samples).
    Computed from the t×t Gram matrices, so the cost is O(t²·d).

    Args:
        x: Tensor of shape (n_samples, ...): model A's level output.
        y: Tensor of shape (n_samples, ...): model B's level output on the same samples.

    Returns:
        CKA in [0, 1]; 1 for representations equal up to an orthogonal map and a scale.

    Example:
        >>> import torch
        >>> from fxfuse.passes import linear_cka
        >>> x = torch.randn(50, 8, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
        >>> round(linear_cka(x, 3 * x @ q), 6)
        1.0
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x has {x.shape[0]} samples and y {y.shape[0]}; pass the same samples")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 samples")
    k = _centred_gram(x)
    l_ = _centred_gram(y)
    den = float(k.norm() * l_.norm())
    return float((k * l_).sum()) / den if den > 0 else 0.0


def _centred_gram(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def cla_dp(cost: Tensor, *, pin_first: bool = True, pin_last: bool = True) -> tuple[list[int], float]:
    """The optimal strictly increasing map of a shallower model's layers onto a deeper one's (CLAFusion, Algorithm 1).

    With S(j, i) the least cost of mapping the first j+1 layers of B into the first
    i+1 layers of A, S(j, i) = min(S(j, i−1), S(j−1, i−1) + C[j, i]) (the paper's
    C_{i,i} in the recursion means C_{j,i}). O(n·m) time; exact.

    Args:
        cost: Tensor of shape (n, m), n ≤ m: cost[j, i] of matching layer j of the
            shallower model B to layer i of the deeper model A.
        pin_first: Force layer 0 of B onto layer 0 of A.
        pin_last: Force the last layer of B onto the last layer of A.

    Returns:
        ``(a, total)``: a[j] is the layer of A matched to layer j of B, and the total cost.

    Example:
        >>> import torch
        >>> from fxfuse.passes import cla_dp
        >>> cla_dp(torch.tensor([[0., 5, 5, 5], [5, 5, 0, 5], [5, 5, 5, 0]]))
        ([0, 2, 3], 0.0)
    """
    c = torch.as_tensor(cost, dtype=torch.float64).cpu()
    if c.ndim != 2:
        raise ValueError(f"cla_dp: cost must be a matrix (n, m), got shape {tuple(c.shape)}")
    n, m = c.shape
    if n > m:
        raise ValueError(f"cla_dp: the first model has {n} layers and the second {m}; rows are the shallower model, "
                         "pass cost.T")
    if n == 0:
        return [], 0.0
    if n == 1 and pin_first and pin_last and m > 1:
        raise ValueError("cla_dp: one layer cannot be pinned to both the first and the last of several layers")
    inf = float("inf")
    # S[j][i]: best cost of B[0..j] placed in A[0..i] (a(j) <= i); choice[j][i]: whether a(j) == i
    S = [[inf] * m for _ in range(n)]
    take = [[False] * m for _ in range(n)]
    for j in range(n):
        for i in range(j, m):
            if j == 0:
                here = float(c[0, i]) if (not pin_first or i == 0) else inf
            else:
                here = S[j - 1][i - 1] + float(c[j, i])
            if pin_last and j == n - 1 and i != m - 1:
                here = inf
            skip = S[j][i - 1] if i > j else inf
            if here <= skip:
                S[j][i], take[j][i] = here, True
            else:
                S[j][i] = skip
    a = [0] * n
    i = m - 1
    for j in range(n - 1, -1, -1):
        while not take[j][i]:
            i -= 1
        a[j] = i
        i -= 1
    return a, S[n - 1][m - 1]


def _in_shape(plan: LevelPlan, lv: Level) -> tuple[int, ...] | None:
    node = next(n for n in plan.gm.graph.nodes if n.name == lv.input)
    shape = node.meta.get("fxfuse", {}).get("shape")
    return None if shape is None else tuple(shape[1:])


def pinned_levels(plan: LevelPlan) -> list[int]:
    """Levels that cannot be aligned freely: the first, the head, and every level whose output shape differs
    from its input shape (stems, downsampling blocks, patch embeddings, width changes).

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes import partition_levels, pinned_levels
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
        ...                         torch.nn.Linear(8, 3))
        >>> pinned_levels(partition_levels(fxfuse.trace(m, torch.randn(2, 4))))
        [0, 2]
    """
    out = []
    for lv in plan:
        if lv.index == 0 or lv.is_head or _in_shape(plan, lv) != tuple(lv.output_shape[1:]):
            out.append(lv.index)
    return out


def _signature(plan: LevelPlan, lv: Level) -> tuple[str, ...]:
    """The ops of a level, in order: module classes and function names (ViT attention and MLP halves differ)."""
    by_name = {n.name: n for n in plan.gm.graph.nodes}
    sig = []
    for name in lv.nodes:
        n = by_name[name]
        if n.op == "call_module":
            sig.append(type(plan.gm.get_submodule(str(n.target))).__name__)
        elif n.op in ("call_function", "call_method"):
            sig.append(str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target)))
    return tuple(sig)


def _period(sigs: list[tuple[str, ...]]) -> int:
    """The smallest p for which the level signatures repeat every p levels (the last unit may be partial);
    1 when they do not repeat."""
    n = len(sigs)
    for p in range(1, n):
        if all(sigs[i] == sigs[i % p] for i in range(n)):
            return p
    return 1


@dataclass(frozen=True)
class DepthAlignment:
    """How the levels of models of different depth correspond (CLAFusion's cross-layer alignment).

    Attributes:
        target: Index of the model the others are aligned to (the deepest, by default).
        depths: Level count of every model.
        mapping: Per model, per level: the target level it is matched to
            (``range(depth)`` for the target itself).
        insertions: Per model: ``(after, template)`` pairs, one per identity level
            to insert after its level ``after`` (in the model's own numbering);
            ``template`` is a level of the same model to copy (-1: the nearest of
            the right shape). Pass them to :func:`insert_identity`.
        pinned: Target levels that are pinned (first, head, shape changes).
        costs: Per model, Tensor of shape (depth, target depth): 1 − linear CKA of
            the level outputs (None for the target).
        units: Per segment between pins, the number of levels aligned as one unit
            (2 for ViT attention + MLP halves).
    """

    target: int
    depths: tuple[int, ...]
    mapping: tuple[tuple[int, ...], ...]
    insertions: tuple[tuple[tuple[int, int], ...], ...]
    pinned: tuple[int, ...]
    costs: tuple[Tensor | None, ...]
    units: tuple[int, ...]

    def inserted_levels(self, k: int) -> list[int]:
        """The levels of model ``k`` after insertion that are identities (the target's numbering)."""
        matched = set(self.mapping[k])
        return [i for i in range(self.depths[self.target]) if i not in matched]

    def table(self, names: Sequence[str] | None = None, plans: Sequence[LevelPlan] | None = None) -> str:
        """A side-by-side text table: one row per target level, the matched level of each model (with its
        1 − CKA to the target level), or ``+ identity`` where the model gets one; level names when ``plans``
        are given."""
        names = list(names) if names is not None else [f"models[{k}]" for k in range(len(self.depths))]
        inverse = [{t: j for j, t in enumerate(mp)} for mp in self.mapping]

        def label(k: int, j: int) -> str:
            return f"{j} {plans[k][j].name}" if plans is not None else str(j)

        rows = [["level", *names, "pinned"]]
        for i in range(self.depths[self.target]):
            cells = [str(i)]
            for k in range(len(self.depths)):
                j = inverse[k].get(i)
                c = self.costs[k]
                cells.append("+ identity" if j is None else label(k, j) + ("" if c is None else f" (1-CKA {float(c[j, i]):.2f})"))
            cells.append("pin" if i in self.pinned else "")
            rows.append(cells)
        w = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(x.ljust(v) for x, v in zip(r, w)).rstrip() for r in rows)


def align_depth(plans: Sequence[LevelPlan], activations: Sequence[Sequence[Tensor]] | None, *,
                target: int | None = None, cost: str = "cka") -> DepthAlignment:
    """Align the levels of models of different depth by cross-layer alignment (CLAFusion, section 3.1).

    Rules:

    * levels whose output shape differs from their input shape (stem, downsampling
      blocks, patch embedding), the first level and the head are *pinned*: they are
      matched in order, and every model must have the same number of them;
    * between two pins, the levels of each model are matched to the target's by the
      dynamic program :func:`cla_dp` on 1 − linear CKA of the level outputs; levels
      whose signatures alternate (ViT attention and MLP halves) are aligned as units;
    * every model aligns to the target (the deepest by default); target levels left
      unmatched get an identity level in that model.

    Args:
        plans: Level plans of the models.
        activations: Per model, per level: Tensor of shape (n_samples, ...), the level
            output on the same samples for every model (or a linear sketch of it).
        target: Index of the model to align to; default: the deepest (the first of them).
        cost: ``"cka"`` (1 − linear CKA, CLAFusion) or ``"uniform"``: a naive baseline that
            spreads each model's levels evenly over the target's between two pins
            (``activations`` may then be None).

    Returns:
        The frozen alignment.

    Raises:
        AlignmentError: pin counts differ (the message names the pinned levels), or a
            model is deeper than the target between two pins.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes import align_depth, partition_levels
        >>> def mlp(depth):
        ...     layers = [torch.nn.Linear(4, 8)] + [torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 8))
        ...                                          for _ in range(depth)]
        ...     return torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(32, 4)
        >>> models = [mlp(3), mlp(1)]
        >>> plans = [partition_levels(fxfuse.trace(m, x)) for m in models]
        >>> from fxfuse.passes._depth import level_outputs
        >>> al = align_depth(plans, [level_outputs(p, x) for p in plans])
        >>> al.depths, len(al.insertions[1])
        ((5, 3), 2)
    """
    plans = list(plans)
    if cost not in ("cka", "uniform"):
        raise ValueError(f"align_depth: cost must be 'cka' or 'uniform', got {cost!r}")
    if activations is None:
        if cost == "cka":
            raise ValueError("align_depth: cost='cka' compares level outputs: pass activations")
        activations = [[torch.zeros(2, 1) for _ in p] for p in plans]
    if len(plans) != len(activations):
        raise ValueError(f"align_depth: {len(plans)} plans but activations for {len(activations)} models")
    for k, (p, acts) in enumerate(zip(plans, activations)):
        if len(acts) != len(p):
            raise ValueError(f"align_depth: models[{k}] has {len(p)} levels but {len(acts)} activations")
    depths = tuple(len(p) for p in plans)
    if target is None:
        target = max(range(len(plans)), key=lambda k: (depths[k], -k))
    if not 0 <= target < len(plans):
        raise ValueError(f"align_depth: target={target} is not a model index (0..{len(plans) - 1})")
    tp = plans[target]
    t_pins = pinned_levels(tp)
    t_sigs = [_signature(tp, lv) for lv in tp]
    mapping, insertions, costs, units = [], [], [], []
    for k, p in enumerate(plans):
        if k == target:
            mapping.append(tuple(range(len(p))))
            insertions.append(())
            costs.append(None)
            continue
        pins = pinned_levels(p)
        if len(pins) != len(t_pins):
            show = lambda plan, ix: ", ".join(f"{i} `{plan[i].name}`" for i in ix)  # noqa: E731
            raise AlignmentError(
                f"models[{k}] has {len(pins)} pinned levels (first, head and shape-changing: {show(p, pins)}) but the "
                f"target models[{target}] has {len(t_pins)} ({show(tp, t_pins)}); depth alignment matches pinned "
                "levels in order, so the models must have the same stages (stem, downsampling blocks, head)"
            )
        n_s = min(a.shape[0] for a in list(activations[k]) + list(activations[target]))
        cka = torch.zeros(len(p), len(tp), dtype=torch.float64)
        if cost == "cka":
            for j in range(len(p)):
                for i in range(len(tp)):
                    cka[j, i] = 1.0 - linear_cka(activations[k][j][:n_s], activations[target][i][:n_s])
        costs.append(cka if cost == "cka" else None)
        sigs = [_signature(p, lv) for lv in p]
        mp: dict[int, int] = dict(zip(pins, t_pins))
        ins: list[tuple[int, int]] = []
        for s in range(len(pins) - 1):
            a_seg = list(range(t_pins[s] + 1, t_pins[s + 1]))
            b_seg = list(range(pins[s] + 1, pins[s + 1]))
            if len(b_seg) > len(a_seg):
                raise AlignmentError(
                    f"models[{k}] has {len(b_seg)} levels between `{p[pins[s]].name}` and `{p[pins[s + 1]].name}` but "
                    f"the target models[{target}] only {len(a_seg)}; the target must be at least as deep in every "
                    "stage: pass the deeper model as target= (or put it first)"
                )
            # levels of alternating kinds (ViT attention and MLP halves) are aligned in units of one period,
            # so an identity attention half always comes with an identity MLP half
            per = _period([t_sigs[i] for i in a_seg])
            if per > 1 and ((len(a_seg) - len(b_seg)) % per
                            or any(sigs[j] != t_sigs[a_seg[o % per]] for o, j in enumerate(b_seg))):
                per = 1
            units.append(per)
            tail = len(a_seg) % per  # a last, partial unit: matched level to level
            for o in range(tail):
                mp[b_seg[len(b_seg) - tail + o]] = a_seg[len(a_seg) - tail + o]
            a_seg, b_seg = a_seg[: len(a_seg) - tail], b_seg[: len(b_seg) - tail]
            na, nb = len(a_seg) // per, len(b_seg) // per
            uc = torch.zeros(nb, na, dtype=torch.float64)
            for v in range(nb):
                for u in range(na):
                    if cost == "uniform":  # even spread: unit v of nb sits where unit u of na does
                        uc[v, u] = ((v + 0.5) / nb - (u + 0.5) / na) ** 2
                    else:
                        uc[v, u] = sum(cka[b_seg[v * per + o], a_seg[u * per + o]] for o in range(per)) / per
            a, _ = cla_dp(uc, pin_first=False, pin_last=False)
            for v, u in enumerate(a):
                for o in range(per):
                    mp[b_seg[v * per + o]] = a_seg[u * per + o]
            matched = dict(zip(a, range(nb)))
            prev = pins[s]
            for u in range(na):
                if u in matched:
                    prev = b_seg[matched[u] * per + per - 1]
                    continue
                for o in range(per):
                    want = t_sigs[a_seg[u * per + o]]
                    tmpl = next((j for j in b_seg if sigs[j] == want), -1)
                    ins.append((prev, tmpl))
        mapping.append(tuple(mp[j] for j in range(len(p))))
        insertions.append(tuple(ins))
    return DepthAlignment(target, depths, tuple(mapping), tuple(insertions), tuple(t_pins), tuple(costs), tuple(units))


def level_outputs(plan: LevelPlan, x: Tensor) -> list[Tensor]:
    """Every level's output on ``x``: a list of Tensors of shape (n_samples, ...) (small inputs only)."""
    outs, h = [], x
    with torch.no_grad():
        for lv in plan.split():
            h = lv(h)
            outs.append(h)
    return outs


# --- insert_identity ---------------------------------------------------------------------


def _same_shape_levels(plan: LevelPlan, shape: tuple[int, ...]) -> list[int]:
    return [lv.index for lv in plan if not lv.is_head and lv.index > 0
            and tuple(lv.output_shape[1:]) == shape and _in_shape(plan, lv) == shape]


def _pass_through(gm: GraphModule, lv: Level, name: str) -> nn.Module:
    """An identity weighted op on the neuron axis with no activation in front: exact for any activation."""
    w = lv.width
    ndim = len(lv.output_shape)
    if lv.neuron_axis == ndim - 1:
        op: nn.Module = nn.Linear(w, w, bias=False)
        nn.init.eye_(op.weight)
    elif lv.neuron_axis == 1 and ndim in (3, 4, 5):
        op = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[ndim](w, w, 1, bias=False)
        with torch.no_grad():
            op.weight.zero_()
            op.weight.view(w, w)[range(w), range(w)] = 1.0
    else:
        raise AlignmentError(f"level {lv.index} (`{lv.name}`): no identity op for neurons on dim {lv.neuron_axis} "
                             f"of a {ndim}-d output")
    p = next(iter(gm.parameters()), None)
    if p is not None:
        op = op.to(p.device, p.dtype)
    gm.add_submodule(name, op)
    return op


def _identity_affine(gm: GraphModule, copies: list[Node]) -> bool:
    """Set the copied affine level's weighted op to the identity (delta kernel / identity matrix) and its
    BatchNorm to the identity; False when the op cannot be an identity (other in/out widths, strides)."""
    done = False
    with torch.no_grad():
        for n in copies:
            if n.op != "call_module":
                continue
            m = gm.get_submodule(str(n.target))
            if isinstance(m, nn.Linear):
                if m.in_features != m.out_features:
                    return False
                nn.init.eye_(m.weight)
                done = True
            elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
                cin_g = m.in_channels // m.groups
                if m.in_channels != m.out_channels or any(s != 1 for s in m.stride):
                    return False
                m.weight.zero_()
                centre = tuple(k // 2 for k in m.kernel_size)
                for c in range(m.out_channels):
                    m.weight[(c, c % cin_g, *centre)] = 1.0
                done = True
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_var is None or m.weight is None or m.bias is None:
                    return False
                m.weight.copy_((m.running_var + m.eps).sqrt())
                m.bias.copy_(m.running_mean)
                continue
            else:
                continue
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return done


def _silence_branch(gm: GraphModule, copies: list[Node], inp: Node) -> bool:
    """Zero the last scale of the residual branch that makes the copied level's output sum (the last
    BatchNorm's γ and β, a LayerScale γ, or the last Linear/Conv); False when there is no such branch."""
    out = copies[-1]
    is_add = (out.op == "call_function" and getattr(out.target, "__name__", "") in ("add", "iadd")) or (
        out.op == "call_method" and out.target == "add")
    if not is_add:
        return False
    dep = {inp}
    for n in copies:
        if any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    hits = []
    for arg in out.args[:2]:
        node, hit = arg, None
        while isinstance(node, Node) and node is not inp:
            if node.op == "call_module" and any(True for _ in gm.get_submodule(str(node.target)).parameters()):
                hit = [node]
                break
            roots = [r for a in node.all_input_nodes if a not in dep for r in [_attr_root(a)] if r is not None]
            if roots:
                hit = roots
                break
            deps = [a for a in node.all_input_nodes if a in dep]
            if len(deps) != 1:
                break
            node = deps[0]
        if hit is not None:
            hits.append(hit)
    if len(hits) != 1:
        return False
    with torch.no_grad():
        for n in hits[0]:
            if n.op == "call_module":
                for t in gm.get_submodule(str(n.target)).parameters():
                    t.zero_()
            else:
                _get_attr(gm, str(n.target)).zero_()
    return True


def _attr_root(n: Node) -> Node | None:
    """The get_attr node a parameter-derived value comes from (``gamma.reshape(...)`` → ``gamma``), or None."""
    while n.op != "get_attr":
        ins = n.all_input_nodes
        if len(ins) != 1:
            return None
        n = ins[0]
    return n


def _copy_level(gm: GraphModule, orig: GraphModule, tq: Level, src: Node, tag: str, attrs: list[str]) -> list[Node]:
    """Copy the nodes of level ``tq`` of the unmodified ``orig`` into ``gm`` after ``src`` (which replaces the
    level's input), with copies of its modules and parameters under ``tag``. Returns the new nodes in order
    (the last is the level output's copy)."""
    graph = gm.graph
    by_name = {n.name: n for n in orig.graph.nodes}
    env: dict[Node, Node] = {by_name[tq.input]: src}
    members = [by_name[n] for n in tq.nodes]
    new: list[Node] = []
    cursor = src

    def get(a: Node) -> Node:
        nonlocal cursor
        if a in env:
            return env[a]
        # an input-independent node (a parameter and ops on it) from outside the level: copy it too
        for b in a.all_input_nodes:
            get(b)
        with graph.inserting_after(cursor):
            c = graph.node_copy(a, lambda b: env[b])
        if a.op == "get_attr":
            t = _get_attr(orig, str(a.target))
            name = f"{tag}_{str(a.target).replace('.', '_')}"
            val = t.detach().clone()
            if isinstance(t, nn.Parameter):
                gm.register_parameter(name, nn.Parameter(val, requires_grad=t.requires_grad))
            else:
                gm.register_buffer(name, val)
            attrs.append(name)
            c.target = name
        env[a] = c
        new.append(c)
        cursor = c
        return c

    for n in members:
        for a in n.all_input_nodes:
            get(a)
        with graph.inserting_after(cursor):
            c = graph.node_copy(n, lambda b: env[b])
        if n.op == "call_module":
            name = f"{tag}.{str(n.target).replace('.', '_')}"
            gm.add_submodule(name, copy.deepcopy(orig.get_submodule(str(n.target))))
            c.target = name
        env[n] = c
        new.append(c)
        cursor = c
    out = env[by_name[tq.output]]
    new.remove(out)
    new.append(out)  # the level output last
    return new


def _get_attr(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _build(gm: GraphModule, plan: LevelPlan, inserts: list[tuple[int, int, str]]) -> tuple[GraphModule, list[dict]]:
    """A copy of ``gm`` with the insertions ``(after, template level, mode)``, records in the same order. Mode
    ``"template"`` copies the template level and makes it an identity (falling back to a pass-through when it
    cannot be one); ``"pass-through"`` inserts an identity op with no activation in front."""
    new = copy.deepcopy(gm)
    by_name = {n.name: n for n in new.graph.nodes}
    records: list[dict] = [{} for _ in inserts]
    for after in sorted({a for a, _, _ in inserts}):
        z = by_name[plan[after].output]
        users = list(z.users)
        cur = z
        for k, idx in enumerate(i for i, x in enumerate(inserts) if x[0] == after):
            _, tmpl, mode = inserts[idx]
            tag = f"fxfuse_identity_{after}_{k}"
            if mode == "template" and tmpl >= 0:
                tq = plan[tmpl]
                attrs: list[str] = []
                nodes = _copy_level(new, gm, tq, cur, tag, attrs)
                ok = _identity_affine(new, nodes) if tq.kind == "affine" else _silence_branch(new, nodes, cur)
                if ok:
                    records[idx] = {"after": after, "kind": "affine" if tq.kind == "affine" else "block",
                                    "template": tq.name, "module": tag}
                    cur = nodes[-1]
                    continue
                for n in reversed(nodes):
                    new.graph.erase_node(n)
                if hasattr(new, tag):
                    new.delete_submodule(tag)
                for a in attrs:
                    delattr(new, a)
            _pass_through(new, plan[after], tag)
            with new.graph.inserting_after(cur):
                cur = new.graph.call_module(tag, (cur,))
            records[idx] = {"after": after, "kind": "pass-through", "template": None, "module": tag}
        for u in users:
            u.replace_input_with(z, cur)
    new.graph.lint()
    new.recompile()
    return new, records


def _example(gm: GraphModule) -> Tensor:
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    shape = ph.meta.get("fxfuse", {}).get("shape")
    if shape is None:
        raise ValueError("insert_identity: the GraphModule has no recorded input shape; pass example=")
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


# identity parameters are exact up to one rounding in the model's dtype (an identity BatchNorm's γ = √(var+ε))
EXACT_RTOL = 1e-6


def _exact(a: GraphModule, b: GraphModule, x: Tensor) -> bool:
    """Whether ``b`` computes what ``a`` does, in float64, to :data:`EXACT_RTOL` of the output's scale."""
    a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    with torch.no_grad():
        ya, yb = a64(x.double()), b64(x.double())
    scale = float(ya.abs().max()) or 1.0
    return bool((ya - yb).abs().max() <= EXACT_RTOL * scale)


def insert_identity(gm: GraphModule, plan: LevelPlan, positions: Sequence[int | tuple[int, int]], *,
                    example: Tensor | None = None) -> tuple[GraphModule, LevelPlan]:
    """A new GraphModule with identity levels inserted after the given levels (CLAFusion, section 3.2).

    Each identity level is, in order of preference:

    * a copy of a level of the same model with the same input and output shape (a
      ``template``; by default the nearest), made an identity: an affine level gets a
      delta kernel / identity matrix and an identity BatchNorm (exact because the
      activation in front of it and the one after compose to itself, ReLU∘ReLU =
      ReLU); a residual block (BasicBlock, Bottleneck, ConvNeXt, ViT half-block) keeps
      all its weights but the *last* scale of its branch (the last BatchNorm's γ and
      β, a LayerScale γ or the last Linear), which is zeroed, so it can still train;
    * otherwise a *pass-through*: an identity Linear / 1×1 conv on the neuron axis
      with no activation in front (GELU, SiLU and hard-swish are not idempotent, so
      a copied affine level in front of them would not be exact).

    Every insertion is checked: the new model's output must equal the old one's in
    float64 on ``example`` (to 1e-6 of the output's scale: identity BatchNorm parameters are rounded
    once in the model's dtype); a template that fails falls back to a
    pass-through. ``new.meta["fxfuse"]["inserted"]`` lists what was inserted, and
    ``node.meta`` of the new nodes is refreshed by shape propagation.

    Args:
        gm: A traced model (never modified).
        plan: Its level plan.
        positions: Level indices after which to insert one identity level each
            (repeat an index for several), or ``(after, template)`` pairs (template
            -1: the nearest level of the right shape), as in
            :attr:`DepthAlignment.insertions`.
        example: An input for shape propagation and the check (default: a random
            input of the traced shape).

    Returns:
        ``(new_gm, new_plan)``.

    Raises:
        ValueError: a position outside ``0 .. len(plan) - 2`` (nothing goes after the head).
        AlignmentError: the model is not reproduced (a bug: please report it).

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes import insert_identity, partition_levels
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
        ...                         torch.nn.Linear(8, 3))
        >>> x = torch.randn(5, 4)
        >>> gm = fxfuse.trace(m, x)
        >>> new, plan = insert_identity(gm, partition_levels(gm), [1])
        >>> len(plan), torch.allclose(new(x), m(x)), new.meta["fxfuse"]["inserted"][0]["kind"]
        (4, True, 'affine')
    """
    from fxfuse._trace import _ShapeProp

    items = []
    for p in positions:
        after, tmpl = (p, -1) if isinstance(p, int) else (int(p[0]), int(p[1]))
        if not 0 <= after < len(plan) - 1:
            raise ValueError(f"insert_identity: position {after} is not a level after which a level can go "
                             f"(0..{len(plan) - 2}; nothing goes after the head)")
        if tmpl < 0:
            shape = tuple(plan[after].output_shape[1:])
            cands = _same_shape_levels(plan, shape)
            tmpl = min(cands, key=lambda q: (abs(q - after - 0.5), q)) if cands else -1
        items.append((after, tmpl))
    x = _example(gm) if example is None else example
    accepted: list[tuple[int, int, str]] = []
    for after, tmpl in items:
        trial = [*accepted, (after, tmpl, "template")]
        if tmpl >= 0:
            cand, recs = _build(gm, plan, trial)
            if recs[-1]["kind"] != "pass-through" and _exact(gm, cand, x):
                accepted = trial
                continue
        accepted.append((after, tmpl, "pass-through"))
    new, records = _build(gm, plan, accepted)
    new.eval()
    p0 = next(iter(gm.parameters()), None)
    with torch.no_grad():
        _ShapeProp(new).propagate(x if p0 is None else x.to(p0.device, p0.dtype))
    if not _exact(gm, new, x):
        raise AlignmentError("insert_identity: the model with identity levels does not reproduce the original "
                             f"(insertions {records}); this is a bug in fxfuse, please report it")
    new.meta["fxfuse"] = {**gm.meta.get("fxfuse", {}), "inserted": records}
    return new, partition_levels(new)


def merge_levels(plan: LevelPlan, ends: Sequence[int]) -> LevelPlan:
    """A plan of the same GraphModule whose level ``j`` runs from after level ``ends[j-1]`` to the end of level
    ``ends[j]``: a deeper model's levels merged so that it has one level per level of a shallower architecture.

    Args:
        plan: The deeper model's plan.
        ends: Strictly increasing level indices; the last must be the head.

    Returns:
        A new :class:`LevelPlan` over ``plan.gm`` (nothing is rewritten).

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes import partition_levels
        >>> from fxfuse.passes._depth import merge_levels
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
        ...                         torch.nn.Linear(8, 3))
        >>> plan = partition_levels(fxfuse.trace(m, torch.randn(2, 4)))
        >>> [lv.name for lv in merge_levels(plan, [1, 2])]
        ['0+2', '4']
    """
    ends = [int(e) for e in ends]
    if not ends or ends[-1] != len(plan) - 1 or any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] < 0:
        raise ValueError(f"merge_levels: ends must rise strictly and end at the head ({len(plan) - 1}), got {ends}")
    levels, start = [], 0
    for j, end in enumerate(ends):
        parts = plan.levels[start : end + 1]
        last = parts[-1]
        levels.append(Level(
            index=j,
            name="+".join(lv.name for lv in parts),
            kind=last.kind if len(parts) == 1 else "general",
            nodes=tuple(n for lv in parts for n in lv.nodes),
            input=parts[0].input,
            output=last.output,
            neuron_axis=last.neuron_axis,
            width=last.width,
            output_shape=last.output_shape,
            params=tuple(p for lv in parts for p in lv.params),
            is_head=last.is_head,
        ))
        start = end + 1
    return LevelPlan(plan.gm, tuple(levels), plan.input)
