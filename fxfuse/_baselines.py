"""Baselines that every fusion paper compares against, as GraphModules.

- ``vanilla``: plain parameter averaging, optionally with BatchNorm statistics
  recomputed on the fusion data (a REPAIR-style reset).
- ``ensemble``: one GraphModule that averages the models' logits.
- ``git-rebasin``: align ``models[1:]`` to ``models[0]`` neuron space by neuron space
  with activation matching (Hungarian on the L2 distance of the space's
  activations), then average.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter

from ._errors import AlignmentError
from ._grouping import hungarian_pairs
from ._trace import trace

__all__ = ["average", "ensemble", "align", "reset_batchnorm"]


def average(gms: Sequence[GraphModule], weights: Sequence[float] | None = None) -> GraphModule:
    """A copy of ``gms[0]`` whose floating parameters and buffers are the (weighted) mean of all models'."""
    w = torch.tensor(weights if weights is not None else [1.0] * len(gms), dtype=torch.float64)
    w = w / w.sum()
    out = copy.deepcopy(gms[0])
    states = [g.state_dict() for g in gms]
    merged = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            merged[k] = sum(float(wi) * s[k].to(torch.float64) for wi, s in zip(w, states)).to(v.dtype)
        else:
            merged[k] = v
    out.load_state_dict(merged)
    return out


@torch.no_grad()
def reset_batchnorm(gm: GraphModule, x: Tensor, batch_size: int = 256) -> GraphModule:
    """Recompute every BatchNorm's running statistics on ``x`` (cumulative average), in place."""
    bns = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return gm
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    try:
        for s in range(0, x.shape[0], batch_size):
            gm(x[s : s + batch_size])
    finally:
        for m, mom in saved:
            m.momentum = mom
            m.eval()
    return gm


class _Ensemble(nn.Module):
    def __init__(self, models: Sequence[nn.Module], weights: Tensor | None):
        super().__init__()
        self.members = nn.ModuleList(models)
        if weights is not None:
            self.register_buffer("class_weights", weights)
        else:
            self.class_weights = None

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.stack([m(x) for m in self.members])
        if self.class_weights is None:
            return logits.mean(0)
        w = self.class_weights / self.class_weights.sum(0, keepdim=True)
        return (logits * w[:, None, :]).sum(0)


def ensemble(gms: Sequence[GraphModule], example: Tensor, class_weights: Tensor | None = None) -> GraphModule:
    """A GraphModule averaging the models' logits, optionally per class with weights (n_models, n_classes)."""
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if class_weights.shape[0] != len(gms) or bool((class_weights < 0).any()):
            raise ValueError(
                f"class_weights must be non-negative with shape (n_models={len(gms)}, n_classes), "
                f"got {tuple(class_weights.shape)}"
            )
    return trace(_Ensemble(gms, class_weights), example)


class _Collect(Interpreter):
    def __init__(self, gm: GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, list[Tensor]] = {n: [] for n in names}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name].append(out.detach())
        return out


def _space_features(values: dict[str, Tensor], space, max_rows: int, seed: int) -> Tensor:
    """Activations of a space's nodes, neurons last: Tensor of shape (n_rows, space.size), float64."""
    parts = [values[name].movedim(d, -1).reshape(-1, space.size) for name, d in space.nodes]
    feats = torch.cat(parts).to(torch.float64)
    if feats.shape[0] > max_rows:
        g = torch.Generator().manual_seed(seed)
        feats = feats[torch.randperm(feats.shape[0], generator=g)[:max_rows].to(feats.device)]
    return feats


@torch.no_grad()
def align(
    gms: Sequence[GraphModule], x: Tensor, *, batch_size: int = 256, max_rows: int = 50_000, seed: int = 0
) -> list[GraphModule]:
    """Permute ``gms[1:]`` so that their neurons match ``gms[0]``'s, space by space.

    For each free neuron space, the cost of matching neuron j of the first model
    with neuron k of another is the squared L2 distance between their activations
    on ``x`` (over every activation of the space); ``linear_sum_assignment`` solves
    it. Every model keeps its function.

    Returns:
        ``[gms[0], aligned gms[1], ...]`` (new GraphModules for the aligned ones).

    Raises:
        AlignmentError: the models' spaces differ, or no space is free (the message
            names what fixed them).
    """
    from fxfuse.passes import neuron_spaces, permute

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spaces = [neuron_spaces(g) for g in gms]
    sig = [[(s.size, s.tensors, s.fixed) for s in sp] for sp in spaces]
    for k in range(1, len(gms)):
        if sig[k] != sig[0]:
            raise AlignmentError(
                f"models[{k}] has different neuron spaces than models[0] ({len(spaces[k])} vs {len(spaces[0])}); "
                "permutation alignment needs the same architecture and widths. Use method='kf-linear' for "
                "models of different widths."
            )
    free = spaces[0].free
    if not free:
        reasons = sorted({s.reason for s in spaces[0]})
        raise AlignmentError(
            f"no neuron space of {type(gms[0]).__name__} can be permuted: all {len(spaces[0])} are fixed "
            f"({'; '.join(reasons)}). Permutation alignment has nothing to align; use method='kf-linear', "
            "or mark the op that fixes them as a leaf only if a handler is added for it."
        )
    needed = {name for s in free for name, _ in s.nodes}

    def collect(gm: GraphModule) -> dict[str, Tensor]:
        interp = _Collect(gm, needed)
        for s in range(0, x.shape[0], batch_size):
            interp.run(x[s : s + batch_size])
        return {n: torch.cat(v) for n, v in interp.values.items()}

    ref = collect(gms[0])
    out = [gms[0]]
    for k in range(1, len(gms)):
        vals = collect(gms[k])
        perms = {}
        for s in free:
            a = _space_features(ref, s, max_rows, seed)
            b = _space_features(vals, s, max_rows, seed)
            cost = torch.cdist(a.T, b.T) ** 2
            perms[s.index] = hungarian_pairs(cost)
        out.append(permute(gms[k], spaces[k], perms))
    return out
