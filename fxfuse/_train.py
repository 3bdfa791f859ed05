"""Small training and evaluation helpers for the demo, benchmarks and tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["train_classifier", "accuracy"]


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> nn.Module:
    """Train with Adam and cross-entropy, in place; returns the model in eval mode."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch_size):
            b = perm[s : s + batch_size]
            if len(b) < 2:
                continue  # BatchNorm needs two samples
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent."""
    was = model.training
    model.eval()
    try:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        correct = sum(
            int((model(x[s : s + batch_size].to(dev)).argmax(-1).cpu() == y[s : s + batch_size]).sum())
            for s in range(0, len(y), batch_size)
        )
    finally:
        model.train(was)
    return 100.0 * correct / len(y)
