"""The embedded dataset and the data splits of the paper's experiments.

The default data is scikit-learn's ``load_digits``: 1,797 real 8×8 handwritten
digits that ship inside scikit-learn, so nothing is downloaded.

Splits follow "Model Fusion via Neuron Interpolation", appendix D: non-IID
Dirichlet splits (D.1, ``min_max_ratio``) and sharded splits with disjoint
classes (D.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_digits", "dirichlet_split", "shard_split", "train_test_split", "as_tensors"]


def load_digits(size: int = 8, channels: int = 1, flatten: bool = False) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float tensors in [0, 1], upsampled for CNNs.

    Args:
        size: Image side; 8 is the original resolution, larger sizes are bilinear upsamplings.
        channels: 1, or 3 to repeat the gray channel for RGB models.
        flatten: Return Tensor of shape (1797, channels * size * size) instead of images.

    Returns:
        Inputs, Tensor of shape (1797, channels, size, size) (or flattened), and
        labels, Tensor of shape (1797,) with values 0–9.

    Example:
        >>> from fxfuse.data import load_digits
        >>> x, y = load_digits(size=16)
        >>> tuple(x.shape), int(y.max())
        ((1797, 1, 16, 16), 9)
    """
    from sklearn.datasets import load_digits as _sk_digits

    if size < 1 or channels not in (1, 3):
        raise ValueError(f"size must be >= 1 and channels 1 or 3, got size={size}, channels={channels}")
    bunch = _sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    if flatten:
        x = x.flatten(1)
    return x.contiguous(), torch.tensor(bunch.target, dtype=torch.long)


def train_test_split(n: int, test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded random split of ``range(n)`` into train and test indices."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def dirichlet_split(
    labels: Tensor, n_splits: int, *, min_max_ratio: float = 0.2, alpha_min: float = 1.0, seed: int = 0
) -> list[Tensor]:
    """Non-IID split of sample indices with Dirichlet class proportions (paper appendix D.1).

    For every class, the proportions of its samples that go to each split are drawn
    from ``Dir(α_1, …, α_K)``; the concentrations are evenly spaced from
    ``alpha_min`` to ``alpha_min / min_max_ratio`` and shuffled per class, so a
    smaller ratio gives more heterogeneous splits.

    Returns:
        One sorted index Tensor per split; together they cover every sample once.

    Example:
        >>> import torch
        >>> from fxfuse.data import dirichlet_split
        >>> parts = dirichlet_split(torch.arange(100) % 10, 2, seed=0)
        >>> sum(len(p) for p in parts)
        100
    """
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if not 0.0 < min_max_ratio <= 1.0:
        raise ValueError(f"min_max_ratio must be in (0, 1], got {min_max_ratio}")
    rng = np.random.default_rng(seed)
    alphas = np.linspace(alpha_min, alpha_min / min_max_ratio, n_splits)
    y = labels.cpu().numpy()
    parts: list[list[int]] = [[] for _ in range(n_splits)]
    classes = np.unique(y)
    rng.shuffle(classes)
    for c in classes:
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        props = rng.dirichlet(rng.permutation(alphas))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def shard_split(labels: Tensor, n_splits: int, *, seed: int = 0) -> list[Tensor]:
    """Sharded split: each split gets all samples of a disjoint set of classes (appendix D.2)."""
    classes = torch.unique(labels)
    if not 2 <= n_splits <= len(classes):
        raise ValueError(f"n_splits must be between 2 and the number of classes ({len(classes)}), got {n_splits}")
    perm = classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))]
    groups = torch.tensor_split(perm, n_splits)
    return [torch.nonzero(torch.isin(labels, g)).flatten() for g in groups]


def as_tensors(data: Any, what: str = "data") -> tuple[Tensor, Tensor | None]:
    """Collect fusion data into whole Tensors: (inputs, labels or None).

    Accepts every form :func:`fxfuse.fuse` takes (see :data:`fxfuse._collect.LABEL_RULES`),
    with the same checks.

    Example:
        >>> import torch
        >>> from fxfuse.data import as_tensors
        >>> x, y = as_tensors([(torch.zeros(2, 3), torch.tensor([0, 1])), (torch.ones(1, 3), torch.tensor([2]))])
        >>> tuple(x.shape), y.tolist()
        ((3, 3), [0, 1, 2])
    """
    from ._collect import FusionData

    return FusionData(data, what).materialise()
