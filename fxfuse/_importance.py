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

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

__all__ = ["IMPORTANCES", "level_scores", "node_scores"]

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
    out = []
    for i, ax in enumerate(axes):
        model = _Marked(levels, i)
        out.append(_attribute(model, model.mark, ax, widths[i], x, labels, importance, n_steps, batch_size))
    return out


def _attribute(
    model: nn.Module, layer: nn.Module, axis: int, width: int, x: Tensor, labels: Tensor, importance: str,
    n_steps: int, batch_size: int,
) -> Tensor:
    """|attribution| at ``layer``'s output, summed over all but ``axis`` and averaged over samples."""
    from captum.attr import LayerConductance, LayerDeepLift

    algo = LayerConductance(model, layer) if importance == "conductance" else LayerDeepLift(model, layer)
    total = torch.zeros(width, dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s : s + batch_size], labels[s : s + batch_size]
        if importance == "conductance":
            attr = algo.attribute(xb, target=yb, n_steps=n_steps)
        else:
            attr = algo.attribute(xb, baselines=torch.zeros_like(xb), target=yb)
        a = attr.detach().abs().to(torch.float64).movedim(axis, -1)
        total += a.reshape(a.shape[0], -1, a.shape[-1]).sum(1).sum(0)
    score = total / x.shape[0]
    return score + 1e-8 * score.mean().clamp_min(1e-30)


def node_scores(
    gm: GraphModule,
    taps: Sequence[tuple[str, int]],
    x: Tensor,
    labels: Tensor | None,
    importance: str,
    *,
    n_steps: int = 20,
    batch_size: int = 128,
) -> list[Tensor]:
    """Importance score of every neuron at arbitrary nodes of a traced model.

    A copy of ``gm`` gets an ``nn.Identity`` tap after each node, and captum
    attributes at the tap's output, as :func:`level_scores` does at level outputs.

    Args:
        gm: A GraphModule from :func:`fxfuse.trace` (its shape metadata gives the widths).
        taps: ``(node_name, neuron_dim)`` pairs.
        x: Inputs, Tensor of shape (n_samples, ...).
        labels: Targets for attribution, Tensor of shape (n_samples,); unused for
            ``"uniform"``.
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.

    Returns:
        One Tensor of shape (width,) per tap, float64, positive.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse._importance import node_scores
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> gm = fxfuse.trace(mlp, torch.randn(2, 4))
        >>> s = node_scores(gm, [("_1", 1)], torch.randn(16, 4), torch.zeros(16, dtype=torch.long), "conductance")
        >>> s[0].shape
        torch.Size([8])
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    widths = []
    for name, d in taps:
        if name not in by_name:
            raise ValueError(f"node_scores: no node named {name!r} in the graph; valid names: {list(by_name)[:10]} ...")
        widths.append(by_name[name].meta["fxfuse"]["shape"][d])
    if importance == "uniform":
        return [torch.ones(w, dtype=torch.float64, device=x.device) for w in widths]
    if labels is None:
        raise ValueError(f"importance={importance!r} needs labels to attribute to; pass (inputs, labels) as data")
    tapped = copy.deepcopy(gm)
    nodes = {n.name: n for n in tapped.graph.nodes}
    for k, (name, _) in enumerate(taps):
        node = nodes[name]
        tapped.add_submodule(f"fxfuse_tap_{k}", nn.Identity())
        with tapped.graph.inserting_after(node):
            tap = tapped.graph.call_module(f"fxfuse_tap_{k}", (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
    tapped.graph.lint()
    tapped.recompile()
    tapped.eval()
    return [
        _attribute(tapped, tapped.get_submodule(f"fxfuse_tap_{k}"), d, w, x, labels, importance, n_steps, batch_size)
        for k, ((_, d), w) in enumerate(zip(taps, widths))
    ]
