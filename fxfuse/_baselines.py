"""Baselines that every fusion paper compares against, as GraphModules.

- ``vanilla``: plain parameter averaging, optionally with BatchNorm statistics
  recomputed on the fusion data (a REPAIR-style reset).
- ``ensemble``: one GraphModule that averages the models' logits.
- ``git-rebasin``: align ``models[1:]`` to ``models[0]`` neuron space by neuron space
  with activation matching (Hungarian on the squared L2 distance of the space's
  activations, importance-weighted as in HF), then average, each neuron's
  parameters weighted by its importance score ("Model Fusion via Neuron
  Interpolation", appendix C).
- ``otfusion``: activation-based optimal transport per neuron space (Singh and
  Jaggi, 2020), exact (network simplex), with the importance scores as the
  marginals; models of other widths are transported onto ``models[0]``'s.
- ``last-layer-kd``: ``models[0]`` with only its head retrained to match the mean
  softmax of all models (paper, section 5).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter

from ._errors import AlignmentError
from ._grouping import hungarian_pairs, pair_costs
from ._trace import trace

__all__ = [
    "SpaceAlignment", "align", "average", "ensemble", "otfusion", "last_layer_kd", "reset_batchnorm", "space_scores",
]


@dataclass(frozen=True, eq=False)
class SpaceAlignment:
    """Models aligned to ``models[0]`` neuron space by neuron space (see :func:`align`).

    Attributes:
        models: ``[models[0], aligned models[1], ...]``; every model keeps its function.
        spaces: The neuron spaces of ``models[0]`` (and, index for index, of the others).
        scores: Per model, free space index -> importance score of each neuron,
            Tensor of shape (space.size,), in the aligned order.
    """

    models: list[GraphModule]
    spaces: object  # fxfuse.passes.NeuronSpaces
    scores: list[dict[int, Tensor]]


def average(
    gms: Sequence[GraphModule], spaces=None, scores: Sequence[dict[int, Tensor]] | None = None
) -> GraphModule:
    """A copy of ``gms[0]`` whose floating parameters and buffers are the mean of all models'.

    With ``spaces`` and per-model ``scores`` (aligned models), each neuron's
    parameters are averaged with weights proportional to its score in each model
    (appendix C): a tensor is weighted along its own neuron axis, dim 0 (a
    weight's output rows, a norm's channels), or, for tensors whose dim 0 has
    length 1 (class tokens, position embeddings), the first axis in a free space.
    Tensors without such an axis (the head) are averaged uniformly.
    """
    out = copy.deepcopy(gms[0])
    states = [g.state_dict() for g in gms]
    owner: dict[tuple[str, int], int] = {}
    if spaces is not None and scores is not None:
        owner = {t: s.index for s in spaces.free for t in s.tensors}
    merged = {}
    with torch.no_grad():
        for k, v in states[0].items():
            if not v.is_floating_point():
                merged[k] = v
                continue
            axis = next((d for d in range(v.ndim) if (k, d) in owner and (d == 0 or v.shape[0] == 1)), None)
            if axis is None:
                merged[k] = (sum(s[k].to(torch.float64) for s in states) / len(states)).to(v.dtype)
                continue
            shape = [1] * v.ndim
            shape[axis] = v.shape[axis]
            w = [sc[owner[(k, axis)]].to(v.device).reshape(shape) for sc in scores]
            total = sum(w)
            merged[k] = (sum(wi * s[k].to(torch.float64) for wi, s in zip(w, states)) / total).to(v.dtype)
    out.load_state_dict(merged)
    return out


@torch.no_grad()
def reset_batchnorm(gm: nn.Module, x: Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``x`` (cumulative average), in place."""
    bns = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return gm
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    try:
        for s in range(0, x.shape[0], batch_size):
            gm(x[s : s + batch_size])
    finally:
        for m, mom in saved:
            m.momentum = mom
            m.eval()
    return gm


class _Ensemble(nn.Module):
    def __init__(self, models: Sequence[nn.Module], weights: Tensor | None):
        super().__init__()
        self.members = nn.ModuleList(models)
        if weights is not None:
            self.register_buffer("class_weights", weights)
        else:
            self.class_weights = None

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.stack([m(x) for m in self.members])
        if self.class_weights is None:
            return logits.mean(0)
        w = self.class_weights / self.class_weights.sum(0, keepdim=True)
        return (logits * w[:, None, :]).sum(0)


def ensemble(gms: Sequence[GraphModule], example: Tensor, class_weights: Tensor | None = None) -> GraphModule:
    """A GraphModule averaging the models' logits, optionally per class with weights (n_models, n_classes)."""
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if class_weights.shape[0] != len(gms) or bool((class_weights < 0).any()):
            raise ValueError(
                f"class_weights must be non-negative with shape (n_models={len(gms)}, n_classes), "
                f"got {tuple(class_weights.shape)}"
            )
    return trace(_Ensemble(gms, class_weights), example)


class _Collect(Interpreter):
    def __init__(self, gm: GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, list[Tensor]] = {n: [] for n in names}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name].append(out.detach())
        return out


@torch.no_grad()
def _collect(gm: GraphModule, x: Tensor, names: set[str], batch_size: int) -> dict[str, Tensor]:
    interp = _Collect(gm, names)
    for s in range(0, x.shape[0], batch_size):
        interp.run(x[s : s + batch_size])
    return {n: torch.cat(v) for n, v in interp.values.items()}


def _space_features(values: dict[str, Tensor], space, max_rows: int, seed: int) -> Tensor:
    """Activations of a space's nodes, neurons last: Tensor of shape (n_rows, width), float64.

    The width is read from the activations, so models of other widths give
    features of their own width over the same rows.
    """
    parts = [values[name].movedim(d, -1) for name, d in space.nodes]
    feats = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]).to(torch.float64)
    if feats.shape[0] > max_rows:
        g = torch.Generator().manual_seed(seed)
        feats = feats[torch.randperm(feats.shape[0], generator=g)[:max_rows].to(feats.device)]
    return feats


def _space_features_pairs(gms, spaces, x: Tensor, batch_size: int, max_rows: int, seed: int):
    """For every model k ≥ 1 and free space: ``(k, space, features of gms[0], features of gms[k])``."""
    free = spaces[0].free
    needed = {name for s in free for name, _ in s.nodes}
    ref = _collect(gms[0], x, needed, batch_size)
    for k in range(1, len(gms)):
        vals = _collect(gms[k], x, needed, batch_size)
        for s in free:
            yield k, s, _space_features(ref, s, max_rows, seed), _space_features(vals, s, max_rows, seed)


def _matched_spaces(gms: Sequence[GraphModule], method: str, *, same_widths: bool) -> list:
    """Every model's neuron spaces, checked to correspond index for index, with at least one free."""
    from fxfuse.passes import neuron_spaces

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spaces = [neuron_spaces(g) for g in gms]
    ref = spaces[0]
    need = "the same architecture and widths" if same_widths else "the same architecture (free widths may differ)"
    for k in range(1, len(gms)):
        sp = spaces[k]
        if len(sp) != len(ref):
            detail = f"{len(sp)} neuron spaces vs {len(ref)}"
        else:
            detail = ""
            for a, b in zip(ref, sp):
                if a.tensors != b.tensors or a.fixed != b.fixed:
                    detail = f"neuron space {a.index} (`{a.tensors[0][0]}` dim {a.tensors[0][1]}) is tied to other tensors"
                elif a.size != b.size and (same_widths or a.fixed):
                    detail = f"neuron space {a.index} (`{a.tensors[0][0]}` dim {a.tensors[0][1]}) has width {b.size} vs {a.size}"
                if detail:
                    break
        if detail:
            raise AlignmentError(
                f"models[{k}] differs from models[0]: {detail}; {method} needs {need}. "
                "Use method='kf-linear' for models of different widths or structure."
            )
    if not ref.free:
        reasons = sorted({s.reason for s in ref})
        raise AlignmentError(
            f"{method}: no neuron space of {type(gms[0]).__name__} can be permuted: all {len(ref)} are fixed "
            f"({'; '.join(reasons)}), so there is nothing to align. Use method='kf-linear', which fuses level "
            "by level without neuron spaces."
        )
    return spaces


def space_scores(
    gm: GraphModule, spaces, x: Tensor, labels: Tensor | None, importance: str, *, n_steps: int = 20
) -> dict[int, Tensor]:
    """Importance score of every neuron of every free space of one model.

    Each space is scored at its last node in graph order (the activation that
    feeds the next op, or the end of a residual stream), with captum as for
    level outputs (:func:`fxfuse._importance.node_scores`).

    Returns:
        Free space index -> Tensor of shape (space width in this model,), float64, positive.
    """
    from ._importance import node_scores

    free = spaces.free
    taps = [s.nodes[-1] for s in free]
    scores = node_scores(gm, taps, x, labels, importance, n_steps=n_steps)
    return {s.index: sc for s, sc in zip(free, scores)}


def align(
    gms: Sequence[GraphModule],
    x: Tensor,
    *,
    importance: str = "uniform",
    labels: Tensor | None = None,
    batch_size: int = 256,
    max_rows: int = 50_000,
    seed: int = 0,
    n_steps: int = 20,
    method: str = "git-rebasin",
) -> SpaceAlignment:
    """Permute ``gms[1:]`` so that their neurons match ``gms[0]``'s, space by space.

    For each free neuron space, the cost of matching neuron j of the first model
    with neuron k of another is the importance-weighted grouping error of the
    pair, s_j s_k / (s_j + s_k) · ‖a_j − b_k‖², where a_j, b_k are the neurons'
    activations on ``x`` (over every activation of the space); with uniform
    scores this is the squared L2 distance of activation-based Git Re-Basin.
    ``linear_sum_assignment`` solves it. Every model keeps its function.

    Args:
        gms: Traced models of one architecture and equal widths.
        x: Inputs, Tensor of shape (n_samples, ...).
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"`` (per space,
            see :func:`space_scores`).
        labels: Attribution targets, needed for non-uniform importance.
        method: The calling method's name, for error messages.

    Returns:
        The aligned models, the spaces and the aligned scores.

    Raises:
        AlignmentError: the models' spaces differ, or no space is free (the message
            names what fixed them).

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse._baselines import align
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        >>> x = torch.randn(64, 4)
        >>> gm = fxfuse.trace(a, x[:2])
        >>> b = fxfuse.trace(a, x[:2])
        >>> p = torch.randperm(6)
        >>> with torch.no_grad():
        ...     for name, t in b.state_dict().items():
        ...         _ = t.copy_(t[:, p] if name == "2.weight" else t[p] if name.startswith("0.") else t)
        >>> aligned = align([gm, b], x).models[1]
        >>> torch.equal(aligned.get_submodule("0").weight, gm.get_submodule("0").weight)
        True
    """
    from fxfuse.passes import permute

    spaces = _matched_spaces(gms, method, same_widths=True)
    scores = [space_scores(g, sp, x, labels, importance, n_steps=n_steps) for g, sp in zip(gms, spaces)]
    perms: list[dict[int, Tensor]] = [{} for _ in gms]
    for k, s, a, b in _space_features_pairs(gms, spaces, x, batch_size, max_rows, seed):
        perms[k][s.index] = hungarian_pairs(pair_costs(a.T, b.T, scores[0][s.index], scores[k][s.index]))
    out = [gms[0]] + [permute(gms[k], spaces[k], perms[k]) for k in range(1, len(gms))]
    out_scores = [scores[0]] + [
        {i: scores[k][i][p.to(scores[k][i].device)] for i, p in perms[k].items()} for k in range(1, len(gms))
    ]
    return SpaceAlignment(out, spaces[0], out_scores)


def _transport_plan(cost: Tensor, mu: Tensor, nu: Tensor) -> Tensor:
    """Exact optimal transport plan (POT's network simplex), Tensor of shape (len(mu), len(nu))."""
    import numpy as np
    import ot

    a = mu.detach().cpu().double().numpy()
    b = nu.detach().cpu().double().numpy()
    plan, log = ot.emd(a / a.sum(), b / b.sum(), np.ascontiguousarray(cost.detach().cpu().double().numpy()),
                       numItermax=10_000_000, log=True)
    if log.get("warning"):
        raise AlignmentError(f"otfusion: the exact transport solver did not converge ({log['warning']})")
    return torch.from_numpy(plan).to(cost.device)


def _transport(gm: GraphModule, spaces, maps: dict[int, Tensor], like: GraphModule) -> GraphModule:
    """``like``'s architecture holding ``gm``'s parameters moved along every free space.

    ``maps[i]`` is a Tensor of shape (width in ``like``, width in ``gm``) applied
    along every axis of space ``i`` (OTFusion's barycentric map diag(1/β) Tᵀ).
    """
    out = copy.deepcopy(like)
    axes = {t: s.index for s in spaces.free for t in s.tensors}
    target = out.state_dict()
    new = {}
    for name, t in gm.state_dict().items():
        if t.is_floating_point():
            t = t.to(torch.float64)
            for d in range(t.ndim):
                if (name, d) in axes:
                    m = maps[axes[(name, d)]].to(t)
                    t = torch.tensordot(m, t, dims=([1], [d])).movedim(0, d)
        if tuple(t.shape) != tuple(target[name].shape):
            raise AlignmentError(
                f"otfusion: tensor `{name}` has shape {tuple(t.shape)} after transport but models[0] has "
                f"{tuple(target[name].shape)}; only free neuron spaces may differ in width"
            )
        new[name] = t.to(target[name].dtype)
    out.load_state_dict(new)
    return out


def otfusion(
    gms: Sequence[GraphModule],
    x: Tensor,
    *,
    importance: str = "uniform",
    labels: Tensor | None = None,
    batch_size: int = 256,
    max_rows: int = 50_000,
    seed: int = 0,
    n_steps: int = 20,
) -> GraphModule:
    """Activation-based OTFusion onto ``gms[0]``'s architecture, then averaging.

    For each free neuron space, the ground cost between neuron i of model k and
    neuron j of the first model is the squared L2 distance of their activations
    on ``x``; the marginals are the neurons' importance scores, normalised (uniform
    by default). The exact plan T (network simplex) gives the barycentric map
    diag(1/β) Tᵀ, applied along every axis of the space (Singh and Jaggi, 2020).
    With equal widths and uniform scores the exact plan is a permutation, and
    it is solved as one (Hungarian), so the result equals git-rebasin's.

    Returns:
        A GraphModule of ``gms[0]``'s architecture with the averaged parameters.

    Raises:
        AlignmentError: the spaces do not correspond, or none is free.
    """
    spaces = _matched_spaces(gms, "otfusion", same_widths=False)
    scores = [space_scores(g, sp, x, labels, importance, n_steps=n_steps) for g, sp in zip(gms, spaces)]
    maps: list[dict[int, Tensor]] = [{} for _ in gms]
    for k, s, a, b in _space_features_pairs(gms, spaces, x, batch_size, max_rows, seed):
        cost = torch.cdist(b.T, a.T) ** 2  # (width in model k, width in models[0])
        if importance == "uniform" and cost.shape[0] == cost.shape[1]:
            # the exact plan is a permutation: its map selects neuron match[j] for slot j
            maps[k][s.index] = torch.eye(cost.shape[0], dtype=cost.dtype, device=cost.device)[hungarian_pairs(cost.T)]
        else:
            plan = _transport_plan(cost, scores[k][s.index], scores[0][s.index])
            maps[k][s.index] = plan.T / plan.sum(0)[:, None]
    return average([gms[0]] + [_transport(gms[k], spaces[k], maps[k], like=gms[0]) for k in range(1, len(gms))])


def last_layer_kd(
    gms: Sequence[GraphModule],
    x: Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    val_split: float = 0.1,
    patience: int = 10,
    seed: int = 0,
    progress=None,
) -> GraphModule:
    """``gms[0]`` with only its head level retrained to match the models' mean softmax.

    The head is the last level of :func:`fxfuse.passes.partition_levels`; its
    inputs are computed once. The loss is KL(mean softmax ‖ softmax(head)) with
    Adam; early stopping on a validation split keeps the best head.
    """
    from fxfuse.passes import partition_levels

    from ._solve import fit_gradient

    plan = partition_levels(trace(gms[0], x[:2]))
    levels = plan.split()
    with torch.no_grad():
        feats, probs = [], []
        for s in range(0, x.shape[0], 256):
            f = x[s : s + 256]
            for lv in levels[:-1]:
                f = lv(f)
            feats.append(f)
            probs.append(torch.stack([g(x[s : s + 256]).softmax(-1) for g in gms]).mean(0))
        feats_t, target = torch.cat(feats), torch.cat(probs)

    def kl(logits: Tensor, p: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits, -1), p, reduction="batchmean")

    fit_gradient(levels[-1], feats_t, target, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                 val_split=val_split, patience=patience, seed=seed, progress=progress, loss_fn=kl)
    return plan.gm
