"""The digits experiment shared by the demo, the benchmark and the quality tests.

Base models are trained on a non-IID (Dirichlet, appendix D.1) or sharded (D.2)
split of scikit-learn's digits; fusion uses samples from the first model's split,
as in the paper's Table 1 ("400 data points sampled from the dataset seen by the
first model"); accuracy is measured on a held-out quarter of the digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._train import BASE_TRAINING, train_classifier
from .data import dirichlet_split, load_digits, shard_split, train_test_split

__all__ = ["ARCHS", "Setting", "build_arch", "make_setting"]

ARCHS = ("mlp", "cnn", "mlp256")


def build_arch(arch: str, seed: int) -> nn.Module:
    """``"mlp"``: 64-64-32-10 MLP on 8×8 digits; ``"mlp256"``: 64-256-256-10 (the width of the NP Merge
    paper's MLPs); ``"cnn"``: timm ``test_resnet`` on 16×16 gray digits."""
    torch.manual_seed(seed)
    if arch in ("mlp", "mlp256"):
        h1, h2 = (64, 32) if arch == "mlp" else (256, 256)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10)
        )
    if arch == "cnn":
        import timm

        return timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")


@dataclass
class Setting:
    models: list[nn.Module]
    fusion: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    split_sizes: list[int]


def make_setting(
    arch: str, *, split: str = "dirichlet", n_models: int = 2, seed: int = 0, n_fusion: int = 400,
    alpha_min: float = 1.0,
) -> Setting:
    """Train ``n_models`` base models on a split of the digits' training part.

    ``alpha_min`` is the smallest Dirichlet concentration of the split
    (:func:`fxfuse.data.dirichlet_split`); smaller values give more skewed parts,
    with classes missing from some.
    """
    x, y = load_digits(size=16 if arch == "cnn" else 8)
    tr, te = train_test_split(len(y), 0.25, seed=seed)
    if split == "dirichlet":
        parts = dirichlet_split(y[tr], n_models, min_max_ratio=0.2, alpha_min=alpha_min, seed=seed)
    elif split == "shard":
        parts = shard_split(y[tr], n_models, seed=seed)
    else:
        raise ValueError(f"unknown split {split!r}; valid: dirichlet, shard")
    epochs = 15 if arch == "cnn" else 60
    models = []
    for k, p in enumerate(parts):
        m = build_arch(arch, seed=1000 * seed + k)
        models.append(train_classifier(m, x[tr][p], y[tr][p], BASE_TRAINING.replace(epochs=epochs, seed=seed + k)))
    first = parts[0][torch.randperm(len(parts[0]), generator=torch.Generator().manual_seed(seed))[:n_fusion]]
    return Setting(models, (x[tr][first], y[tr][first]), (x[te], y[te]), [len(p) for p in parts])
