"""The numerical building blocks against reference implementations."""

import itertools

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from fxfuse._grouping import hungarian_pairs, pair_costs, weighted_kmeans
from fxfuse._solve import GramStats


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_matches_lstsq(seed):
    g = _gen(seed)
    X = torch.randn(300, 20, generator=g, dtype=torch.float64)
    Z = torch.randn(300, 9, generator=g, dtype=torch.float64)
    A = torch.rand(9, 4, generator=g, dtype=torch.float64)
    stats = GramStats()
    for s in range(0, 300, 64):  # batch-by-batch accumulation
        stats.add(X[s : s + 64], Z[s : s + 64])
    lam, V = stats.eig()
    W = stats.solve(lam, V, A)
    ref = torch.linalg.lstsq(X, Z @ A).solution
    torch.testing.assert_close(W, ref, rtol=1e-9, atol=1e-10)
    resid = ((X @ ref - Z @ A) ** 2).sum()
    assert stats.residual(lam, V, A) == pytest.approx(float(resid), rel=1e-8)


def test_closed_form_rank_deficient_matches_pinv():
    g = _gen(5)
    B = torch.randn(200, 6, generator=g, dtype=torch.float64)
    X = torch.cat([B, B[:, :3] * 2.0], 1)  # rank 6 of 9 columns
    T = torch.randn(200, 3, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, T)
    lam, V = stats.eig()
    assert lam.shape[0] == 6
    W = stats.solve(lam, V, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(W, torch.linalg.pinv(X) @ T, rtol=1e-8, atol=1e-9)


def test_projected_distances_equal_distances_of_projections():
    g = _gen(1)
    X = torch.randn(100, 7, generator=g, dtype=torch.float64)
    Z = torch.randn(100, 5, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, Z)
    lam, V = stats.eig()
    coords = stats.projected(lam, V)  # (r, n_neurons)
    P = X @ torch.linalg.pinv(X)
    PZ = P @ Z
    torch.testing.assert_close(torch.cdist(coords.T, coords.T), torch.cdist(PZ.T, PZ.T), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_hungarian_matches_brute_force(n):
    g = _gen(n)
    a = torch.randn(n, 8, generator=g, dtype=torch.float64)
    b = torch.randn(n, 8, generator=g, dtype=torch.float64)
    sa, sb = torch.rand(n, generator=g, dtype=torch.float64) + 0.1, torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    cost = pair_costs(a, b, sa, sb)
    match = hungarian_pairs(cost)
    best = min(itertools.permutations(range(n)), key=lambda p: float(cost[torch.arange(n), torch.tensor(p)].sum()))
    got = float(cost[torch.arange(n), match].sum())
    assert got == pytest.approx(float(cost[torch.arange(n), torch.tensor(best)].sum()), rel=1e-12)
    # the pair cost is the weighted grouping error around the weighted centre
    j, k = 0, int(match[0])
    t = (sa[j] * a[j] + sb[k] * b[k]) / (sa[j] + sb[k])
    direct = sa[j] * ((a[j] - t) ** 2).sum() + sb[k] * ((b[k] - t) ** 2).sum()
    assert float(cost[j, k]) == pytest.approx(float(direct), rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_kmeans_no_worse_than_sklearn(seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(6, 5))
    pts = np.concatenate([c + rng.normal(size=(20, 5)) for c in centers])
    w = rng.uniform(0.05, 3.0, size=len(pts))
    ref = KMeans(n_clusters=6, n_init=5, random_state=seed).fit(pts, sample_weight=w)
    labels, ctrs, inertia = weighted_kmeans(torch.tensor(pts), torch.tensor(w), 6, n_init=5, seed=seed)
    assert inertia <= ref.inertia_ * 1.01  # a local optimum at least as good, within 1%
    recomputed = float((torch.tensor(w) * ((torch.tensor(pts) - ctrs[labels]) ** 2).sum(1)).sum())
    assert recomputed == pytest.approx(inertia, rel=1e-10)


def test_weighted_kmeans_is_deterministic_and_weighted():
    pts = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    a = weighted_kmeans(pts, torch.tensor([1.0, 1.0, 1.0]), 2, seed=3)
    b = weighted_kmeans(pts, torch.tensor([1.0, 1.0, 1.0]), 2, seed=3)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    # weights pull the centre: a heavy point dominates its cluster's centre
    labels, ctrs, _ = weighted_kmeans(pts, torch.tensor([9.0, 1.0, 1.0]), 2, seed=0)
    c = ctrs[labels[0]]
    assert float(c) == pytest.approx(0.1)


def test_weighted_kmeans_bad_arguments():
    with pytest.raises(ValueError, match="k must be between 1 and"):
        weighted_kmeans(torch.randn(3, 2), torch.ones(3), 4)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_kmeans(torch.randn(3, 2), -torch.ones(3), 2)


def test_closed_form_with_start_weights_fits_the_same_and_keeps_undetermined_directions():
    g = _gen(7)
    B = torch.randn(200, 5, generator=g, dtype=torch.float64)
    X = torch.cat([B, torch.zeros(200, 2, dtype=torch.float64)], 1)  # two inputs never active
    T = torch.randn(200, 3, generator=g, dtype=torch.float64)
    W0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, T)
    lam, V = stats.eig()
    eye = torch.eye(3, dtype=torch.float64)
    W_min, W_start = stats.solve(lam, V, eye), stats.solve(lam, V, eye, W0=W0)
    torch.testing.assert_close(X @ W_start, X @ W_min)  # the same fit on the data
    torch.testing.assert_close(W_start[5:], W0[5:])  # unseen inputs keep the start
    torch.testing.assert_close(W_min[5:], torch.zeros(2, 3, dtype=torch.float64))


def test_read_affine_matches_the_level_output():
    import fxfuse
    from fxfuse._solve import affine_spec, design_rows, op_input, read_affine, to_rows
    from fxfuse.passes import partition_levels
    from zoo import ConvBN, seeded

    model = seeded(ConvBN).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    plan = partition_levels(fxfuse.trace(model, x))
    for lv, level in zip(plan, plan.split()):
        spec = affine_spec(level)
        assert spec is not None, lv.name
        y = to_rows(level(x), lv.neuron_axis)
        torch.testing.assert_close(design_rows(level, spec, op_input(level, spec, x)) @ read_affine(level, spec), y)
        x = level(x)
