"""The numerical building blocks against reference implementations."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from sklearn.cluster import KMeans

from fxfuse._grouping import hungarian_pairs, pair_costs, weighted_kmeans
from fxfuse._solve import GramStats


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=["explicit", "implicit"])
def eig_route(request, monkeypatch):
    """Both eigen-decompositions of GramStats: torch.linalg.eigh's explicit V, and the implicit V = QS of
    TridiagonalBasis (used on the CPU from IMPLICIT_EIG_MIN columns on, forced here on small problems)."""
    import fxfuse._solve

    monkeypatch.setattr(fxfuse._solve, "IMPLICIT_EIG_MIN", 1 if request.param == "implicit" else 10**9)
    return request.param


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_matches_lstsq(seed, eig_route):
    g = _gen(seed)
    X = torch.randn(300, 20, generator=g, dtype=torch.float64)
    Z = X @ torch.randn(20, 9, generator=g, dtype=torch.float64) + 0.05 * torch.randn(300, 9, generator=g, dtype=torch.float64)
    A = torch.rand(9, 4, generator=g, dtype=torch.float64)
    stats = GramStats()
    for s in range(0, 300, 64):  # batch-by-batch accumulation
        stats.add(X[s : s + 64], Z[s : s + 64])
    lam, V = stats.eig()
    ref = torch.linalg.lstsq(X, Z @ A).solution
    resid = float(((X @ ref - Z @ A) ** 2).sum())
    W, ridge = stats.solve(lam, V, A, ridge=False)  # no ridge: exactly least squares
    torch.testing.assert_close(W, ref, rtol=1e-9, atol=1e-10)
    assert ridge.rss == pytest.approx(resid, rel=1e-8)
    # a well-conditioned problem with signal: cross-validation picks a negligible ridge
    W, ridge = stats.solve(lam, V, A)
    assert ridge.relative < 1e-3
    torch.testing.assert_close(W, ref, rtol=1e-3, atol=1e-4)
    assert ridge.rss == pytest.approx(float(((X @ W - Z @ A) ** 2).sum()), rel=1e-8)


def test_closed_form_rank_deficient_matches_pinv(eig_route):
    g = _gen(5)
    B = torch.randn(200, 6, generator=g, dtype=torch.float64)
    X = torch.cat([B, B[:, :3] * 2.0], 1)  # rank 6 of 9 columns
    T = torch.randn(200, 3, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, T)
    lam, V = stats.eig()
    assert lam.shape[0] == 6
    W, _ = stats.solve(lam, V, torch.eye(3, dtype=torch.float64), ridge=False)
    torch.testing.assert_close(W, torch.linalg.pinv(X) @ T, rtol=1e-8, atol=1e-9)


def _explicit_gcv(X, R0, mu):
    H = X @ torch.linalg.solve(X.T @ X + mu * torch.eye(X.shape[1], dtype=X.dtype), X.T)
    rss = float(((R0 - H @ R0) ** 2).sum())
    return rss / (X.shape[0] - float(H.trace())) ** 2


def test_ridge_is_the_generalised_cross_validation_minimum(eig_route):
    from fxfuse._solve import RIDGE_GRID

    g = _gen(2)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 12, dtype=torch.float64)
    T = X @ torch.randn(12, 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(40, 2, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, T)
    lam, V = stats.eig()
    _, ridge = stats.solve(lam, V, torch.eye(2, dtype=torch.float64))
    lmax = float(lam.max())
    scores = [_explicit_gcv(X, T, r * lmax) for r in RIDGE_GRID]
    assert ridge.relative == RIDGE_GRID[min(range(len(scores)), key=scores.__getitem__)]
    assert 1e-9 < ridge.relative < 1  # noise in the small directions: a real ridge


def test_regularised_solve_beats_the_cut_off_on_held_out_rows(eig_route):
    # underdetermined, as deep conv levels are (400 samples x 2 x 2 positions for 4,609 columns): activations
    # with a decaying spectrum, targets that depend on them plus noise
    g = _gen(11)
    d, n_fit, n_test = 120, 80, 400
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(0, -4, d, dtype=torch.float64)

    def rows(n):
        return (torch.randn(n, d, generator=g, dtype=torch.float64) * spectrum) @ basis.T

    W_true = torch.randn(d, 5, generator=g, dtype=torch.float64)
    X, Xt = rows(n_fit), rows(n_test)
    T = X @ W_true + 0.02 * torch.randn(n_fit, 5, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, T)
    lam, V = stats.eig()
    eye = torch.eye(5, dtype=torch.float64)
    W_cut, _ = stats.solve(lam, V, eye, ridge=False)  # the old solve: pseudo-inverse with the 1e-12 cut-off
    W_gcv, ridge = stats.solve(lam, V, eye)
    err_cut = float(((Xt @ W_cut - Xt @ W_true) ** 2).sum())
    err_gcv = float(((Xt @ W_gcv - Xt @ W_true) ** 2).sum())
    assert ridge.relative > 1e-12
    assert err_gcv < 0.5 * err_cut


def test_grouping_gram_is_the_gram_of_the_ridge_fitted_neurons(eig_route):
    g = _gen(1)
    X = torch.randn(100, 7, generator=g, dtype=torch.float64)
    Z = X @ torch.randn(7, 5, generator=g, dtype=torch.float64) + torch.randn(100, 5, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, Z)
    lam, V = stats.eig()
    gram, ridge = stats.grouping_gram(lam, V)
    HZ = X @ torch.linalg.solve(X.T @ X + ridge.mu * torch.eye(7, dtype=torch.float64), X.T @ Z)
    torch.testing.assert_close(gram, HZ.T @ HZ, rtol=1e-8, atol=1e-9)


def test_hf_costs_from_the_gram_matrix_equal_the_explicit_pair_costs():
    from fxfuse._grouping import gram_pair_costs

    g = _gen(3)
    a, b = torch.randn(5, 30, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    sa, sb = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    P = torch.cat([a, b])
    torch.testing.assert_close(gram_pair_costs(P @ P.T, sa, sb), pair_costs(a, b, sa, sb), rtol=1e-10, atol=1e-10)


def test_pinv_rank_keeps_what_torch_pinv_keeps_for_float32_rows(eig_route):
    # float32 rows with singular values from 1 down to 1e-6: torch.linalg.pinv's default cut-off
    # (max(n, d) · eps(float32) · σ_max, about 1e-5 here) drops the smallest directions; the solve on the kept
    # ones is pinv(X) @ T, the minimum-norm solution there
    g = _gen(7)
    n, d = 90, 40
    U = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))[0]
    Vt = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    X = ((U * torch.logspace(0, -6, d, dtype=torch.float64)) @ Vt).to(torch.float32)
    T = torch.randn(n, 3, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, T)
    lam, V = stats.eig()
    lam_k, V_k = stats.pinv_rank(lam, V)
    sv = torch.linalg.svdvals(X.double())
    expected = int((sv > max(n, d) * torch.finfo(torch.float32).eps * sv.max()).sum())
    assert 0 < lam_k.numel() == expected < lam.numel()
    W, ridge = stats.solve(lam_k, V_k, torch.eye(3, dtype=torch.float64), ridge=False)
    ref = torch.linalg.pinv(X.double(), rtol=max(n, d) * torch.finfo(torch.float32).eps) @ T
    # through XᵀX, whose kept eigenvalues span 1e-10: agreement to 1e-5 of the largest entry (one direction
    # kept or dropped wrongly would differ by its whole 1 / σ share)
    torch.testing.assert_close(W, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert ridge.mu == 0.0
    gram, _ = stats.grouping_gram(lam_k, V_k, ridge=False)  # the Gram of the projected neurons
    PT = X.double() @ ref
    torch.testing.assert_close(gram, PT.T @ PT, rtol=0, atol=1e-6 * float((PT.T @ PT).abs().max()))


def test_diagonal_pinv_solve_is_each_channels_torch_pinv_solution():
    # DiagonalStats (depthwise convs, per-channel norms and scales) with regularisation="pinv": channel by channel
    # the minimum-norm solution at torch.linalg.pinv's default cut-off for the rows' float32, ignoring W0
    from fxfuse._solve import DiagonalStats

    g = _gen(8)
    n, channels, d = 90, 3, 12
    X = torch.empty(n, channels, d, dtype=torch.float64)
    for c in range(channels):  # singular values 1 … 10^-(c + 5): each channel keeps its own number of directions
        U = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))[0]
        Vt = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        X[:, c] = (U * torch.logspace(0, -(c + 5), d, dtype=torch.float64)) @ Vt
    X = X.to(torch.float32)
    T = torch.randn(n, channels, generator=g, dtype=torch.float64)
    stats = DiagonalStats()
    stats.add(X[:50], T[:50])
    stats.add(X[50:], T[50:])
    W0 = torch.randn(d, channels, generator=g, dtype=torch.float64)
    W, rss, t2, ridge = stats.solve(W0, "pinv")
    rtol = max(n, d) * torch.finfo(torch.float32).eps
    total = 0.0
    for c in range(channels):
        ref = torch.linalg.pinv(X[:, c].double(), rtol=rtol) @ T[:, c : c + 1]
        torch.testing.assert_close(W[:, c : c + 1], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
        total += float(((X[:, c].double() @ ref - T[:, c : c + 1]) ** 2).sum())
        kept = int((torch.linalg.svdvals(X[:, c].double()) > rtol * torch.linalg.svdvals(X[:, c].double())[0]).sum())
        assert 0 < kept < d  # the cut-off matters in every channel
    assert abs(rss - total) <= 1e-6 * total and ridge == 0.0
    W_gcv = stats.solve(W0)[0]
    assert not torch.allclose(W_gcv, W)  # the default is another solve


def test_distance_pair_costs_equal_the_explicit_unsquared_costs():
    from fxfuse._grouping import distance_pair_costs

    g = _gen(4)
    X = torch.randn(60, 8, generator=g, dtype=torch.float64)
    a, b = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randn(60, 6, generator=g, dtype=torch.float64)
    sa, sb = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    Z = torch.cat([a, b], 1)
    P = X @ torch.linalg.pinv(X)
    PZ = P @ Z
    explicit = torch.empty(5, 6, dtype=torch.float64)
    for j in range(5):
        for k in range(6):
            t = (sa[j] * PZ[:, j] + sb[k] * PZ[:, 5 + k]) / (sa[j] + sb[k])  # the fused neuron's best output
            explicit[j, k] = sa[j] * (t - a[:, j]).norm() + sb[k] * (t - b[:, k]).norm()
    residual = (Z * Z).sum(0) - (PZ * PZ).sum(0)
    torch.testing.assert_close(distance_pair_costs(PZ.T @ PZ, residual, sa, sb), explicit, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_kernel_kmeans_equals_lloyd_on_the_explicit_points(seed):
    from fxfuse._grouping import kernel_kmeans

    rng = np.random.default_rng(seed)
    pts = np.concatenate([c + rng.normal(size=(15, 40)) for c in rng.normal(scale=2.0, size=(5, 40))])
    w = rng.uniform(0.05, 3.0, size=len(pts))
    # a start with a fifth of the points in a wrong cluster (a random start makes near-equal centres, where
    # floating-point ties, not the algorithm, decide)
    init = np.repeat(np.arange(5), 15)
    wrong = rng.random(len(pts)) < 0.2
    init[wrong] = rng.integers(0, 5, size=int(wrong.sum()))
    centers = np.stack([np.average(pts[init == c], axis=0, weights=w[init == c]) for c in range(5)])
    ref = KMeans(n_clusters=5, init=centers, n_init=1, tol=0.0, max_iter=300, algorithm="lloyd").fit(pts, sample_weight=w)
    P = torch.tensor(pts)
    labels, inertia = kernel_kmeans(P @ P.T, torch.tensor(w), 5, init=torch.tensor(init))
    assert torch.equal(labels, torch.tensor(ref.labels_, dtype=torch.long))
    assert inertia == pytest.approx(ref.inertia_, rel=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_kernel_lloyd_with_many_clusters_equals_sklearn(seed):
    """30 clusters, a few of them changed per step: the scores kept between steps (recomputed only for the
    clusters that changed) give sklearn's Lloyd labels and objective."""
    from fxfuse._grouping import kernel_kmeans

    rng = np.random.default_rng(10 + seed)
    pts = np.concatenate([c + rng.normal(size=(8, 10)) for c in rng.normal(scale=1.0, size=(30, 10))])
    w = rng.uniform(0.05, 3.0, size=len(pts))
    init = np.repeat(np.arange(30), 8)
    wrong = rng.random(len(pts)) < 0.2
    init[wrong] = rng.integers(0, 30, size=int(wrong.sum()))
    assert len(set(init.tolist())) == 30
    centers = np.stack([np.average(pts[init == c], axis=0, weights=w[init == c]) for c in range(30)])
    ref = KMeans(n_clusters=30, init=centers, n_init=1, tol=0.0, max_iter=300, algorithm="lloyd").fit(pts, sample_weight=w)
    assert ref.n_iter_ >= 6  # several steps after the first
    P = torch.tensor(pts)
    labels, inertia = kernel_kmeans(P @ P.T, torch.tensor(w), 30, init=torch.tensor(init))
    assert torch.equal(labels, torch.tensor(ref.labels_, dtype=torch.long))
    assert inertia == pytest.approx(ref.inertia_, rel=1e-9)


def test_seeding_labels_points_by_their_nearest_centre():
    """The seeding's last step (nearest chosen centre per point, computed centres-by-points from Gram rows)
    equals the first index within the tie tolerance of the points-by-centres distances, also when the Gram
    matrix is not bitwise symmetric and when points coincide."""
    from fxfuse._grouping import _near_min, _nearest_centres, gram_sq_dists

    g = _gen(4)
    P = torch.randn(60, 5, generator=g, dtype=torch.float64)
    P[10:20] = P[0]  # coincident points: ties decided by the first centre
    gram = P @ P.T
    skewed = gram + 1e-3 * torch.randn(60, 60, generator=g, dtype=torch.float64)  # not symmetric
    idx = torch.stack([torch.randperm(60, generator=g)[:15] for _ in range(3)])
    idx[0, 3], idx[0, 9] = 0, 12  # two centres at the same point
    for gm in (gram, skewed):
        # the first centre within the tolerance of the nearest, points by centres
        want = torch.stack([_near_min(gram_sq_dists(gm, slice(None), c), 1).to(torch.int8).argmax(1)
                            for c in idx])
        for block in (None, 7, 16):  # one block, and blocks of points (the last one shorter)
            assert torch.equal(_nearest_centres(gm, idx, block), want)


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


def test_kmeans_with_more_clusters_than_distinct_points_leaves_none_empty():
    # coincident points (dead neurons, a model fused with itself) give clusters that cost nothing: refilling an
    # empty cluster must not empty another one (the old rule went round until max_iter and ended with one empty)
    from fxfuse._grouping import _kernel_kmeans_pp, _kernel_lloyd

    g = _gen(3)
    P = torch.randn(50, 40, generator=g, dtype=torch.float64)
    P[5] = P[3]
    P[7] = P[3]
    w = torch.rand(50, generator=g, dtype=torch.float64)
    w[10] = 0
    gram = P @ P.T
    start = _kernel_kmeans_pp(gram, w, 49, torch.Generator().manual_seed(3))[0]
    labels, inertia = _kernel_lloyd(gram, w, start, 49, max_iter=300)
    assert torch.bincount(labels, minlength=49).min() == 1  # every cluster used: 48 singletons and one pair
    assert inertia < 1e-10 * float(gram.diagonal().max())
    # the same from 1,500 dead neurons and 500 live pairs (k = 1,000)
    live = torch.randn(500, 8, generator=g, dtype=torch.float64)
    Q = torch.cat([torch.zeros(1000, 8, dtype=torch.float64), live, live])
    labels, inertia = _kernel_lloyd(Q @ Q.T, torch.ones(2000, dtype=torch.float64),
                                    _kernel_kmeans_pp(Q @ Q.T, torch.ones(2000, dtype=torch.float64), 1000,
                                                      torch.Generator().manual_seed(0))[0], 1000, max_iter=300)
    assert torch.bincount(labels, minlength=1000).min() >= 1 and inertia < 1e-9


def test_weighted_kmeans_bad_arguments():
    with pytest.raises(ValueError, match="k must be between 1 and"):
        weighted_kmeans(torch.randn(3, 2), torch.ones(3), 4)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_kmeans(torch.randn(3, 2), -torch.ones(3), 2)


def test_closed_form_with_start_weights_fits_the_same_and_keeps_undetermined_directions(eig_route):
    g = _gen(7)
    B = torch.randn(200, 5, generator=g, dtype=torch.float64)
    X = torch.cat([B, torch.zeros(200, 2, dtype=torch.float64)], 1)  # two inputs never active
    T = torch.randn(200, 3, generator=g, dtype=torch.float64)
    W0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    stats = GramStats()
    stats.add(X, T)
    lam, V = stats.eig()
    eye = torch.eye(3, dtype=torch.float64)
    (W_min, _), (W_start, _) = stats.solve(lam, V, eye, ridge=False), stats.solve(lam, V, eye, W0=W0, ridge=False)
    torch.testing.assert_close(X @ W_start, X @ W_min)  # the same fit on the data
    torch.testing.assert_close(W_start[5:], W0[5:])  # unseen inputs keep the start
    torch.testing.assert_close(W_min[5:], torch.zeros(2, 3, dtype=torch.float64))
    # with the cross-validated ridge (here large: T is noise) the unseen inputs still keep the start
    W_ridge, ridge = stats.solve(lam, V, eye, W0=W0)
    assert ridge.relative > 1e-3
    torch.testing.assert_close(W_ridge[5:], W0[5:])


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


def test_implicit_eigenbasis_equals_torch_eigh_on_an_ill_conditioned_gram():
    import fxfuse._solve
    from fxfuse._solve import TridiagonalBasis

    g = _gen(9)
    X = torch.randn(400, 90, generator=g, dtype=torch.float64) * torch.logspace(0, -6, 90, dtype=torch.float64)
    G = X.T @ X
    lam, V = TridiagonalBasis.eigh(G)
    ref = torch.linalg.eigvalsh(G)
    torch.testing.assert_close(lam, ref, rtol=0, atol=1e-13 * float(ref.max()))
    M = torch.randn(90, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(V.T @ (V @ M), M, rtol=0, atol=1e-12)  # orthogonal
    torch.testing.assert_close(V @ (lam[:, None] * (V.T @ M)), G @ M, rtol=0, atol=1e-12 * float(ref.max()))
    assert V[:, lam > 1e-3].shape == (90, int((lam > 1e-3).sum()))
    # GramStats picks it from IMPLICIT_EIG_MIN columns on (the CPU, float64)
    stats = GramStats()
    stats.add(X, X[:, :3])
    assert isinstance(stats.eig()[1], torch.Tensor) and fxfuse._solve.IMPLICIT_EIG_MIN > 90


def test_a_failed_tridiagonal_solve_falls_back_to_torch_eigh(monkeypatch):
    import fxfuse._solve
    from fxfuse._solve import TridiagonalBasis, symmetric_eig

    def fail(M):
        raise np.linalg.LinAlgError("stevd did not converge")  # what scipy raises

    monkeypatch.setattr(fxfuse._solve, "IMPLICIT_EIG_MIN", 1)
    G = torch.randn(30, 8, generator=_gen(2), dtype=torch.float64)
    G = G.T @ G
    assert isinstance(symmetric_eig(G)[1], TridiagonalBasis)
    monkeypatch.setattr(TridiagonalBasis, "eigh", staticmethod(fail))
    lam, V = symmetric_eig(G)
    assert isinstance(V, torch.Tensor)
    torch.testing.assert_close(V @ torch.diag(lam) @ V.T, G)


def test_blocked_gram_accumulation_equals_the_full_product():
    from fxfuse._solve import _gram_add_, _symmetrised

    g = _gen(6)
    x = torch.randn(64, 50, generator=g, dtype=torch.float64)
    G = _gram_add_(None, x[:30], block=8)  # 50 ≥ 3 blocks: only the lower triangle is brought up to date
    _gram_add_(G, x[30:], block=8)
    assert not torch.allclose(G, G.T)
    _symmetrised(G, block=8)
    assert torch.equal(G, G.T)
    torch.testing.assert_close(G, x.T @ x, rtol=1e-12, atol=1e-12)


def test_dual_form_with_fewer_rows_than_columns_equals_the_gram_form():
    g = _gen(4)
    X = torch.randn(30, 50, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 50, dtype=torch.float64)
    Z = X @ torch.randn(50, 6, generator=g, dtype=torch.float64) + 0.1 * torch.randn(30, 6, generator=g, dtype=torch.float64)
    A = torch.rand(6, 3, generator=g, dtype=torch.float64)
    W0 = torch.randn(50, 3, generator=g, dtype=torch.float64)
    dual, primal = GramStats(), GramStats(keep_rows_bytes=0)
    for s in range(0, 30, 8):
        dual.add(X[s : s + 8], Z[s : s + 8])
        primal.add(X[s : s + 8], Z[s : s + 8])
    assert dual.X is not None and dual.G is None and primal.G is not None  # rows kept only in the dual form
    (ld, Vd), (lp, Vp) = dual.eig(), primal.eig()
    torch.testing.assert_close(ld, lp, rtol=1e-9, atol=1e-12)
    Wd, rd = dual.solve(ld, Vd, A, W0=W0)
    Wp, rp = primal.solve(lp, Vp, A, W0=W0)
    torch.testing.assert_close(Wd, Wp, rtol=1e-7, atol=1e-9)
    assert rd.relative == rp.relative
    torch.testing.assert_close(dual.grouping_gram(ld, Vd)[0], primal.grouping_gram(lp, Vp)[0], rtol=1e-7, atol=1e-9)
    # past as many rows as columns the rows are dropped for G
    dual.add(X, Z)
    assert dual.X is None and dual.G is not None


def _small_vgg() -> nn.Module:
    """Convs, in-place ReLUs and max pooling after them: captum's DeepLift max-pool rule mixes the input and
    baseline halves' gradients."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


@pytest.mark.parametrize("arch", ["test_resnet", "vgg"])
@pytest.mark.parametrize("importance", ["conductance", "deeplift"])
def test_scores_of_every_level_at_once_equal_captum_layer_by_layer(importance, arch):
    """node_scores computes conductance and DeepLift at all taps from one set of passes; captum's
    LayerConductance / LayerDeepLift, one tap at a time (fxfuse._importance._attribute, the per-tap route), is
    the oracle. A timm ResNet with in-place ReLUs after the taps, and a VGG-like net with max pooling after
    them; several batches."""
    import timm

    import fxfuse
    from fxfuse._importance import _as_data, _attribute, _tapped, node_scores
    from fxfuse.passes import partition_levels

    torch.manual_seed(0)
    if arch == "vgg":
        model = _small_vgg().eval()
    else:
        model = timm.create_model("test_resnet", pretrained=False, num_classes=5, in_chans=1).eval()
    x = torch.randn(24, 1, 16, 16, generator=_gen(1))
    y = torch.randint(0, 5, (24,), generator=_gen(2))
    plan = partition_levels(fxfuse.trace(model, x[:2]))
    taps = [(lv.output, lv.neuron_axis) for lv in plan]
    assert len(taps) >= 2
    got = node_scores(plan.gm, taps, (x, y), importance, n_steps=7, batch_size=10)
    tapped = _tapped(plan.gm, [name for name, _ in taps])
    for k, ((_, axis), score) in enumerate(zip(taps, got)):
        ref = _attribute(tapped, tapped.get_submodule(f"fxfuse_tap_{k}"), axis, score.shape[0], _as_data((x, y)),
                         importance, 7, 10, None)
        # float32 passes, channels-last here and not in captum's: rounding-level differences on the smallest scores
        torch.testing.assert_close(score, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        assert float(ref.std()) > 0  # not the floor alone


def test_conductance_by_default_integrates_in_the_reference_implementations_ten_steps():
    """The reference implementation scores conductance with captum's LayerConductance at n_steps=10; so do
    node_scores and fuse by default. Captum at 10 steps (the per-tap route) is the oracle; at 20 steps the
    scores differ by more than the tolerance, so the test fails for any other default."""
    import fxfuse
    from fxfuse._config import make_config
    from fxfuse._importance import _as_data, _attribute, _tapped, node_scores
    from fxfuse.passes import partition_levels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(40, 6, generator=_gen(5))
    y = torch.randint(0, 4, (40,), generator=_gen(6))
    plan = partition_levels(fxfuse.trace(model, x[:2]))
    taps = [(plan[0].output, plan[0].neuron_axis)]
    (got,) = node_scores(plan.gm, taps, (x, y), "conductance")
    tapped = _tapped(plan.gm, [taps[0][0]])
    layer = tapped.get_submodule("fxfuse_tap_0")
    ref, other = (_attribute(tapped, layer, taps[0][1], got.shape[0], _as_data((x, y)), "conductance", steps, 128,
                             None) for steps in (10, 20))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert float((other - ref).abs().max()) > 1e-3 * float(ref.abs().max())  # the step count shows in the scores
    assert make_config("kf-linear", importance="conductance").importance_steps == 10


@pytest.mark.parametrize("importance,copies", [("conductance", 11), ("deeplift", 4)])
def test_scoring_passes_are_cut_to_the_activation_budget(monkeypatch, importance, copies):
    """Each attribution pass keeps at most SCORE_PASS_BYTES of activations (estimated from the traced shapes):
    with a budget of 7 samples' copies the 40 samples run in passes of 7 (6 passes), and the scores are those
    of one pass of all 40."""
    import timm

    import fxfuse
    import fxfuse._importance as imp_mod
    from fxfuse.passes import partition_levels

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5, in_chans=1).eval()
    x = torch.randn(40, 1, 16, 16, generator=_gen(7))
    y = torch.randint(0, 5, (40,), generator=_gen(8))
    plan = partition_levels(fxfuse.trace(model, x[:2]))
    taps = [(lv.output, lv.neuron_axis) for lv in plan]

    class Count:
        n = 0

        def update(self, k):
            self.n += k

    whole, passes = Count(), Count()
    ref = imp_mod.node_scores(plan.gm, taps, (x, y), importance, batch_size=128, progress=whole)
    assert whole.n == 1
    per_sample = imp_mod.sample_bytes(plan.gm)
    assert per_sample > 16 * 16 * 4  # at least the stem's output
    monkeypatch.setattr(imp_mod, "SCORE_PASS_BYTES", 7 * copies * per_sample)
    assert imp_mod.scoring_batch(plan.gm, importance, 128) == 7
    got = imp_mod.node_scores(plan.gm, taps, (x, y), importance, batch_size=128, progress=passes)
    assert passes.n == 6
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


class _ViewNet(nn.Module):
    """Flattens a conv output with ``.view``, which fails on a channels-last tensor."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(256, 3)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("importance", ["conductance", "deeplift"])
def test_scores_of_a_model_that_cannot_run_channels_last_are_computed_in_the_standard_format(importance):
    import copy

    import fxfuse
    from fxfuse._importance import _as_data, _attribute, _tapped, node_scores
    from fxfuse.passes import partition_levels

    torch.manual_seed(0)
    model = _ViewNet().eval()
    x = torch.randn(12, 1, 8, 8, generator=_gen(3))
    y = torch.randint(0, 3, (12,), generator=_gen(4))
    with pytest.raises(RuntimeError):  # the case the probe exists for
        copy.deepcopy(model).to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    plan = partition_levels(fxfuse.trace(model, x[:2]))
    taps = [(lv.output, lv.neuron_axis) for lv in plan]
    got = node_scores(plan.gm, taps, (x, y), importance, n_steps=5)
    tapped = _tapped(plan.gm, [name for name, _ in taps])
    for k, ((_, axis), score) in enumerate(zip(taps, got)):
        ref = _attribute(tapped, tapped.get_submodule(f"fxfuse_tap_{k}"), axis, score.shape[0], _as_data((x, y)),
                         importance, 5, 128, None)
        torch.testing.assert_close(score, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("importance", ["conductance", "deeplift"])
def test_node_scores_leave_the_scored_graph_module_as_it_was(importance):
    """The scoring passes run on a tapped module that shares the GraphModule's parameters: the module keeps its
    graph, values and (training) mode, and a module in training mode is scored in eval mode, as one in eval mode."""
    import fxfuse
    from fxfuse._importance import node_scores
    from fxfuse.passes import partition_levels

    torch.manual_seed(0)
    x = torch.randn(20, 1, 16, 16, generator=_gen(4))
    vgg = _small_vgg()
    model = nn.Sequential(*vgg[:-1], nn.Dropout(0.5), vgg[-1])  # scored in train mode: random
    plan = partition_levels(fxfuse.trace(model, x[:2]))
    gm, taps = plan.gm, [(lv.output, lv.neuron_axis) for lv in plan]
    code, values = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    in_eval = node_scores(gm, taps, x, importance, batch_size=8, target="own")
    gm.train()
    in_train = node_scores(gm, taps, x, importance, batch_size=8, target="own")
    assert all(m.training for m in gm.modules())
    assert gm.code == code and not any(str(n.target).startswith("fxfuse_tap") for n in gm.graph.nodes)
    assert gm.state_dict().keys() == values.keys() and all(torch.equal(v, values[k]) for k, v in gm.state_dict().items())
    for a, b in zip(in_eval, in_train):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


def test_node_scores_rejects_an_unknown_importance():
    import fxfuse
    from fxfuse._importance import node_scores

    gm = fxfuse.trace(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown importance 'shap'.*conductance"):
        node_scores(gm, [("_0", 1)], (torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), "shap")
    with pytest.raises(ValueError, match="unknown target 'pred'"):  # uniform scores need no target, but a typo fails
        node_scores(gm, [("_0", 1)], torch.randn(4, 4), "uniform", target="pred")


@pytest.mark.parametrize("importance", ["conductance", "deeplift"])
def test_own_target_attributes_each_sample_to_the_models_own_prediction(importance):
    """target="own" needs no labels: its scores are those of the labelled route with the model's own argmax as the
    labels (to rounding: the same passes), and not those of other labels."""
    import fxfuse
    from fxfuse._importance import node_scores
    from fxfuse.passes import partition_levels

    torch.manual_seed(0)
    model = _small_vgg().eval()
    x = torch.randn(24, 1, 16, 16, generator=_gen(3))
    plan = partition_levels(fxfuse.trace(model, x[:2]))
    taps = [(lv.output, lv.neuron_axis) for lv in plan]
    with torch.no_grad():
        predicted = model(x).argmax(1)
    assert predicted.unique().numel() > 1  # the predictions are not all one class
    own = node_scores(plan.gm, taps, x, importance, batch_size=10, target="own")
    as_labels = node_scores(plan.gm, taps, (x, predicted), importance, batch_size=10)
    other = node_scores(plan.gm, taps, (x, (predicted + 1) % 5), importance, batch_size=10)
    for s, ref, o in zip(own, as_labels, other):
        torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
        assert not torch.allclose(s, o, rtol=1e-3)
    with pytest.raises(ValueError, match="target='labels' needs labels.*target='own'"):
        node_scores(plan.gm, taps, x, importance)
    with pytest.raises(ValueError, match="unknown target 'pred'"):
        node_scores(plan.gm, taps, x, importance, target="pred")
