"""Fitting a fused level to its targets: closed form for affine levels, Adam otherwise.

Reference: "Model Fusion via Neuron Interpolation", section 4.3.2 and appendix B.2;
the numerics follow DESIGN.md ("Numerics that make it fast").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter

from fxfuse.passes._affine import AffineSpec, affine_spec

from ._config import TrainConfig

__all__ = ["AffineSpec", "affine_spec", "read_affine", "affine_params", "GramStats", "EIG_RTOL", "fit_gradient", "to_rows", "from_rows"]

# Eigenvalues of XᵀX below EIG_RTOL · λ_max are treated as zero: the pseudo-inverse
# and the projector onto span(X) use only the eigenvectors above the cut-off. In
# float64 this drops directions whose singular values are < 1e-6 · σ_max.
EIG_RTOL = 1e-12


def to_rows(z: Tensor, axis: int) -> Tensor:
    """Move the neuron axis last and flatten the rest into rows: (n_rows, width)."""
    return z.movedim(axis, -1).reshape(-1, z.shape[axis])


def from_rows(rows: Tensor, like_shape: tuple[int, ...], axis: int) -> Tensor:
    """Inverse of :func:`to_rows` for a tensor of shape ``like_shape`` (batch may differ)."""
    moved = list(like_shape)
    width = moved.pop(axis)
    return rows.reshape(-1, *moved[1:], width).movedim(-1, axis)


def op_input(level: GraphModule, spec: AffineSpec, x: Tensor) -> Tensor:
    """The tensor the level's affine op receives when the level gets ``x``."""
    interp = Interpreter(level, garbage_collect_values=False)
    interp.run(x)
    node = next(n for n in level.graph.nodes if n.name == spec.op_node)
    return interp.env[node.args[0]]


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


class GramStats:
    """Batch-by-batch float64 accumulation of G = XᵀX, C = XᵀZ and K = ZᵀZ.

    Everything HF and KF need for a closed-form level follows from these three,
    so the unfolded conv input is never held whole (DESIGN.md, "Numerics").
    """

    def __init__(self) -> None:
        self.G: Tensor | None = None
        self.C: Tensor | None = None
        self.K: Tensor | None = None
        self.rows = 0

    def add(self, X: Tensor, Z: Tensor, chunk: int = 8192) -> None:
        """Add rows X (n_rows, d) and Z (n_rows, n_neurons), in chunks of ``chunk`` rows so that the
        float64 copies stay small whatever the batch."""
        for s in range(0, X.shape[0], chunk):
            x = X[s : s + chunk].to(torch.float64)
            z = Z[s : s + chunk].to(torch.float64)
            g, c, k = x.T @ x, x.T @ z, z.T @ z
            if self.G is None:
                self.G, self.C, self.K = g, c, k
            else:
                self.G += g
                self.C += c
                self.K += k
        self.rows += X.shape[0]

    def eig(self) -> tuple[Tensor, Tensor]:
        """Eigenpairs of G above the cut-off: (λ of shape (r,), V of shape (d, r))."""
        lam, V = torch.linalg.eigh(self.G)
        keep = lam > EIG_RTOL * lam.max().clamp_min(1e-300)
        return lam[keep], V[:, keep]

    def projected(self, lam: Tensor, V: Tensor) -> Tensor:
        """Neuron coordinates in an orthonormal basis Q of span(X): QᵀZ, Tensor of shape (r, n_neurons).

        With G = VΛVᵀ, Q = XVΛ^{-1/2}, so QᵀZ = Λ^{-1/2}VᵀXᵀZ and distances between
        columns equal the distances between the projected neuron outputs P z_j.
        """
        return (V.T @ self.C) / lam.sqrt()[:, None]

    def solve(self, lam: Tensor, V: Tensor, A: Tensor, W0: Tensor | None = None) -> Tensor:
        """Least squares for targets T = Z A: Tensor of shape (d, n_fused).

        Without ``W0`` this is the minimum-norm solution W = G⁺XᵀT (appendix B.2).
        With ``W0`` it is the least-squares solution closest to W0,
        W = W0 + G⁺(XᵀT − G W0): the same fit on the data, but directions the data
        does not determine (e.g. inputs of neurons that never fire on it) keep W0.
        """
        W = V @ ((V.T @ (self.C @ A)) / lam[:, None])
        if W0 is not None:
            W = W + W0 - V @ (V.T @ W0)
        return W

    def residual(self, lam: Tensor, V: Tensor, A: Tensor) -> float:
        """‖XW − T‖² = ‖T‖² − ‖QᵀT‖² for the solution of :meth:`solve`."""
        t2 = float(torch.einsum("ij,ik,kj->", A, self.K, A))
        qt = self.projected(lam, V) @ A
        return max(t2 - float((qt * qt).sum()), 0.0)


def read_affine(level: GraphModule, spec: AffineSpec) -> Tensor:
    """The level's current map in design-column layout, with the BatchNorm folded in: (d, n_out), float64."""
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
            return tot / len(val_idx)

    best = val_loss()
    init = best
    best_state = copy.deepcopy(level.state_dict())
    bad = 0
    done = 0
    for epoch in range(epochs):
        order = tr_idx[torch.randperm(len(tr_idx), generator=gen).to(tr_idx.device)]
        for s in range(0, len(order), batch_size):
            b = order[s : s + batch_size]
            if len(b) < 2 and not single_ok:
                continue
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(level(inputs[b]), targets[b])
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
