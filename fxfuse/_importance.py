"""Neuron importance scores of a level's outputs, computed with captum.

Scores follow "Model Fusion via Neuron Interpolation", section 4.1 and F.4:
captum's ``LayerConductance`` or ``LayerDeepLift`` on the level output, with the
label as target; absolute values are summed over positions or tokens and
averaged over samples. As in the paper (F.1), scores are not normalised: the
raw attributions of different models share a scale (the label's logit), and
normalising distorted the relative differences in our runs too. A floor of
1e-8 × the mean score keeps every neuron's weight positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

__all__ = ["IMPORTANCES", "level_scores"]

IMPORTANCES = ("uniform", "conductance", "deeplift")


class _Marked(nn.Module):
    """The chain of level modules with an Identity marker after level ``i`` for captum to attribute."""

    def __init__(self, levels: Sequence[GraphModule], i: int):
        super().__init__()
        self.prefix = nn.ModuleList(levels[: i + 1])
        self.mark = nn.Identity()
        self.suffix = nn.ModuleList(levels[i + 1 :])

    def forward(self, x: Tensor) -> Tensor:
        for m in self.prefix:
            x = m(x)
        x = self.mark(x)
        for m in self.suffix:
            x = m(x)
        return x


def level_scores(
    levels: Sequence[GraphModule],
    axes: Sequence[int],
    x: Tensor,
    labels: Tensor,
    importance: str,
    *,
    n_steps: int = 20,
    batch_size: int = 128,
) -> list[Tensor]:
    """Importance score of every neuron of every level of one model.

    Args:
        levels: The model's level modules (``LevelPlan.split()``).
        axes: The neuron axis of each level output.
        x: Inputs, Tensor of shape (n_samples, ...).
        labels: Targets for attribution, Tensor of shape (n_samples,).
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.

    Returns:
        One Tensor of shape (width,) per level, float64, positive.
    """
    widths = []
    with torch.no_grad():
        y = x[:1]
        for m, ax in zip(levels, axes):
            y = m(y)
            widths.append(y.shape[ax])
    if importance == "uniform":
        return [torch.ones(w, dtype=torch.float64, device=x.device) for w in widths]
    from captum.attr import LayerConductance, LayerDeepLift

    out = []
    for i, ax in enumerate(axes):
        model = _Marked(levels, i)
        if importance == "conductance":
            algo = LayerConductance(model, model.mark)
        else:
            algo = LayerDeepLift(model, model.mark)
        total = torch.zeros(widths[i], dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s : s + batch_size], labels[s : s + batch_size]
            if importance == "conductance":
                attr = algo.attribute(xb, target=yb, n_steps=n_steps)
            else:
                attr = algo.attribute(xb, baselines=torch.zeros_like(xb), target=yb)
            a = attr.detach().abs().to(torch.float64).movedim(ax, -1)
            total += a.reshape(a.shape[0], -1, a.shape[-1]).sum(1).sum(0)
        score = total / x.shape[0]
        out.append(score + 1e-8 * score.mean().clamp_min(1e-30))
    return out
