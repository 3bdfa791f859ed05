"""Grouping neurons: Hungarian matching (HF) and importance-weighted k-means (KF).

Neurons are the points: a neuron's features are the values it takes over the
fusion samples (or, for closed-form levels, the values the fused level can
reproduce from its input). Every grouping here needs only the neurons' Gram
matrix g_jk = ⟨p_j, p_k⟩, which is streamed batch by batch, so its cost is
O(n_neurons²) per step, whatever the number of samples and positions. Reference: "Model Fusion via Neuron Interpolation",
section 4.3.1 and appendix B.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "Grouping",
    "distance_pair_costs",
    "gram_pair_costs",
    "gram_sq_dists",
    "harmonic_weights",
    "hungarian_pairs",
    "kernel_inertia",
    "kernel_kmeans",
    "pair_costs",
    "weighted_kmeans",
]


@dataclass(frozen=True)
class Grouping:
    """Assignment of the concatenated base neurons to fused neurons.

    Attributes:
        labels: Tensor of shape (n_neurons,): the fused neuron of each base neuron.
        cost: The importance-weighted grouping error, Σ_j s_j ‖z_j − T_{k_j}‖² (Eq. 4).
    """

    labels: Tensor
    cost: float


def _sq_dists(points: Tensor, centers: Tensor) -> Tensor:
    d = (points * points).sum(1, keepdim=True) + (centers * centers).sum(1)[None, :] - 2.0 * points @ centers.T
    return d.clamp_min_(0.0)


def gram_sq_dists(gram: Tensor, rows: Tensor | slice = slice(None), cols: Tensor | slice = slice(None)) -> Tensor:
    """Squared distances ‖p_j − p_k‖² = g_jj + g_kk − 2 g_jk between points known only by their Gram matrix."""
    diag = gram.diagonal()
    sub = gram[rows]
    sub = sub.index_select(1, cols) if isinstance(cols, Tensor) else sub[:, cols]  # not [:, cols]: a slow gather
    return sub.mul(-2.0).add_(diag[rows][:, None]).add_(diag[cols][None, :]).clamp_min_(0.0)


def _cluster_sums(gram: Tensor, weights: Tensor, labels: Tensor, k: int, rows: int = 256) -> tuple[Tensor, Tensor]:
    """R[c, j] = Σ_{i∈c} s_i g_ij (so ⟨p_j, μ_c⟩ = R[c, j] / S_c) and the cluster weights S_c; O(n²).

    Added ``rows`` points at a time, in order (the same sums as at once, without an n × n temporary)."""
    R = torch.zeros(k, gram.shape[0], dtype=gram.dtype, device=gram.device)
    for s in range(0, gram.shape[0], rows):
        R.index_add_(0, labels[s : s + rows], gram[s : s + rows] * weights[s : s + rows, None])
    return R, torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(0, labels, weights)


def _inertia(gram: Tensor, weights: Tensor, labels: Tensor, R: Tensor, wsum: Tensor) -> float:
    """Σ_j s_j ‖p_j − μ_{c_j}‖² from the cluster sums of :func:`_cluster_sums`, in O(n).

    With ⟨p_j, μ_c⟩ = R[c, j] / S_c and ‖μ_c‖² = Σ_{j∈c} s_j R[c, j] / S_c², the objective
    is Σ_j s_j g_jj − Σ_c S_c ‖μ_c‖².
    """
    own = R[labels, torch.arange(gram.shape[0], device=gram.device)]
    inv = torch.where(wsum > 0, 1.0 / wsum.clamp_min(1e-300), torch.zeros_like(wsum))
    spread = torch.zeros_like(wsum).index_add_(0, labels, weights * own)
    return max(float((weights * gram.diagonal()).sum() - (spread * inv).sum()), 0.0)


def kernel_inertia(gram: Tensor, weights: Tensor, labels: Tensor, k: int) -> float:
    """Σ_j s_j ‖p_j − μ_{c_j}‖² from the Gram matrix (the weighted k-means objective, Eq. 4)."""
    return _inertia(gram, weights, labels, *_cluster_sums(gram, weights, labels, k))


# relative tolerance under which two distances count as equal: decisions (Lloyd's assignment, the greedy
# k-means++ candidate) must not depend on the order in which sums were added (e.g. over the ranks of a
# torch.distributed process group, or in another BLAS), only on the statistics
TIE_RTOL = 1e-9


def _near_min(x: Tensor, dim: int, scale: Tensor | None = None) -> Tensor:
    """Boolean mask of the entries within TIE_RTOL (of the largest finite magnitude along ``dim``) of the minimum.

    ``scale``: that largest finite magnitude when the caller knows it (one pass fewer over x each).
    """
    if scale is None:
        scale = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(dim, keepdim=True)
    return x <= torch.amin(x, dim, keepdim=True) + TIE_RTOL * scale


def _kernel_lloyd(gram: Tensor, weights: Tensor, labels: Tensor, k: int, max_iter: int) -> tuple[Tensor, float]:
    """Weighted Lloyd iterations on a Gram matrix, from initial labels.

    Keeps R[c, j] = Σ_{i∈c} s_i g_ij (so ⟨p_j, μ_c⟩ = R[c, j] / S_c) and updates it
    only for the points that moved: the first step costs O(n²), later ones
    O(n k + n · moved). The scores ‖μ_c‖² − 2⟨p_j, μ_c⟩ are kept between steps and
    recomputed only for the clusters that changed (their values are those of a full
    recomputation), so a later step reads them once (min and max per point) and
    searches the best cluster only for the points that leave theirs.
    """
    rng = torch.arange(gram.shape[0], device=gram.device)
    R, wsum = _cluster_sums(gram, weights, labels, k)
    score: Tensor | None = None
    changed: Tensor | None = None
    for _ in range(max_iter):
        inv = torch.where(wsum > 0, 1.0 / wsum.clamp_min(1e-300), torch.zeros_like(wsum))
        sq = torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(0, labels, weights * R[labels, rng])
        empty = wsum <= 0
        has_empty = bool(empty.any())
        # ‖p_j − μ_c‖² − g_jj = ‖μ_c‖² − 2⟨p_j, μ_c⟩, in (k, n) layout
        if score is None or has_empty:
            score = R * (-2.0 * inv[:, None])
            score += (sq * inv * inv)[:, None]
        elif changed.numel():
            part = R.index_select(0, changed) * (-2.0 * inv.index_select(0, changed)[:, None])
            part += (sq * inv * inv).index_select(0, changed)[:, None]
            score.index_copy_(0, changed, part)
        if has_empty:
            # the tolerance's scale: an empty cluster's row is ±0 here, so it does not count
            scale = score.abs().amax(0, keepdim=True)
            score[empty] = float("inf")  # an empty cluster has no centre
            near = _near_min(score, 0, scale)
            # a point within the tolerance of its best centre stays where it is (no moves on rounding alone)
            new = torch.where(near[labels, rng], labels, near.to(torch.int8).argmax(0))
        else:
            lo, hi = score.amin(0), score.amax(0)  # (torch.aminmax down the columns took 3.6× as long here)
            limit = lo + TIE_RTOL * torch.maximum(hi, -lo)  # _near_min's bound: the scale is max |score|
            new = labels.clone()
            leave = torch.nonzero(~(score[labels, rng] <= limit)).flatten()
            if leave.numel():
                new[leave] = (score[:, leave] <= limit[leave]).to(torch.int8).argmax(0)
        # empty clusters take the point that currently costs most, never the last point of a cluster (that would
        # only empty another one: with many coincident points, e.g. dead neurons, every cost is zero and such
        # moves went round until max_iter)
        counts = torch.bincount(new, minlength=k)
        if bool((counts == 0).any()):
            cost = weights * (gram.diagonal() + score[new, rng])
            cost[counts[new] <= 1] = -float("inf")
            for c in torch.nonzero(counts == 0).flatten().tolist():
                j = int(cost.argmax())
                src = int(new[j])
                new[j] = c
                cost[j] = -float("inf")
                counts[src] -= 1
                if int(counts[src]) == 1:
                    cost[new == src] = -float("inf")
        moved = torch.nonzero(new != labels).flatten()
        if moved.numel() == 0:
            break
        rows = gram[moved] * weights[moved, None]
        R.index_add_(0, labels[moved], -rows).index_add_(0, new[moved], rows)
        wsum.index_add_(0, labels[moved], -weights[moved]).index_add_(0, new[moved], weights[moved])
        changed = torch.unique(torch.cat([labels[moved], new[moved]]))
        labels = new
    return labels, _inertia(gram, weights, labels, R, wsum)  # R and wsum follow the final labels


def _nearest_centres(gram: Tensor, idx: Tensor, block: int | None = None) -> Tensor:
    """Each point's nearest chosen centre, per run: Tensor of shape (runs, n), the first centre of ``idx[r]`` within
    TIE_RTOL of the nearest (:func:`_near_min` of ``gram_sq_dists(gram, :, idx[r])`` along the centres).

    Computed in (centres, points) layout, a block of points at a time: the centres' Gram rows are gathered as
    row segments (gathering columns costs several times more) and each block's distances and reductions stay in
    the cache; the distances, their tolerance and the first-index rule are those of the points-by-centres form,
    so the labels are the same. ``block``: points per block (default: about 1 MB of distances).
    """
    rows = gram if torch.equal(gram, gram.mT) else gram.mT.contiguous()  # rows[c, j] = gram[j, c]
    diag = gram.diagonal().contiguous()
    n, k = gram.shape[0], idx.shape[1]
    block = block or max(16, (1 << 17) // max(k, 1))  # about 1 MB of float64 distances per block
    out = torch.empty(idx.shape[0], n, dtype=torch.long, device=gram.device)
    for r, centres in enumerate(idx):
        dc = diag.index_select(0, centres)[:, None]
        for s in range(0, n, block):
            d = rows[:, s : s + block].index_select(0, centres).mul_(-2.0).add_(diag[s : s + block]).add_(dc)
            d.clamp_min_(0.0)
            scale = d.amax(0, keepdim=True)  # ≥ 0: the largest magnitude, when finite (else _near_min's own)
            near = _near_min(d, 0, scale if bool(torch.isfinite(scale).all()) else None)
            out[r, s : s + block] = near.to(torch.int8).argmax(0)
    return out


def _kernel_kmeans_pp(gram: Tensor, weights: Tensor, k: int, gen: torch.Generator, runs: int = 1) -> Tensor:
    """Importance-weighted greedy k-means++ seeding on a Gram matrix; initial labels of shape (runs, n).

    Each step samples 2 + ⌊ln k⌋ candidates ∝ s_j · D(p_j)², with replacement as
    scikit-learn does, and keeps the one that lowers the weighted potential most (the
    greedy variant). ``runs`` independent seedings advance together, one batched step each,
    so restarts cost one Python loop of k steps, not ``runs`` of them.
    """
    n, dev = gram.shape[0], gram.device
    trials = 2 + int(math.log(k))
    diag = gram.diagonal().contiguous()  # read k times: a strided view would cost a cache line per point
    at = torch.arange(runs, device=dev)
    first = torch.multinomial(weights / weights.sum(), runs, replacement=True, generator=gen)
    idx = torch.empty(runs, k, dtype=torch.long, device=dev)
    idx[:, 0] = first
    # distances below this are rounding: a chosen centre (or its duplicate) must have exactly zero weight
    floor = TIE_RTOL * float(diag.abs().max().clamp_min(1e-300))
    closest = (diag[first, None] + diag[None, :] - 2.0 * gram[first]).clamp_min_(0.0)  # (runs, n)
    for step in range(1, k):
        # one pass per step over n points per run plus a few over the candidates' rows: this loop runs k times,
        # so it is written in as few operations as the arithmetic allows
        closest.masked_fill_(closest <= floor, 0.0)
        p = weights * closest
        spent = p.sum(1) <= 0.0
        if bool(spent.any()):  # every point of a run coincides with a centre: that run picks unused points
            chosen = torch.zeros(runs, n, dtype=torch.bool, device=dev)
            chosen.scatter_(1, idx[:, :step], True)
            p[spent] = (~chosen[spent]).to(p.dtype)
        cand = torch.multinomial(p, trials, replacement=True, generator=gen).flatten()  # runs × trials
        # (g_jj − 2 g_cj) + g_cc: index_select, not gram[cand] (advanced indexing costs several times more per
        # call here); −2 g is exact, so adding it with alpha rounds as (g · −2) + g_jj does
        new_closest = torch.add(diag, gram.index_select(0, cand), alpha=-2.0).add_(diag.index_select(0, cand)[:, None])
        new_closest = new_closest.view(runs, trials, n)
        torch.minimum(new_closest, closest[:, None, :], out=new_closest).clamp_min_(0.0)
        pot = new_closest.view(runs * trials, n).mv(weights).view(runs, trials)  # ≥ 0 and finite: its own scale
        flat = at * trials + _near_min(pot, 1, pot.amax(1, keepdim=True)).to(torch.int8).argmax(1)
        idx[:, step] = cand.index_select(0, flat)
        closest = new_closest.view(runs * trials, n).index_select(0, flat)
    return _nearest_centres(gram, idx)


def kernel_kmeans(
    gram: Tensor,
    weights: Tensor,
    k: int,
    *,
    init: Tensor | None = None,
    n_init: int = 1,
    max_iter: int = 300,
    seed: int = 0,
) -> tuple[Tensor, float]:
    """Importance-weighted k-means of points given by their Gram matrix (kernel k-means).

    Minimises Σ_j s_j ‖p_j − μ_{c_j}‖² with μ_c the s-weighted mean of cluster c,
    using only g_jk = ⟨p_j, p_k⟩: each Lloyd step costs O(n²) whatever the points'
    dimension (rows of the fusion data). The first run starts from ``init`` (labels)
    when given, the others from greedy k-means++; the best of ``n_init`` runs is kept.

    Args:
        gram: Tensor of shape (n, n), symmetric positive semi-definite.
        weights: Tensor of shape (n,), non-negative, not all zero.
        k: Number of clusters, 1 ≤ k ≤ n.

    Returns:
        labels (Tensor of shape (n,)) and the weighted inertia.

    Example:
        >>> import torch
        >>> from fxfuse._grouping import kernel_kmeans
        >>> pts = torch.tensor([[0.0], [0.1], [5.0], [5.2]], dtype=torch.float64)
        >>> labels, _ = kernel_kmeans(pts @ pts.T, torch.ones(4, dtype=torch.float64), 2)
        >>> bool(labels[0] == labels[1]) and bool(labels[2] == labels[3]) and bool(labels[0] != labels[2])
        True
    """
    n = gram.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    if weights.shape != (n,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("weights must be a non-negative Tensor of shape (n_points,) with a positive sum")
    gram = gram.to(torch.float64)
    weights = weights.to(device=gram.device, dtype=torch.float64)
    if k == n:
        return torch.arange(n, device=gram.device), 0.0
    gen = torch.Generator(device=gram.device).manual_seed(seed)
    seeded = max(1, n_init) - (init is not None)
    starts = list(_kernel_kmeans_pp(gram, weights, k, gen, seeded)) if seeded > 0 else []
    if init is not None:
        starts.insert(0, init.to(gram.device))
    best = None
    for start in starts:
        labels, inertia = _kernel_lloyd(gram, weights, start, k, max_iter)
        if best is None or inertia < best[1] - 1e-12 * abs(best[1]):
            best = (labels, inertia)
    return best


def weighted_kmeans(
    points: Tensor,
    weights: Tensor,
    k: int,
    *,
    n_init: int = 5,
    max_iter: int = 300,
    seed: int = 0,
) -> tuple[Tensor, Tensor, float]:
    """Importance-weighted k-means of explicit points: :func:`kernel_kmeans` on their Gram matrix.

    Args:
        points: Tensor of shape (n_points, n_features).
        weights: Tensor of shape (n_points,), non-negative, not all zero.
        k: Number of clusters, 1 ≤ k ≤ n_points.

    Returns:
        labels (Tensor of shape (n_points,)), centers (Tensor of shape (k, n_features))
        and the weighted inertia.

    Example:
        >>> import torch
        >>> from fxfuse._grouping import weighted_kmeans
        >>> pts = torch.tensor([[0.0], [0.1], [5.0], [5.2]])
        >>> labels, centers, _ = weighted_kmeans(pts, torch.ones(4), 2)
        >>> bool(labels[0] == labels[1]) and bool(labels[2] == labels[3]) and bool(labels[0] != labels[2])
        True
    """
    points = points.to(torch.float64)
    labels, inertia = kernel_kmeans(points @ points.T, weights, k, n_init=n_init, max_iter=max_iter, seed=seed)
    w = weights.to(device=points.device, dtype=torch.float64)
    wsum = torch.zeros(k, dtype=torch.float64, device=points.device).index_add_(0, labels, w)
    centers = torch.zeros(k, points.shape[1], dtype=torch.float64, device=points.device)
    centers.index_add_(0, labels, points * w[:, None])
    return labels, centers / wsum.clamp_min(1e-300)[:, None], inertia


def harmonic_weights(sa: Tensor, sb: Tensor) -> Tensor:
    """s_a s_b / (s_a + s_b) for every pair: Tensor of shape (len(sa), len(sb)), float64."""
    sa, sb = sa.to(torch.float64), sb.to(torch.float64)
    return sa[:, None] * sb[None, :] / (sa[:, None] + sb[None, :]).clamp_min(1e-300)


def pair_costs(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
    """Grouping error of pairing neuron j of model A with neuron k of model B.

    For a pair {a, b} with scores s_a, s_b the weighted centre is
    T = (s_a a + s_b b) / (s_a + s_b) and the grouping error is
    s_a‖a − T‖² + s_b‖b − T‖² = s_a s_b / (s_a + s_b) · ‖a − b‖² (appendix B.1).

    Args:
        a: Tensor of shape (n, n_features); b: Tensor of shape (m, n_features).

    Returns:
        Tensor of shape (n, m).
    """
    return harmonic_weights(sa, sb).to(a.device) * _sq_dists(a.to(torch.float64), b.to(torch.float64))


def gram_pair_costs(gram: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
    """:func:`pair_costs` between the first ``len(sa)`` points and the next ``len(sb)``, from their Gram matrix."""
    wa = len(sa)
    d = gram_sq_dists(gram, slice(0, wa), slice(wa, wa + len(sb)))
    return harmonic_weights(sa, sb).to(d.device) * d


def distance_pair_costs(gram: Tensor, residual: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
    """The reference implementation's pair cost (unsquared), between the first ``len(sa)`` neurons and the next.

    For neurons a, b with projections Pa, Pb onto what the fused level can produce (``gram`` their Gram
    matrix) and residuals ‖(I − P)·‖² (``residual``), the fused neuron's best output is
    T = (s_a Pa + s_b Pb) / (s_a + s_b) and the cost s_a‖T − a‖ + s_b‖T − b‖, with
    ‖T − a‖² = (s_b / (s_a + s_b))² ‖P(a − b)‖² + ‖(I − P)a‖². The paper's Eq. 7 squares the norms
    (:func:`gram_pair_costs`; the residuals then do not depend on the pairing); without the squares, a neuron
    the fused level reproduces badly weighs its distances less.

    Example:
        >>> import torch
        >>> from fxfuse._grouping import distance_pair_costs
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # a = (1, 0), b = (0, 2), P = I
        >>> float(distance_pair_costs(g, torch.zeros(2, dtype=torch.float64), torch.ones(1), torch.ones(1)))
        2.23606797749979
    """
    wa = len(sa)
    d2 = gram_sq_dists(gram, slice(0, wa), slice(wa, wa + len(sb)))
    sa, sb = sa.to(d2)[:, None], sb.to(d2)[None, :]
    tot = (sa + sb).clamp_min(1e-300)
    res = residual.to(d2).clamp_min(0.0)
    ra, rb = res[:wa, None], res[None, wa : wa + sb.shape[1]]
    return sa * ((sb / tot) ** 2 * d2 + ra).sqrt() + sb * ((sa / tot) ** 2 * d2 + rb).sqrt()


def hungarian_pairs(cost: Tensor) -> Tensor:
    """Minimum-cost one-to-one matching (scipy's ``linear_sum_assignment``, on the CPU).

    Returns:
        Tensor of shape (n,): ``match[j]`` is the column paired with row j.
    """
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    match = np.empty(cost.shape[0], dtype=np.int64)
    match[rows] = cols
    return torch.from_numpy(match)
