"""Permutation alignment of models neuron space by neuron space, from streamed statistics.

Used by git-rebasin, otfusion, NP Merge and the level-wise NP Merge variant.
The matching cost between neuron j of ``models[0]`` and neuron k of another model
needs only sums over the fusion data (rows = samples × positions):
‖a_j − b_k‖² = Σ a_j² + Σ b_k² − 2 Σ a_j b_k, so activations are never held whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from ._collect import Capture, FusionData
from ._errors import AlignmentError
from ._grouping import hungarian_pairs
from ._importance import CONDUCTANCE_STEPS

__all__ = ["SpaceAlignment", "align", "align_with", "matched_spaces", "reset_batchnorm", "space_distances", "space_scores"]


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


@torch.no_grad()
def reset_batchnorm(gm: nn.Module, data, batch_size: int = 256, device=None) -> nn.Module:
    """Recompute every BatchNorm's running statistics on the data (cumulative average), in place.

    Each BatchNorm gets back the train/eval mode it had.

    Args:
        gm: The model.
        data: Fusion data (a :class:`~fxfuse._collect.FusionData` or any form it accepts).

    Example:
        >>> import torch
        >>> from fxfuse._align import reset_batchnorm
        >>> bn = torch.nn.BatchNorm1d(3).eval()
        >>> _ = reset_batchnorm(bn, torch.randn(64, 3) + 5.0)
        >>> bool((bn.running_mean > 4).all()), bn.training
        (True, False)
    """
    bns = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return gm
    data = data if isinstance(data, FusionData) else FusionData(data)
    saved = [(m, m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    try:
        for x, _ in data.batches(batch_size, device):
            gm(x)
    finally:
        for m, mom, was in saved:
            m.momentum = mom
            m.train(was)
    from ._dist import all_reduce_, is_distributed

    if is_distributed():  # each rank averaged its own batches: weight the ranks by their batch counts
        with torch.no_grad():
            for m in bns:
                nb = m.num_batches_tracked.to(torch.float64)
                total = all_reduce_(nb.clone())
                for buf in (m.running_mean, m.running_var):
                    buf.copy_(all_reduce_(buf.double() * nb) / total)
                m.num_batches_tracked.copy_(total.long())
    return gm


def matched_spaces(gms: Sequence[GraphModule], method: str, *, same_widths: bool) -> list:
    """Every model's neuron spaces, checked to correspond index for index, with at least one free."""
    from fxfuse.passes import neuron_spaces

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


def space_scores(gm: GraphModule, spaces, data, importance: str, *, n_steps: int = CONDUCTANCE_STEPS,
                 device=None, target: str = "labels") -> dict[int, Tensor]:
    """Importance score of every neuron of every free space of one model.

    Each space is scored at its last node in graph order (the activation that
    feeds the next op, or the end of a residual stream), with captum as for
    level outputs (:func:`fxfuse._importance.node_scores`).

    Returns:
        Free space index -> Tensor of shape (space width in this model,), float64, positive.
    """
    from ._importance import node_scores

    free = spaces.free
    scores = node_scores(gm, [s.nodes[-1] for s in free], data, importance, n_steps=n_steps, device=device,
                         target=target)
    return {s.index: sc for s, sc in zip(free, scores)}


def _rows(value: Tensor, dim: int, keep: Tensor | None) -> Tensor:
    """One node's activations as rows, neurons last, float64: Tensor of shape (n_rows, width).

    ``keep`` selects rows (the same in every model), or None for all.
    """
    v = value.movedim(dim, -1)
    v = v.reshape(-1, v.shape[-1])
    return (v if keep is None else v[keep]).to(torch.float64)


# samples whose activations at every space node are held at once while streaming alignment statistics
_CAPTURE_SAMPLES = 32


def _distances(sq_a: Tensor, sq_b: Tensor, cross: Tensor, sum_a: Tensor, sum_b: Tensor, n: int, match: str) -> Tensor:
    """Pairwise matching costs (width a, width b) from the streamed sums of one space (see :func:`space_distances`)."""
    if match == "inner":
        return (sq_a[:, None] + sq_b[None, :] - 2.0 * cross).clamp_min_(0.0)
    mean_a, mean_b = sum_a / n, sum_b / n
    var_a = (sq_a / n - mean_a**2).clamp_min(0.0)
    var_b = (sq_b / n - mean_b**2).clamp_min(0.0)
    live_a = var_a > 1e-12 * (sq_a / n)  # a constant neuron has no correlation with anything
    live_b = var_b > 1e-12 * (sq_b / n)
    cov = cross / n - mean_a[:, None] * mean_b[None, :]
    std = (var_a.sqrt()[:, None] * var_b.sqrt()[None, :]).clamp_min(1e-300)
    corr = torch.where(live_a[:, None] & live_b[None, :], cov / std, torch.zeros_like(cov)).clamp(-1.0, 1.0)
    return (live_a.double()[:, None] + live_b.double()[None, :] - 2.0 * corr).clamp_min_(0.0)


@torch.no_grad()
def space_distances(gms: Sequence[GraphModule], spaces, data: FusionData, *, batch_size: int = 256,
                    max_rows: int = 50_000, seed: int = 0, match: str = "correlation",
                    device=None) -> list[dict[int, Tensor]]:
    """Matching costs between the neurons of ``gms[0]`` and of each other model, per free space.

    Streams the data once: per slice of samples it adds, in float64, Σ a_j, Σ a_j²,
    Σ b_k, Σ b_k² and Σ a_j b_k over the space's activations (every node of the
    space). Each node contributes about ``max_rows`` rows (samples × positions), a
    seeded random subset that is the same in every model, so work and memory are
    bounded by ``max_rows`` and the widths whatever the number of samples.

    ``match="inner"``: the squared L2 distance ‖a_j − b_k‖² = Σa_j² + Σb_k² − 2Σa_j b_k,
    which over a permutation is the same as maximising raw inner products.
    ``match="correlation"`` (the default): the squared distance of the
    standardised activations per row, 2 − 2 corr(a_j, b_k) (Pearson correlation,
    as in Git Re-Basin's activation matching and NP Merge's Permute step); a
    constant neuron counts as the zero vector (distance 1 to any other neuron, 0
    to another constant one).

    Returns:
        For each model k ≥ 1 (index k − 1): free space index -> Tensor of shape
        (width in gms[0], width in gms[k]), float64.
    """
    if match not in ("correlation", "inner"):
        raise ValueError(f"match must be 'correlation' or 'inner', got {match!r}")
    free = spaces[0].free
    names = list(dict.fromkeys(name for s in free for name, _ in s.nodes))
    caps = [Capture(g, names) for g in gms]
    sq: list[dict[int, Tensor]] = [{} for _ in gms]
    sums: list[dict[int, Tensor]] = [{} for _ in gms]
    cross: list[dict[int, Tensor]] = [{} for _ in gms]
    count: dict[int, int] = {}

    def add(acc: dict[int, Tensor], i: int, t: Tensor) -> None:
        acc[i] = t if i not in acc else acc[i] + t

    from ._dist import all_reduce_, all_reduce_number, is_distributed

    gen = torch.Generator().manual_seed(seed)
    n_samples = data.n_samples
    if is_distributed() and n_samples is not None:
        n_samples = all_reduce_number(n_samples)  # max_rows is shared out over all shards
    for batch, _ in data.batches(batch_size, device):
        for x in batch.split(_CAPTURE_SAMPLES):  # every space activation of these samples is held at once
            for cap in caps:
                cap.run(x)
            for s in free:
                for name, d in s.nodes:
                    value = caps[0].values[name]
                    rows = value.numel() // value.shape[d]
                    keep = None
                    if n_samples is not None and rows * n_samples > max_rows * x.shape[0]:
                        m = max(1, round(max_rows * x.shape[0] / n_samples))  # this slice's share of max_rows
                        keep = torch.randperm(rows, generator=gen)[:m].to(x.device)
                    a = _rows(caps[0].values[name], d, keep)
                    count[s.index] = count.get(s.index, 0) + a.shape[0]
                    add(sq[0], s.index, (a * a).sum(0))
                    add(sums[0], s.index, a.sum(0))
                    for k in range(1, len(gms)):
                        b = _rows(caps[k].values[name], d, keep)
                        add(sq[k], s.index, (b * b).sum(0))
                        add(sums[k], s.index, b.sum(0))
                        add(cross[k], s.index, a.T @ b)
            for cap in caps:
                cap.values.clear()
    for acc in (*sq, *sums, *cross):  # sums over the shards of a process group (same key order on every rank)
        for t in acc.values():
            all_reduce_(t)
    count = {i: all_reduce_number(c) for i, c in count.items()}
    return [
        {i: _distances(sq[0][i], sq[k][i], cross[k][i], sums[0][i], sums[k][i], count[i], match) for i in cross[k]}
        for k in range(1, len(gms))
    ]


def align(
    gms: Sequence[GraphModule],
    data,
    *,
    importance: str = "uniform",
    batch_size: int = 256,
    max_rows: int = 50_000,
    seed: int = 0,
    n_steps: int = CONDUCTANCE_STEPS,
    match: str = "correlation",
    method: str = "git-rebasin",
    device=None,
    target: str = "labels",
) -> SpaceAlignment:
    """Permute ``gms[1:]`` so that their neurons match ``gms[0]``'s, space by space.

    For each free neuron space, the cost of matching neuron j of the first model
    with neuron k of another is the importance-weighted grouping error of the
    pair, s_j s_k / (s_j + s_k) · ‖a_j − b_k‖², where a_j, b_k are the neurons'
    activations on the data (over every activation of the space, from streamed
    sums: :func:`space_distances`), standardised by default (``match="correlation"``,
    so the cost is 2 − 2 corr(a_j, b_k) as in Git Re-Basin's activation matching)
    or raw (``match="inner"``). ``linear_sum_assignment`` solves it. Every model
    keeps its function.

    Args:
        gms: Traced models of one architecture and equal widths.
        data: Fusion data (a :class:`~fxfuse._collect.FusionData` or any form it
            accepts); labelled for non-uniform importance.
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"`` (per space,
            see :func:`space_scores`).
        max_rows: Rows (samples × positions) of each activation that the matching
            costs are summed over; a seeded random subset beyond it.
        match: ``"correlation"`` or ``"inner"`` (see :func:`space_distances`).
        method: The calling method's name, for error messages.
        target: What the scores attribute: ``"labels"`` or ``"own"`` (each model's own prediction; see
            :func:`fxfuse._importance.node_scores`).

    Returns:
        The aligned models, the spaces and the aligned scores.

    Raises:
        AlignmentError: the models' spaces differ, or no space is free (the message
            names what fixed them).

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse._align import align
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

    from ._grouping import harmonic_weights

    data = data if isinstance(data, FusionData) else FusionData(data)
    spaces = matched_spaces(gms, method, same_widths=True)
    scores = [space_scores(g, sp, data, importance, n_steps=n_steps, device=device, target=target)
              for g, sp in zip(gms, spaces)]
    dists = space_distances(gms, spaces, data, batch_size=batch_size, max_rows=max_rows, seed=seed, match=match,
                            device=device)
    perms: list[dict[int, Tensor]] = [{} for _ in gms]
    for k in range(1, len(gms)):
        for i, d in dists[k - 1].items():
            perms[k][i] = hungarian_pairs(harmonic_weights(scores[0][i], scores[k][i]) * d)
    out = [gms[0]] + [permute(gms[k], spaces[k], perms[k]) for k in range(1, len(gms))]
    out_scores = [scores[0]] + [
        {i: scores[k][i][p.to(scores[k][i].device)] for i, p in perms[k].items()} for k in range(1, len(gms))
    ]
    return SpaceAlignment(out, spaces[0], out_scores)


def align_with(gms: Sequence[GraphModule], data, cfg) -> SpaceAlignment:
    """:func:`align` with the settings of a fusion (a :class:`fxfuse._config.FuseConfig`)."""
    return align(gms, data, importance=cfg.importance, batch_size=cfg.batch_size, max_rows=cfg.max_rows,
                 seed=cfg.seed, n_steps=cfg.importance_steps, match=cfg.match, method=cfg.method, device=cfg.device,
                 target=cfg.score_target)
