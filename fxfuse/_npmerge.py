"""NP Merge: learned per-parameter interpolation of aligned models.

"Non-Uniform Parameter-Wise Model Merging" (Orozco Camacho et al.), section III:
after permutation alignment, every parameter of the merged model is

    W = α ⊙ W_A + (1 − α) ⊙ W_B′,   α = sigmoid(α_pre),   α_pre initialised to 0,

and α_pre is learned with Adam (lr 0.01, 10 epochs in the paper) on the task
loss; BatchNorm statistics are then recomputed on the data (REPAIR's reset).
fxfuse's default loss is distillation from the ensemble's mean softmax instead
of the paper's cross-entropy on labels: it needs no labels, and on a small
skewed sample (one party's data, classes missing) cross-entropy teaches the
merged model that sample's class prior (see the README's skewed-data table).
More than two models are merged by successive pairwise merges (III-C).

The level-wise, label-free variant (``method="np-merge-levelwise"``) lives in the
fusion engine (:func:`fxfuse.fuse`): it fits each level's α to the level targets
of the grouping step, using :class:`Interpolation` on one level at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import TrainConfig

__all__ = ["Interpolation", "distill_loss", "np_merge", "pairwise", "teacher_probs"]

M = TypeVar("M")


class Interpolation(nn.Module):
    """``base`` evaluated with every floating parameter set to σ(α_pre) θ_A + (1 − σ(α_pre)) θ_B.

    Only ``alpha_pre`` (one entry per parameter entry, initialised to 0, so
    α = 0.5) is trainable; ``base``'s own parameters are frozen while this module
    exists and restored by :meth:`apply`. Buffers (BatchNorm statistics) are
    ``base``'s own: they are not interpolated (eval-mode BatchNorm cannot be
    differentiated through them); callers recompute them.

    Args:
        base: Model A; it is evaluated (and, by :meth:`write`, written) in place.
        other: Model B′, aligned to A, with the same parameter names and shapes.

    Example:
        >>> import torch
        >>> from fxfuse._npmerge import Interpolation
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> mix = Interpolation(a, b)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(mix(x), (a(x) + b(x)) / 2, atol=1e-6)
        True
    """

    def __init__(self, base: nn.Module, other: nn.Module):
        super().__init__()
        self.base = base
        mine = dict(base.named_parameters())
        theirs = dict(other.named_parameters())
        self.names = [n for n, t in mine.items() if t.is_floating_point()]
        for n in self.names:
            if n not in theirs or theirs[n].shape != mine[n].shape:
                got = tuple(theirs[n].shape) if n in theirs else "missing"
                raise ValueError(
                    f"np-merge: `{n}` has shape {tuple(mine[n].shape)} in the first model but {got} in the other; "
                    "NP Merge interpolates models of one architecture and equal widths"
                )
        self._theta_a = [mine[n].detach().clone() for n in self.names]
        self._theta_b = [theirs[n].detach().to(mine[n]).clone() for n in self.names]
        self.alpha_pre = nn.ParameterList([nn.Parameter(torch.zeros_like(t)) for t in self._theta_a])
        self._grad_flags = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)

    def merged(self) -> dict[str, Tensor]:
        """Parameter name -> interpolated tensor (differentiable in α_pre)."""
        out = {}
        for n, a, b, pre in zip(self.names, self._theta_a, self._theta_b, self.alpha_pre):
            alpha = torch.sigmoid(pre)
            out[n] = alpha * a + (1.0 - alpha) * b
        return out

    def forward(self, *args: Tensor) -> Tensor:
        return torch.func.functional_call(self.base, self.merged(), args)

    @torch.no_grad()
    def write(self) -> None:
        """Write the interpolated parameters into ``base`` (it stays frozen)."""
        state = dict(self.base.named_parameters())
        for n, t in self.merged().items():
            state[n].copy_(t)

    def apply(self) -> nn.Module:
        """Write the interpolated parameters into ``base``, unfreeze it, and return it (no α left inside)."""
        self.write()
        for n, p in self.base.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, True))
        return self.base


def pairwise(items: Sequence[M], merge: Callable[[M, M], M]) -> M:
    """Reduce by successive pairwise merges: (0, 1), (2, 3), ..., then the results, until one is left."""
    items = list(items)
    while len(items) > 1:
        merged = [merge(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]
        if len(items) % 2:
            merged.append(items[-1])
        items = merged
    return items[0]


def distill_loss(temperature: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """KL(teacher ‖ softmax(logits / T)) · T², the teacher given as probabilities at temperature T (Hinton et al.)."""

    def loss(logits: Tensor, probs: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits / temperature, -1), probs, reduction="batchmean") * temperature**2

    return loss


@torch.no_grad()
def teacher_probs(models: Sequence[nn.Module], x: Tensor, temperature: float = 1.0, batch_size: int = 256) -> Tensor:
    """The ensemble's mean softmax at temperature T: Tensor of shape (n_samples, n_classes), float32."""
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size]
        out.append(sum((m(xb).float() / temperature).softmax(-1) for m in models) / len(models))
    return torch.cat(out)


def np_merge(a: nn.Module, b: nn.Module, x: Tensor, targets: Tensor, train: TrainConfig | None = None, *,
             objective: str = "ce", temperature: float = 1.0, progress=None) -> nn.Module:
    """Merge ``b`` (already aligned to ``a``) into a copy of ``a`` with learned per-parameter α.

    BatchNorm buffers start at the average, the model trains in train mode (only
    α_pre is updated), and BatchNorm statistics are recomputed on ``x`` afterwards.
    The loss is the paper's cross-entropy on labels (``objective="ce"``) or, with
    ``objective="distill"``, the KL divergence from a teacher's probabilities at
    temperature T (:func:`distill_loss`; :func:`teacher_probs` gives the ensemble's),
    which needs no labels and does not learn the class prior of a skewed sample.

    Args:
        a, b: Models of one architecture; ``b``'s neurons aligned to ``a``'s.
        x: Inputs, Tensor of shape (n_samples, ...).
        targets: ``"ce"``: labels, Tensor of shape (n_samples,); ``"distill"``:
            probabilities, Tensor of shape (n_samples, n_classes).
        train: Adam settings; default the paper's (lr 0.01, 10 epochs, batch 32, no
            weight decay, no validation split).

    Returns:
        A copy of ``a`` holding the merged parameters, in eval mode.

    Example:
        >>> import torch
        >>> from fxfuse._config import TrainConfig
        >>> from fxfuse._npmerge import np_merge, teacher_probs
        >>> a, b, x = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.randn(32, 3)
        >>> m = np_merge(a, b, x, teacher_probs([a, b], x), TrainConfig(epochs=2), objective="distill")
        >>> m(x).shape
        torch.Size([32, 2])
    """
    from ._align import reset_batchnorm
    from ._solve import fit_gradient

    if objective not in ("ce", "distill"):
        raise ValueError(f"np_merge: objective must be 'ce' or 'distill', got {objective!r}")
    loss_fn = F.cross_entropy if objective == "ce" else distill_loss(temperature)
    train = train if train is not None else TrainConfig(lr=1e-2, epochs=10, weight_decay=0.0, val_split=0.0)
    merged = copy.deepcopy(a)
    with torch.no_grad():
        theirs = dict(b.named_buffers())
        for n, t in merged.named_buffers():
            if t.is_floating_point():
                t.copy_((t + theirs[n].to(t)) / 2)
    mix = Interpolation(merged, b)
    mix.train()
    try:
        fit_gradient(mix, x, targets, train, progress=progress, loss_fn=loss_fn)
    finally:
        mix.eval()
    mix.apply()
    reset_batchnorm(merged, x)
    return merged.eval()
