"""Fitting a fused level to its targets: closed form for affine levels, Adam otherwise.

Reference: "Model Fusion via Neuron Interpolation", section 4.3.2 and appendix B.2;
the numerics follow DESIGN.md ("Numerics that make it fast").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule

from fxfuse.passes._affine import AffineSpec, affine_spec

from ._config import TrainConfig

__all__ = [
    "EIG_RTOL",
    "AffineSpec",
    "DiagonalStats",
    "GramStats",
    "Ridge",
    "TridiagonalBasis",
    "affine_params",
    "affine_spec",
    "choose_ridge",
    "diagonal_rows",
    "fit_gradient",
    "from_rows",
    "grouped_sq_norm",
    "read_affine",
    "to_rows",
]

# Eigenvalues of XᵀX below EIG_RTOL · λ_max are numerically zero (float64 rounding of
# the accumulated Gram): their directions are not determined by the data at all.
EIG_RTOL = 1e-12

# candidate ridges μ / λ_max of the generalised cross-validation search (4 per decade)
RIDGE_GRID = tuple(10.0 ** (e / 4) for e in range(-48, 5))


@dataclass(frozen=True)
class Ridge:
    """The ridge chosen for one least-squares problem by generalised cross-validation.

    Attributes:
        mu: The ridge μ added to XᵀX (0: none).
        relative: μ / λ_max.
        dof: Effective degrees of freedom tr H(μ) = Σ λ_i / (λ_i + μ) (per output).
        rss: Residual sum of squares of the ridge fit on the fusion rows.
    """

    mu: float
    relative: float
    dof: float
    rss: float


def choose_ridge(lam: Tensor, q: Tensor, r_perp: float, n: int) -> Ridge:
    """Ridge μ minimising the generalised cross-validation score of Golub, Heath and Wahba (1979).

    For the least-squares problem min ‖R₀ − XΔ‖² + μ‖Δ‖² (Δ = W − W₀, R₀ = T − XW₀)
    with XᵀX = V diag(λ) Vᵀ (only λ_i > 0), q_i = ‖(VᵀXᵀR₀)_i‖² summed over outputs and
    r_perp = ‖R₀‖² − Σ q_i / λ_i (the unregularised residual):

        RSS(μ) = r_perp + Σ_i (μ / (λ_i + μ))² q_i / λ_i
        GCV(μ) = RSS(μ) / (n − Σ_i λ_i / (λ_i + μ))²

    which are sums of positive terms (no cancellation). μ is searched over
    λ_max · 10^(−12 … 1), four values per decade. GCV approximates leave-one-out
    error from the eigen-decomposition alone; it needs no extra pass over the data.

    Args:
        lam: Positive eigenvalues of XᵀX, Tensor of shape (r,).
        q: Tensor of shape (r,).
        r_perp: The unregularised residual (clamped at 0).
        n: Rows of X.

    Example:
        >>> import torch
        >>> from fxfuse._solve import choose_ridge
        >>> r = choose_ridge(torch.tensor([4.0, 1.0, 1e-6], dtype=torch.float64),
        ...                  torch.tensor([16.0, 1.0, 1e-6], dtype=torch.float64), 5.0, 50)
        >>> 0 < r.relative < 1
        True
    """
    lam = lam.to(torch.float64)
    lmax = lam.max()[None] if lam.numel() else torch.ones(1, dtype=torch.float64, device=lam.device)
    best, mu, rss, dof = _gcv(lam[None], q[None] / lam[None], torch.ones_like(lam, dtype=torch.bool)[None],
                              torch.tensor([max(r_perp, 0.0)], dtype=torch.float64, device=lam.device), n, lmax)
    return Ridge(float(mu[0]), float(RIDGE_GRID[int(best[0])]), float(dof[0]), float(rss[0]))


def _gcv(lam: Tensor, q_over: Tensor, valid: Tensor, r_perp: Tensor, n: int, lmax: Tensor):
    """:func:`choose_ridge` for a batch of problems: eigenvalues ``lam`` (B, r) of which ``valid`` count,
    q_i / λ_i, the unregularised residuals (B,), their λ_max (B,). Returns the chosen grid index, μ, RSS(μ) and
    the effective degrees of freedom, each of shape (B,)."""
    lam_s = torch.where(valid, lam, torch.ones_like(lam))
    mus = torch.tensor(RIDGE_GRID, dtype=lam.dtype, device=lam.device)[None, :] * lmax[:, None]  # (B, grid)
    frac = mus[:, :, None] / (lam_s[:, None, :] + mus[:, :, None]) * valid[:, None, :]  # μ / (λ_i + μ)
    rss = r_perp[:, None] + (frac**2 * (q_over * valid)[:, None, :]).sum(2)
    resid_dof = (n - valid.sum(1))[:, None] + frac.sum(2)  # n − Σ λ_i / (λ_i + μ)
    gcv = torch.where(resid_dof > 0.5, rss / resid_dof.clamp_min(1e-300) ** 2, torch.full_like(rss, float("inf")))
    best = gcv.argmin(1)
    pick = best[:, None]
    dof = valid.sum(1) - frac.gather(1, pick[:, :, None].expand(-1, 1, frac.shape[2]))[:, 0].sum(1)
    return best, mus.gather(1, pick)[:, 0], rss.gather(1, pick)[:, 0], dof


def to_rows(z: Tensor, axis: int | tuple[int, ...]) -> Tensor:
    """Move the neuron axis last and flatten the rest into rows: (n_rows, width). With a tuple of axes (an
    attention output's heads and head dims), those axes in that order are the neurons."""
    if isinstance(axis, tuple):
        n = len(axis)
        return z.movedim(axis, tuple(range(-n, 0))).reshape(-1, math.prod(z.shape[a] for a in axis))
    return z.movedim(axis, -1).reshape(-1, z.shape[axis])


def from_rows(rows: Tensor, like_shape: tuple[int, ...], axis: int) -> Tensor:
    """Inverse of :func:`to_rows` for a tensor of shape ``like_shape`` (batch may differ)."""
    moved = list(like_shape)
    width = moved.pop(axis)
    return rows.reshape(-1, *moved[1:], width).movedim(-1, axis)


def op_input(level: GraphModule, spec: AffineSpec, x: Tensor) -> Tensor:
    """The tensor the level's affine op receives when the level gets ``x`` (the level runs only as far as that
    tensor: not the op itself, nor what follows it)."""
    from ._collect import Capture

    source = next(n for n in level.graph.nodes if n.name == spec.op_node).args[0]
    cap = Capture(level, {source.name}, stop=True)
    cap.capture(x)
    return cap.values[source.name]


def design_rows(level: GraphModule, spec: AffineSpec, op_in: Tensor) -> Tensor:
    """Rows of the design matrix X: (n_rows, fan_in [+ 1 bias column]), matching :func:`to_rows`."""
    m = level.get_submodule(spec.op)
    if spec.is_conv:
        cols = F.unfold(op_in, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = op_in.reshape(-1, op_in.shape[-1])
    if spec.has_bias_column:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], 1)
    return rows


def diagonal_rows(level: GraphModule, spec: AffineSpec, op_in: Tensor) -> Tensor:
    """A depthwise or grouped conv's design, one per group: Tensor of shape (n_rows, groups, d).

    d is a group's fan-in (channels per group × k²) [+ 1 bias column]; a depthwise conv
    has one group per channel. Row order matches :func:`to_rows` of the conv's output
    (samples, then positions).
    """
    if spec.channel is not None:  # a per-channel affine: per channel, its (normalised) input (and 1)
        c = spec.channel
        if c.kind == "layer_norm":
            op_in = F.layer_norm(op_in, op_in.shape[-1:], None, None, c.eps)
        elif c.kind == "group_norm":
            op_in = F.group_norm(op_in, 1, None, None, c.eps)
        rows = to_rows(op_in, c.axis)[..., None]
        return torch.cat([rows, torch.ones_like(rows)], 2) if spec.has_bias_column else rows
    m = level.get_submodule(spec.op)
    cols = F.unfold(op_in, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (N, C·k², L)
    n, _, positions = cols.shape
    rows = cols.view(n, m.groups, -1, positions).permute(0, 3, 1, 2).reshape(n * positions, m.groups, -1)
    if spec.has_bias_column:
        rows = torch.cat([rows, torch.ones_like(rows[..., :1])], 2)
    return rows


class DiagonalStats:
    """Second moments of a block-diagonal least-squares problem (a depthwise or grouped conv): one small problem
    per group, whose m outputs read only that group's inputs.

    For group g, with design rows X_g (n_rows, d) and targets T_g (n_rows, m), accumulates G_g = X_gᵀX_g,
    B_g = X_gᵀT_g and the targets' squared norms batch by batch in float64. Memory is groups × d × (d + m),
    whatever the rows. A depthwise conv is the case m = 1 (one group per channel).

    Example:
        >>> import torch
        >>> from fxfuse._solve import DiagonalStats
        >>> X = torch.randn(300, 4, 3, dtype=torch.float64)
        >>> W = torch.randn(3, 4, dtype=torch.float64)  # column c: channel c's weights
        >>> stats = DiagonalStats()
        >>> stats.add(X, torch.einsum("rcd,dc->rc", X, W))
        >>> fit, rss, t2, ridge = stats.solve(torch.zeros_like(W))
        >>> torch.allclose(fit, W, atol=1e-6), rss / t2 < 1e-12
        (True, True)
    """

    def __init__(self) -> None:
        self.G: Tensor | None = None
        self.b: Tensor | None = None
        self.tt: Tensor | None = None
        self.rows = 0
        self.eps = 0.0  # machine epsilon of the rows as computed (``regularisation="pinv"``'s cut-off)

    @property
    def d(self) -> int:
        """Columns of one group's design."""
        return self.G.shape[1]

    def add(self, X: Tensor, T: Tensor, chunk: int = 8192, dtype: torch.dtype | None = None) -> None:
        """Add design rows X (n_rows, groups, d) and targets T (n_rows, groups · m): output column j of
        group g is T[:, g·m + j], as a grouped conv orders its output channels. ``dtype``: the dtype the
        activations were computed in, where X is already a float64 copy (default X's own)."""
        self.eps = max(self.eps, torch.finfo(dtype or X.dtype).eps if (dtype or X.dtype).is_floating_point else 0.0)
        groups = X.shape[1]
        if T.shape[1] % groups:
            raise ValueError(f"targets have {T.shape[1]} columns, not a multiple of the {groups} groups")
        m = T.shape[1] // groups
        for s in range(0, X.shape[0], chunk):
            r = min(chunk, X.shape[0] - s)
            # groups first, in float64, each in one copy: (groups, rows, d) and (groups, rows, m)
            x = torch.empty((groups, r, X.shape[2]), dtype=torch.float64, device=X.device)
            x.copy_(X[s : s + r].transpose(0, 1))
            t = torch.empty((groups, r, m), dtype=torch.float64, device=X.device)
            t.copy_(T[s : s + r].reshape(r, groups, m).transpose(0, 1))
            xt = x.transpose(1, 2)
            G = torch.bmm(xt, x)
            b = torch.bmm(xt, t)
            tt = (t * t).sum(1)
            if self.G is None:
                self.G, self.b, self.tt = G, b, tt
            else:
                self.G += G
                self.b += b
                self.tt += tt
        self.rows += X.shape[0]

    def reduce(self) -> None:
        """Sum over the ranks of a ``torch.distributed`` process group (a no-op in one process)."""
        from ._dist import all_reduce_, all_reduce_number, is_distributed

        if is_distributed():
            for t in (self.G, self.b, self.tt):
                all_reduce_(t)
            self.rows = all_reduce_number(self.rows)

    def solve(self, W0: Tensor, regularisation: str = "gcv") -> tuple[Tensor, float, float, float]:
        """Per-group ridge least squares towards ``W0`` (d, groups · m), each group's ridge chosen by generalised
        cross-validation as in :func:`choose_ridge` (all groups at once; a group's m outputs share it).
        ``regularisation="pinv"``: each group's minimum-norm solution on the eigen-directions a pseudo-inverse
        keeps at its default cut-off (as :meth:`GramStats.pinv_rank`), no ridge and no pull towards ``W0``.

        Returns:
            (W of shape (d, groups · m), residual sum of squares, ‖T‖², median μ / λ_max over groups).
        """
        G, n = self.G, self.rows
        groups, d, m = self.b.shape
        w0 = W0.to(G).T.reshape(groups, m, d).transpose(1, 2)  # (groups, d, m)
        if regularisation == "pinv":  # no pull towards W0: the residual is that of the targets themselves
            b0, r0 = self.b, self.tt.sum(1)
        else:
            Gw0 = G @ w0
            b0 = self.b - Gw0
            r0 = self.tt.sum(1) - 2.0 * (w0 * self.b).sum((1, 2)) + (w0 * Gw0).sum((1, 2))
        try:
            lam, V = torch.linalg.eigh(G)
        except torch.linalg.LinAlgError:  # one group's divide-and-conquer failed: each with _eigh's fallback
            pairs = [_eigh(g) for g in G]
            lam, V = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        lmax = lam.max(1).values.clamp_min(1e-300)
        rtol = _pinv_rtol(n, d, self.eps) if regularisation == "pinv" else EIG_RTOL
        valid = lam > rtol * lmax[:, None]
        lam_s = torch.where(valid, lam, torch.ones_like(lam))
        u = (V.transpose(1, 2) @ b0) * valid[..., None]  # (groups, d, m)
        q_over = (u * u).sum(2) / lam_s
        r_perp = (r0 - q_over.sum(1)).clamp_min(0.0)
        if regularisation == "pinv":
            W = V @ (u / lam_s[..., None] * valid[..., None])
            return W.transpose(1, 2).reshape(groups * m, d).T, float(r_perp.sum()), float(self.tt.sum()), 0.0
        best, mu, rss, _ = _gcv(lam, q_over, valid, r_perp, n, lmax)  # every group's own ridge
        W = w0 + V @ (u / (lam_s + mu[:, None])[..., None] * valid[..., None])
        grid = torch.tensor(RIDGE_GRID, dtype=G.dtype, device=G.device)
        return W.transpose(1, 2).reshape(groups * m, d).T, float(rss.sum()), float(self.tt.sum()), \
            float(grid[best].median())


def grouped_sq_norm(A: Tensor, K: Tensor, chunk: int = 1024) -> float:
    """‖Z A‖² = tr(Aᵀ K A) from K = ZᵀZ (Tensors of shape (n, k) and (n, n)).

    A grouping's matrix has at most one nonzero per row (a cluster matrix, possibly stacked on −I for the fixed
    terms of a sum): then Σ over pairs of rows in the same column, O(n²) in row chunks; else one product, O(n² k).

    Example:
        >>> import torch
        >>> from fxfuse._solve import grouped_sq_norm
        >>> Z = torch.randn(50, 6, dtype=torch.float64)
        >>> A = torch.tensor([[0.5, 0], [0.5, 0], [0, 1], [0, -1], [0, 0], [0.2, 0]], dtype=torch.float64)
        >>> abs(grouped_sq_norm(A, Z.T @ Z) - float((Z @ A).square().sum())) < 1e-9
        True
    """
    nz = A != 0
    if not bool((nz.sum(1) <= 1).all()):
        return float(((K @ A) * A).sum())
    col = nz.to(torch.int8).argmax(1)
    val = A.gather(1, col[:, None])[:, 0]  # 0 on a row of zeros
    total = 0.0
    for s in range(0, A.shape[0], chunk):
        rows = slice(s, s + chunk)
        KA = torch.zeros(K[rows].shape[0], A.shape[1], dtype=K.dtype, device=K.device)
        KA.index_add_(1, col, K[rows] * val[None, :])  # (K A)[rows]
        total += float((KA.gather(1, col[rows, None])[:, 0] * val[rows]).sum())
    return total


def _eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, falling back to LAPACK's MRRR driver (scipy, ``evr``) where the default
    divide-and-conquer one fails to converge: it does on some Gram matrices with many exactly repeated zero
    eigenvalues (e.g. a conv whose kernel reads only padding at some offsets)."""
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        from scipy.linalg import eigh

        lam, V = eigh(M.detach().cpu().numpy(), driver="evr")
        return torch.from_numpy(lam).to(M), torch.from_numpy(V).to(M)


# on the CPU, float64 symmetric matrices of at least this order are decomposed into an implicit basis
# (TridiagonalBasis). Measured here (2 cores) with a level's 2,048 columns applied: 4,609²: 13 s for
# torch.linalg.eigh alone, about 8 s in all the implicit way; 3,073²: 4.2 s against 3.5 s; 2,049² and 2,305²: the same
IMPLICIT_EIG_MIN = 2560


class TridiagonalBasis:
    """The eigenvectors V = QS of a symmetric matrix, with Q never formed.

    LAPACK's ``dsytrd`` reduces M = QTQᵀ (Q a product of Householder reflectors), the
    tridiagonal's eigenvectors S come from ``stemr`` (MRRR; ``stevd`` where it fails), and V = QS is applied
    to a block of columns by ``dormqr`` in O(d²m): forming V (the back-transformation
    inside ``torch.linalg.eigh``) costs as much as the rest of the decomposition, and
    a closed-form level applies V to fewer columns than it has. ``V.T @ M`` and ``V @ M``
    work as for a Tensor.

    Example:
        >>> import torch
        >>> from fxfuse._solve import TridiagonalBasis
        >>> X = torch.randn(50, 8, dtype=torch.float64)
        >>> lam, V = TridiagonalBasis.eigh(X.T @ X)
        >>> M = torch.randn(8, 3, dtype=torch.float64)
        >>> torch.allclose(V @ (lam[:, None] * (V.T @ M)), X.T @ X @ M)
        True
    """

    def __init__(self, reflectors, tau, S: Tensor) -> None:
        self._refl, self._tau, self.S = reflectors, tau, S

    @classmethod
    def eigh(cls, M: Tensor) -> tuple[Tensor, TridiagonalBasis]:
        """Eigenvalues (ascending) and the implicit eigenvectors of the exactly symmetric (d, d) M."""
        import numpy as np
        from scipy.linalg import eigh_tridiagonal, lapack

        n = M.shape[0]
        a = M.detach().to("cpu", torch.float64).numpy().T.copy(order="F")  # Mᵀ = M: a straight copy
        lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
        c, d, e, tau, info = lapack.dsytrd(a, lower=1, lwork=max(lwork, 1), overwrite_a=1)
        if info != 0:
            raise torch.linalg.LinAlgError(f"dsytrd failed (info {info})")
        try:  # MRRR: O(d²) for all eigenvectors, where divide and conquer (stevd) takes about twice as long here
            lam, S = eigh_tridiagonal(d, e, check_finite=False, lapack_driver="stemr")
        except (np.linalg.LinAlgError, ValueError):
            lam, S = eigh_tridiagonal(d, e, check_finite=False, lapack_driver="stevd")
        return torch.from_numpy(lam), cls(np.asfortranarray(c[1:, :-1]), tau, torch.from_numpy(S))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.S.shape)

    def __getitem__(self, index) -> TridiagonalBasis:
        """Columns (eigenvectors) of V, e.g. ``V[:, keep]``."""
        return TridiagonalBasis(self._refl, self._tau, self.S[index])

    def _q(self, M: Tensor, trans: str) -> Tensor:
        """Q M (trans "N") or Qᵀ M (trans "T"), M of shape (d, m), float64 on the CPU."""
        from scipy.linalg import lapack

        out = M.detach().to("cpu", torch.float64).T.contiguous()  # (m, d) row-major: (d, m) column-major
        m = out.shape[0]
        if out.shape[1] > 1 and m:
            f = out.numpy().T
            work = lapack.dormqr("L", trans, self._refl, self._tau, f[1:], lwork=-1)[1]
            res, _, info = lapack.dormqr("L", trans, self._refl, self._tau, f[1:], lwork=max(int(work[0]), 1))
            if info != 0:
                raise torch.linalg.LinAlgError(f"dormqr failed (info {info})")
            f[1:] = res
        return out.T

    def __matmul__(self, M: Tensor) -> Tensor:
        """V M = Q (S M)."""
        return self._q(self.S @ M.to(self.S), "N").to(M.device)

    @property
    def T(self) -> _TransposedBasis:
        return _TransposedBasis(self)


class _TransposedBasis:
    def __init__(self, basis: TridiagonalBasis) -> None:
        self.basis = basis

    def __matmul__(self, M: Tensor) -> Tensor:
        """Vᵀ M = Sᵀ (Qᵀ M)."""
        return (self.basis.S.T @ self.basis._q(M, "T")).to(M.device)


def symmetric_eig(M: Tensor) -> tuple[Tensor, Tensor | TridiagonalBasis]:
    """Eigen-decomposition of a symmetric matrix: ``TridiagonalBasis`` for a large float64 one on the CPU
    (order ≥ IMPLICIT_EIG_MIN), otherwise :func:`_eigh`."""
    if M.device.type == "cpu" and M.dtype == torch.float64 and M.shape[0] >= IMPLICIT_EIG_MIN:
        import numpy as np

        try:
            return TridiagonalBasis.eigh(M)
        except (torch.linalg.LinAlgError, np.linalg.LinAlgError, ValueError):
            pass  # a failed tridiagonal eigensolver (scipy raises numpy's error): the explicit route
    return _eigh(M)


def _gram_add_(G: Tensor | None, x: Tensor, block: int | None = None) -> Tensor:
    """G += xᵀx with only G's lower triangle brought up to date once x is wide (a blocked SYRK: about half the
    product's work for many blocks); :func:`_symmetrised` restores the upper triangle. Blocks of 384 columns
    (128 below 1,152) were the fastest here."""
    d = x.shape[1]
    if G is None:
        G = torch.zeros(d, d, dtype=x.dtype, device=x.device)
    block = block or (384 if d >= 1152 else 128)
    if d < 3 * block:
        return G.addmm_(x.T, x)
    for s in range(0, d, block):
        e = min(s + block, d)
        G[s:, s:e] += x[:, s:].T @ x[:, s:e]
    return G


def _symmetrised(G: Tensor, block: int = 256) -> Tensor:
    """G with its upper triangle copied from the lower one (block by block, in place)."""
    d = G.shape[0]
    for s in range(0, d, block):
        e = min(s + block, d)
        G[s:e, e:] = G[e:, s:e].T
        diag = G[s:e, s:e]
        diag.copy_(diag.tril() + diag.tril(-1).T)
    return G


def unreproduced(K: Tensor, gram: Tensor) -> Tensor:
    """Each neuron's squared norm outside what a grouping Gram matrix describes, ‖z_j‖² − gram_jj (≥ 0): the
    residual of the ``"distance"`` HF cost (:func:`fxfuse._grouping.distance_pair_costs`)."""
    return (K.diagonal() - gram.diagonal()).clamp_min(0.0)


def _pinv_rtol(rows: int, d: int, eps: float) -> float:
    """The eigenvalue cut-off, relative to λ_max of XᵀX, of a pseudo-inverse of X (rows × d) at its default
    singular-value cut-off max(rows, d) · ε · σ_max (ε: the machine epsilon of X's dtype; float64's if unknown)."""
    return (max(rows, d) * (eps or torch.finfo(torch.float64).eps)) ** 2


def _above(lam: Tensor, V, rtol: float):
    """The eigenpairs whose λ exceed ``rtol`` · λ_max (V's columns, or an implicit basis's, alike)."""
    keep = lam > rtol * lam.max().clamp_min(1e-300)
    return (lam, V) if bool(keep.all()) else (lam[keep], V[:, keep])


def _ridge_or_none(lam: Tensor, q: Tensor, r_perp: float, n: int, ridge: bool) -> Ridge:
    """:func:`choose_ridge`'s μ, or with ``ridge=False`` none (μ = 0) and its unregularised residual."""
    return choose_ridge(lam, q, r_perp, n) if ridge else Ridge(0.0, 0.0, float(lam.numel()), max(r_perp, 0.0))


class GramStats:
    """Batch-by-batch float64 accumulation of G = XᵀX, C = XᵀZ and K = ZᵀZ.

    Everything HF and KF need for a closed-form level follows from these three
    (grouping Gram, cross-validated ridge, solution and residual), so the unfolded
    conv input is never held whole (DESIGN.md, "Numerics"). While rows are fewer
    than columns, X is kept instead of G (the dual form).

    Example:
        >>> import torch
        >>> from fxfuse._solve import GramStats
        >>> X = torch.randn(200, 5, dtype=torch.float64)
        >>> stats = GramStats()
        >>> stats.add(X, X @ torch.ones(5, 2, dtype=torch.float64))
        >>> lam, V = stats.eig()
        >>> W, ridge = stats.solve(lam, V, torch.eye(2, dtype=torch.float64))
        >>> torch.allclose(W, torch.ones(5, 2, dtype=torch.float64), atol=1e-6), ridge.relative < 1e-6
        (True, True)
    """

    def __init__(self, keep_rows_bytes: int = 512 << 20) -> None:
        self.G: Tensor | None = None
        self.C: Tensor | None = None
        self.K: Tensor | None = None
        self.rows = 0
        self.X: Tensor | None = None  # the design rows themselves, while there are fewer than columns
        self._keep_bytes = keep_rows_bytes
        self._lower_only = False  # G's upper triangle is stale (see _gram_add_)
        self.eps = 0.0  # machine epsilon of the rows' own dtype (before the float64 copies), for pinv_rank

    @property
    def d(self) -> int:
        """Columns of X."""
        return (self.X if self.X is not None else self.G).shape[1]

    def add(self, X: Tensor, Z: Tensor, chunk: int = 8192) -> None:
        """Add rows X (n_rows, d) and Z (n_rows, n_neurons), in chunks of ``chunk`` rows so that the
        float64 copies stay small whatever the batch.

        While the rows are fewer than the columns (and fit in ``keep_rows_bytes``), X
        itself is kept instead of G: the eigen-decomposition then works on the
        smaller XXᵀ (the dual form). Past that, G is formed and rows are dropped.
        """
        self.eps = max(self.eps, torch.finfo(X.dtype).eps if X.is_floating_point() else 0.0)
        for s in range(0, X.shape[0], chunk):
            x = X[s : s + chunk].to(torch.float64)
            z = Z[s : s + chunk].to(torch.float64)
            if self.C is None:
                self.C, self.K = x.T @ z, z.T @ z
                if x.shape[0] < x.shape[1] and x.numel() * 8 <= self._keep_bytes:
                    self.X = x.clone()
                else:
                    self.G = _gram_add_(None, x)
            else:
                self.C.addmm_(x.T, z)
                self.K.addmm_(z.T, z)
                if self.X is not None:
                    self.X = torch.cat([self.X, x])
                    if self.X.shape[0] >= self.X.shape[1] or self.X.numel() * 8 > self._keep_bytes:
                        self.G, self.X = _gram_add_(None, self.X), None
                else:
                    _gram_add_(self.G, x)
            self._lower_only = self.G is not None
        self.rows += X.shape[0]

    def _gram(self) -> Tensor:
        """G, symmetric (its upper triangle restored once after accumulation)."""
        if self._lower_only:
            _symmetrised(self.G)
            self._lower_only = False
        return self.G

    def reduce(self) -> None:
        """Sum the statistics over the ranks of a ``torch.distributed`` process group (one all-reduce each, in
        float64); a no-op in a single process. While all ranks together have fewer rows than columns, the rows
        are gathered instead and the dual form is kept (as in one process); otherwise G = XᵀX is summed."""
        from ._dist import all_gather_rows, all_reduce_, all_reduce_number, is_distributed

        if not is_distributed():
            return
        rows = all_reduce_number(self.rows)
        # every rank still in the dual form and fewer rows than columns in all: gather the rows (small), keep it
        dual = all_reduce_number(0 if self.X is not None else 1) == 0 and rows < self.d
        if dual:
            self.X = all_gather_rows(self.X)
        elif self.X is not None:
            self.G, self.X = _gram_add_(None, self.X), None
        if self.G is not None:
            self._lower_only = True  # every rank's upper triangle may be stale: symmetrise after the sum
        for t in (self.C, self.K) if dual else (self.G, self.C, self.K):
            all_reduce_(t)
        self.rows = rows

    def gram_times(self, W: Tensor) -> Tensor:
        """G W = XᵀX W."""
        return self.X.T @ (self.X @ W) if self.X is not None else self._gram() @ W

    def eig(self) -> tuple[Tensor, Tensor | TridiagonalBasis]:
        """Eigenpairs of G above the numerical-zero cut-off: (λ of shape (r,), V of shape (d, r)).

        In the dual form (rows n < columns d kept), from XXᵀ = UΛUᵀ (n × n): V = XᵀUΛ^{-1/2}.
        A large G on the CPU gives an implicit V (:class:`TridiagonalBasis`; ``V.T @ M`` and
        ``V @ M`` as for a Tensor).
        """
        if self.X is not None:
            lam, U = _above(*_eigh(self.X @ self.X.T), EIG_RTOL)
            return lam, (self.X.T @ U) / lam.sqrt()[None, :]
        lam, V = symmetric_eig(self._gram())
        return _above(lam.to(self.G.device), V, EIG_RTOL)

    def pinv_rank(self, lam: Tensor, V: Tensor) -> tuple[Tensor, Tensor | TridiagonalBasis]:
        """The eigenpairs of G that a pseudo-inverse of X keeps at its default cut-off: σ_i > max(n, d) · ε · σ_max
        (σ = √λ the singular values of X, n × d, ε the machine epsilon of the rows' dtype before their float64
        copies), as ``torch.linalg.pinv`` and ``numpy.linalg.pinv`` do, and so the reference implementation
        on its float32 activations."""
        if not lam.numel():
            return lam, V
        return _above(lam, V, _pinv_rtol(self.rows, self.d, self.eps))

    def eig_for(self, regularisation: str) -> tuple[Tensor, Tensor | TridiagonalBasis]:
        """The eigenpairs a fit with ``regularisation`` works on: :meth:`eig`'s (``"gcv"``), or those
        :meth:`pinv_rank` keeps of them (``"pinv"``)."""
        lam, V = self.eig()
        return self.pinv_rank(lam, V) if regularisation == "pinv" else (lam, V)

    def solve_for(self, regularisation: str, lam: Tensor, V, A: Tensor, W0: Tensor | None) -> tuple[Tensor, Ridge]:
        """:meth:`solve` as ``regularisation`` asks: the cross-validated ridge towards ``W0`` (``"gcv"``), or the
        minimum-norm solution with no ridge (``"pinv"``, on :meth:`eig_for`'s eigenpairs)."""
        if regularisation == "pinv":
            return self.solve(lam, V, A, ridge=False)
        return self.solve(lam, V, A, W0=W0)

    def grouping_gram(self, lam: Tensor, V: Tensor, ridge: bool = True) -> tuple[Tensor, Ridge]:
        """Gram matrix of what a ridge fit from X reproduces of each neuron: Tensor of shape (n_neurons, n_neurons).

        With H_μ = X(XᵀX + μ)⁻¹Xᵀ, ⟨H_μ z_j, H_μ z_k⟩ = Σ_i λ_i/(λ_i + μ)² u_ij u_ik where
        u = VᵀXᵀZ; μ is chosen by :func:`choose_ridge` for predicting every neuron
        from X (``ridge=False``: μ = 0). With μ = 0 it is ZᵀPZ (P the projector onto the span of the
        eigenvectors in V), whose distances are those between the projected neuron outputs.
        """
        U = V.T @ self.C  # (r, n_neurons)
        q = (U * U).sum(1)
        rd = _ridge_or_none(lam, q, float(self.K.trace()) - float((q / lam).sum()), self.rows, ridge)
        scale = lam / (lam + rd.mu) ** 2
        return U.T @ (U * scale[:, None]), rd

    def solve(self, lam: Tensor, V: Tensor, A: Tensor, W0: Tensor | None = None,
              ridge: bool = True) -> tuple[Tensor, Ridge]:
        """Least squares for targets T = Z A, regularised towards ``W0``: (W of shape (d, n_fused), the ridge).

        W = W₀ + (XᵀX + μ)⁻¹ Xᵀ(T − XW₀), μ chosen by generalised cross-validation
        (:func:`choose_ridge`), so the amount of regularisation comes from the data:
        directions the data determines well are fitted, noisy ones are shrunk
        towards ``W0`` (the fused level's start weights), and directions it does not
        determine at all keep ``W0``. With ``ridge=False`` (μ = 0) this is the
        least-squares solution closest to ``W0``; without ``W0`` also the
        minimum-norm one, G⁺XᵀT (appendix B.2).
        """
        CA = self.C @ A
        t2 = grouped_sq_norm(A, self.K)
        if W0 is None:
            b, r0 = CA, t2
        else:
            GW0 = self.gram_times(W0)
            b = CA - GW0
            r0 = t2 - 2.0 * float((W0 * CA).sum()) + float((W0 * GW0).sum())
        u = V.T @ b
        q = (u * u).sum(1)
        rd = _ridge_or_none(lam, q, r0 - float((q / lam).sum()), self.rows, ridge)
        W = V @ (u / (lam + rd.mu)[:, None])
        if W0 is not None:
            W = W + W0
        return W, rd


def read_affine(level: GraphModule, spec: AffineSpec) -> Tensor:
    """The level's current map in design-column layout, with the BatchNorm folded in: (d, n_out), float64."""
    if spec.channel is not None:  # a per-channel affine: rows γ and β
        names = [spec.channel.weight] + ([spec.channel.bias] if spec.channel.bias is not None else [])
        return torch.stack([level.get_parameter(q).detach().to(torch.float64).flatten() for q in names])
    m = level.get_submodule(spec.op)
    weight = m.weight.detach().to(torch.float64).reshape(m.weight.shape[0], -1)
    bias = m.bias.detach().to(torch.float64) if m.bias is not None else torch.zeros_like(weight[:, 0])
    if spec.norm is not None:
        bn = level.get_submodule(spec.norm)
        g = 1.0 / (bn.running_var.detach().to(torch.float64) + bn.eps).sqrt()
        if bn.weight is not None:
            g = g * bn.weight.detach().to(torch.float64)
        beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else 0.0
        weight = weight * g[:, None]
        bias = (bias - bn.running_mean.detach().to(torch.float64)) * g + beta
    cols = [weight.T]
    if spec.has_bias_column:
        cols.append(bias[None, :])
    return torch.cat(cols, 0)


def affine_params(level: GraphModule, spec: AffineSpec, W: Tensor) -> dict[str, Tensor]:
    """The level's parameters and buffers that make it compute exactly X W (nothing is written).

    A folded BatchNorm becomes the identity (weight 1, bias 0, mean 0, var 1 − eps);
    the bias goes to the op, or to the norm when the op has none.

    Returns:
        Qualname -> Tensor in the level's dtypes, for :func:`fxfuse.passes.rewrite_params`.
    """
    if spec.channel is not None:  # a per-channel affine: γ and β
        names = [spec.channel.weight] + ([spec.channel.bias] if spec.channel.bias is not None else [])
        return {q: W[r].reshape(level.get_parameter(q).shape).to(level.get_parameter(q).dtype)
                for r, q in enumerate(names)}
    m = level.get_submodule(spec.op)
    fan = W.shape[0] - (1 if spec.has_bias_column else 0)
    bias = W[fan] if spec.has_bias_column else None
    out = {f"{spec.op}.weight": W[:fan].T.reshape(m.weight.shape).to(m.weight.dtype)}
    if spec.norm is not None:
        bn = level.get_submodule(spec.norm)
        pre = f"{spec.norm}."
        out[pre + "running_mean"] = torch.zeros_like(bn.running_mean)
        out[pre + "running_var"] = torch.full_like(bn.running_var, 1.0 - bn.eps)
        if bn.weight is not None:
            out[pre + "weight"] = torch.ones_like(bn.weight)
        if bn.bias is not None:
            out[pre + "bias"] = torch.zeros_like(bn.bias)
        if m.bias is not None:
            out[f"{spec.op}.bias"] = bias.to(m.bias.dtype)
        elif bn.bias is not None:
            out[pre + "bias"] = bias.to(bn.bias.dtype)
        else:
            out[pre + "running_mean"] = -bias.to(bn.running_mean.dtype)
    elif m.bias is not None:
        out[f"{spec.op}.bias"] = bias.to(m.bias.dtype)
    return out


def fit_gradient(
    level: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    train: TrainConfig | None = None,
    *,
    progress=None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
) -> dict[str, float]:
    """Fit a level's trainable parameters to targets with Adam on the MSE (Eq. 5, plain MSE as in B.2).

    ``train`` defaults to Table 5, Setting 1 (Adam, lr 1e-3, weight decay 1e-4,
    batch 32, validation split 0.1). Early stopping keeps the parameters with the
    best validation loss; with ``val_split=0`` every sample trains and the final
    parameters are kept. ``noise`` perturbs the initial parameters by ``noise``
    times each tensor's standard deviation. ``loss_fn(prediction, target)``
    returns a batch mean (MSE by default). In train mode, a last batch of one
    sample is skipped (BatchNorm cannot normalise it).

    Args:
        level: The module to fit; only parameters with ``requires_grad`` train.
        inputs: Tensor of shape (n_samples, ...); targets: Tensor of shape (n_samples, ...).

    Returns:
        ``{"epochs": ..., "val_loss": ..., "init_val_loss": ...}`` (training loss
        when there is no validation split).

    Raises:
        ValueError: the module has no trainable parameter.
    """
    import contextlib

    from ._dist import all_reduce_number, is_distributed

    train = train if train is not None else TrainConfig()
    epochs, batch_size, val_split, patience, noise, seed = (
        train.epochs, train.batch_size, train.val_split, train.patience, train.noise, train.seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = inputs.shape[0]
    perm = torch.randperm(n, generator=gen).to(inputs.device)
    validate = val_split > 0 and n >= 10
    n_val = max(1, int(round(n * val_split))) if validate else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    if n_val == 0:
        val_idx = tr_idx
    params = [p for p in level.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(level).__name__} has no trainable parameter (all have requires_grad=False) to fit by gradient"
        )
    if noise > 0:
        with torch.no_grad():
            for p in params:
                if p.numel() > 1:
                    p.add_(torch.randn(p.shape, generator=gen).to(p) * noise * p.std())
    opt = torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    # in a torch.distributed process group every rank holds its own shard of rows: DistributedDataParallel
    # averages the gradients (it also broadcasts rank 0's start), join() covers shards of unequal size, and
    # the validation loss is summed over ranks so that early stopping decides the same everywhere
    spread = is_distributed()
    model = level
    if spread:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(level, find_unused_parameters=True)

    # BatchNorm in train mode cannot normalise a batch of one sample
    single_ok = not any(m.training for m in level.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def val_loss() -> float:
        with torch.no_grad():
            tot = 0.0
            for s in range(0, len(val_idx), 256):
                b = val_idx[s : s + 256]
                if len(b) < 2 and not single_ok:
                    continue
                tot += float(loss_fn(level(inputs[b]), targets[b])) * len(b)
            count = len(val_idx)
            if spread:
                tot, count = all_reduce_number(float(tot)), all_reduce_number(int(count))
            return tot / count

    best = val_loss()
    init = best
    best_state = copy.deepcopy(level.state_dict())
    bad = 0
    done = 0
    for epoch in range(epochs):
        order = tr_idx[torch.randperm(len(tr_idx), generator=gen).to(tr_idx.device)]
        with model.join() if spread else contextlib.nullcontext():
            for s in range(0, len(order), batch_size):
                b = order[s : s + batch_size]
                if len(b) < 2 and not single_ok:
                    continue
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs[b]), targets[b])
                loss.backward()
                opt.step()
        done = epoch + 1
        if not validate:
            if progress is not None:
                progress.update(1)
            continue
        v = val_loss()
        if progress is not None:
            progress.set_postfix(val_loss=f"{v:.3g}")
            progress.update(1)
        if v < best - 1e-12 * max(1.0, abs(best)):
            best, bad = v, 0
            best_state = copy.deepcopy(level.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    if validate:
        level.load_state_dict(best_state)
    else:
        best = val_loss()
    return {"epochs": done, "val_loss": best, "init_val_loss": init if math.isfinite(init) else float("nan")}
