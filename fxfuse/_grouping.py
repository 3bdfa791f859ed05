"""Grouping neurons: Hungarian matching (HF) and importance-weighted k-means (KF).

Neurons are the points: a neuron's features are the values it takes over the
fusion samples (or their coordinates in the span of the fused level's input,
for closed-form levels). Reference: "Model Fusion via Neuron Interpolation",
section 4.3.1 and appendix B.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["Grouping", "weighted_kmeans", "hungarian_pairs", "harmonic_weights", "pair_costs"]


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


def _kmeans_pp(points: Tensor, weights: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Importance-weighted greedy k-means++ seeding.

    Each step samples 2 + ⌊ln k⌋ candidates ∝ s_j · D(z_j)² and keeps the one that
    lowers the weighted potential most (the greedy variant scikit-learn uses).
    """
    n = points.shape[0]
    trials = 2 + int(math.log(k))
    first = torch.multinomial(weights / weights.sum(), 1, generator=gen)
    idx = [int(first)]
    closest = _sq_dists(points, points[idx]).squeeze(1)
    for _ in range(1, k):
        p = weights * closest
        if float(p.sum()) <= 0.0:  # every point coincides with a center: pick unused points
            remaining = torch.ones(n, dtype=torch.bool, device=points.device)
            remaining[idx] = False
            p = remaining.to(points.dtype)
        cand = torch.multinomial(p / p.sum(), min(trials, int((p > 0).sum())), generator=gen)
        new_closest = torch.minimum(closest[None, :], _sq_dists(points[cand], points))
        best = int((new_closest * weights[None, :]).sum(1).argmin())
        idx.append(int(cand[best]))
        closest = new_closest[best]
    return points[idx].clone()


def _lloyd(points: Tensor, weights: Tensor, centers: Tensor, max_iter: int, tol: float) -> tuple[Tensor, Tensor, float]:
    k = centers.shape[0]
    labels = None
    for _ in range(max_iter):
        d = _sq_dists(points, centers)
        new_labels = d.argmin(1)
        # empty clusters take the point that currently costs most
        counts = torch.bincount(new_labels, minlength=k)
        if bool((counts == 0).any()):
            cost = weights * d.gather(1, new_labels[:, None]).squeeze(1)
            for c in torch.nonzero(counts == 0).flatten().tolist():
                j = int(cost.argmax())
                new_labels[j] = c
                cost[j] = -1.0
        wsum = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(0, new_labels, weights)
        new_centers = torch.zeros_like(centers).index_add_(0, new_labels, points * weights[:, None]) / wsum[:, None]
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if labels is not None and torch.equal(labels, new_labels):
            break
        labels = new_labels
        if shift <= tol:
            break
    d = _sq_dists(points, centers)
    labels = d.argmin(1)
    wsum = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(0, labels, weights)
    nonempty = wsum > 0
    centers[nonempty] = (
        torch.zeros_like(centers).index_add_(0, labels, points * weights[:, None])[nonempty] / wsum[nonempty, None]
    )
    inertia = float((weights * ((points - centers[labels]) ** 2).sum(1)).sum())
    return labels, centers, inertia


def weighted_kmeans(
    points: Tensor,
    weights: Tensor,
    k: int,
    *,
    n_init: int = 5,
    max_iter: int = 300,
    tol: float = 1e-10,
    seed: int = 0,
) -> tuple[Tensor, Tensor, float]:
    """Importance-weighted Lloyd k-means with k-means++ seeding and restarts.

    Minimises Σ_j s_j ‖p_j − c_{k_j}‖² and keeps the best of ``n_init`` runs. Runs
    on the points' device in batched ops; deterministic for a given seed.

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
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    if weights.shape != (n,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("weights must be a non-negative Tensor of shape (n_points,) with a positive sum")
    points = points.to(torch.float64)
    weights = weights.to(device=points.device, dtype=torch.float64)
    if k == n:
        return torch.arange(n, device=points.device), points.clone(), 0.0
    gen = torch.Generator(device=points.device).manual_seed(seed)
    best = None
    for _ in range(max(1, n_init)):
        centers = _kmeans_pp(points, weights, k, gen)
        labels, centers, inertia = _lloyd(points, weights, centers, max_iter, tol)
        if best is None or inertia < best[2] - 1e-12 * abs(best[2]):
            best = (labels, centers, inertia)
    return best


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


def hungarian_pairs(cost: Tensor) -> Tensor:
    """Minimum-cost one-to-one matching (scipy's ``linear_sum_assignment``, on the CPU).

    Returns:
        Tensor of shape (n,): ``match[j]`` is the column paired with row j.
    """
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    match = np.empty(cost.shape[0], dtype=np.int64)
    match[rows] = cols
    return torch.from_numpy(match)
