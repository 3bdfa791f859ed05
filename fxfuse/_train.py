"""Small training and evaluation helpers for the demo, benchmarks and tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import TrainConfig

__all__ = ["train_classifier", "accuracy"]


BASE_TRAINING = TrainConfig(epochs=30, lr=3e-3, weight_decay=0.0, batch_size=32, val_split=0.0)


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, train: TrainConfig = BASE_TRAINING) -> nn.Module:
    """Train with Adam and cross-entropy (``train``'s epochs, lr, weight decay, batch, seed), in place.

    Returns the model in eval mode.
    """
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    gen = torch.Generator().manual_seed(train.seed)
    for _ in range(train.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), train.batch_size):
            b = perm[s : s + train.batch_size]
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
