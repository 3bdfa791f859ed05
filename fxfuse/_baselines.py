"""Baselines that every fusion paper compares against, as GraphModules.

- ``vanilla``: plain parameter averaging, optionally with BatchNorm statistics
  recomputed on the fusion data (a REPAIR-style reset).
- ``ensemble``: one GraphModule that averages the models' logits.
- ``git-rebasin``: align ``models[1:]`` to ``models[0]`` neuron space by neuron space
  with activation matching (Hungarian on the squared L2 distance of the space's
  activations, importance-weighted as in HF), then average, each neuron's
  parameters weighted by its importance score ("Model Fusion via Neuron
  Interpolation", appendix C).
- ``otfusion``: activation-based optimal transport per neuron space (Singh and
  Jaggi, 2020), exact (network simplex), with the importance scores as the
  marginals; models of other widths are transported onto ``models[0]``'s.
- ``last-layer-kd``: ``models[0]`` with only its head retrained to match the mean
  softmax of all models (paper, section 5).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule

from ._align import align_with, matched_spaces, space_distances, space_scores
from ._errors import AlignmentError
from ._grouping import hungarian_pairs
from ._trace import trace

__all__ = ["average", "ensemble", "vanilla", "git_rebasin", "otfusion", "last_layer_kd", "np_merge_models"]


def average(
    gms: Sequence[GraphModule], spaces=None, scores: Sequence[dict[int, Tensor]] | None = None
) -> GraphModule:
    """A copy of ``gms[0]`` whose floating parameters and buffers are the mean of all models'.

    With ``spaces`` and per-model ``scores`` (aligned models), each neuron's
    parameters are averaged with weights proportional to its score in each model
    (appendix C): a tensor is weighted along its own neuron axis, dim 0 (a
    weight's output rows, a norm's channels), or, for tensors whose dim 0 has
    length 1 (class tokens, position embeddings), the first axis in a free space.
    Tensors without such an axis (the head) are averaged uniformly.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse._baselines import average
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> x = torch.randn(1, 2)
        >>> mean = average([fxfuse.trace(a, x), fxfuse.trace(b, x)])
        >>> torch.allclose(mean(x), (a(x) + b(x)) / 2)
        True
    """
    out = copy.deepcopy(gms[0])
    states = [g.state_dict() for g in gms]
    owner: dict[tuple[str, int], int] = {}
    if spaces is not None and scores is not None:
        owner = {t: s.index for s in spaces.free for t in s.tensors}
    merged = {}
    with torch.no_grad():
        for k, v in states[0].items():
            if not v.is_floating_point():
                merged[k] = v
                continue
            axis = next((d for d in range(v.ndim) if (k, d) in owner and (d == 0 or v.shape[0] == 1)), None)
            if axis is None:
                merged[k] = (sum(s[k].to(torch.float64) for s in states) / len(states)).to(v.dtype)
                continue
            shape = [1] * v.ndim
            shape[axis] = v.shape[axis]
            w = [sc[owner[(k, axis)]].to(v.device).reshape(shape) for sc in scores]
            total = sum(w)
            merged[k] = (sum(wi * s[k].to(torch.float64) for wi, s in zip(w, states)) / total).to(v.dtype)
    out.load_state_dict(merged)
    return out


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


def ensemble(prep, cfg) -> GraphModule:
    """A GraphModule averaging the models' logits, optionally per class with ``class_weights`` (n_models, n_classes)."""
    gms, class_weights = prep.models, cfg.class_weights
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if class_weights.shape[0] != len(gms) or bool((class_weights < 0).any()):
            raise ValueError(
                f"class_weights must be non-negative with shape (n_models={len(gms)}, n_classes), "
                f"got {tuple(class_weights.shape)}"
            )
    return trace(_Ensemble(gms, class_weights), prep.data.example.to(cfg.device))


def _transport_plan(cost: Tensor, mu: Tensor, nu: Tensor) -> Tensor:
    """Exact optimal transport plan (POT's network simplex), Tensor of shape (len(mu), len(nu))."""
    import numpy as np
    import ot

    a = mu.detach().cpu().double().numpy()
    b = nu.detach().cpu().double().numpy()
    plan, log = ot.emd(a / a.sum(), b / b.sum(), np.ascontiguousarray(cost.detach().cpu().double().numpy()),
                       numItermax=10_000_000, log=True)
    if log.get("warning"):
        raise AlignmentError(f"otfusion: the exact transport solver did not converge ({log['warning']})")
    return torch.from_numpy(plan).to(cost.device)


def _transport(gm: GraphModule, spaces, maps: dict[int, Tensor], like: GraphModule) -> GraphModule:
    """``like``'s architecture holding ``gm``'s parameters moved along every free space.

    ``maps[i]`` is a Tensor of shape (width in ``like``, width in ``gm``) applied
    along every axis of space ``i`` (OTFusion's barycentric map diag(1/β) Tᵀ).
    """
    out = copy.deepcopy(like)
    axes = {t: s.index for s in spaces.free for t in s.tensors}
    target = out.state_dict()
    new = {}
    for name, t in gm.state_dict().items():
        if t.is_floating_point():
            t = t.to(torch.float64)
            for d in range(t.ndim):
                if (name, d) in axes:
                    m = maps[axes[(name, d)]].to(t)
                    t = torch.tensordot(m, t, dims=([1], [d])).movedim(0, d)
        if tuple(t.shape) != tuple(target[name].shape):
            raise AlignmentError(
                f"otfusion: tensor `{name}` has shape {tuple(t.shape)} after transport but models[0] has "
                f"{tuple(target[name].shape)}; only free neuron spaces may differ in width"
            )
        new[name] = t.to(target[name].dtype)
    out.load_state_dict(new)
    return out


def otfusion(prep, cfg) -> GraphModule:
    """Activation-based OTFusion onto ``models[0]``'s architecture, then averaging.

    For each free neuron space, the ground cost between neuron i of model k and
    neuron j of the first model is the squared distance of their activations on
    the data, standardised by default (``match``; from streamed sums,
    :func:`fxfuse._align.space_distances`); the
    marginals are the neurons' importance scores, normalised (uniform by default).
    The exact plan T (network simplex) gives the barycentric map diag(1/β) Tᵀ,
    applied along every axis of the space (Singh and Jaggi, 2020). With equal
    widths and uniform scores the exact plan is a permutation, and it is solved
    as one (Hungarian), so the result equals git-rebasin's.

    Returns:
        A GraphModule of ``models[0]``'s architecture with the averaged parameters.

    Raises:
        AlignmentError: the spaces do not correspond, or none is free.
    """
    gms, data = prep.models, prep.data
    spaces = matched_spaces(gms, "otfusion", same_widths=False)
    scores = [space_scores(g, sp, data, cfg.importance, n_steps=cfg.importance_steps, device=cfg.device,
                           target=cfg.score_target)
              for g, sp in zip(gms, spaces)]
    dists = space_distances(gms, spaces, data, batch_size=cfg.batch_size, max_rows=cfg.max_rows, seed=cfg.seed,
                            match=cfg.match, device=cfg.device)
    maps: list[dict[int, Tensor]] = [{} for _ in gms]
    for k in range(1, len(gms)):
        for i, d in dists[k - 1].items():
            cost = d.T  # (width in model k, width in models[0])
            if cfg.importance == "uniform" and cost.shape[0] == cost.shape[1]:
                # the exact plan is a permutation: its map selects neuron match[j] for slot j
                maps[k][i] = torch.eye(cost.shape[0], dtype=cost.dtype, device=cost.device)[hungarian_pairs(cost.T)]
            else:
                plan = _transport_plan(cost, scores[k][i], scores[0][i])
                maps[k][i] = plan.T / plan.sum(0)[:, None]
    return average([gms[0]] + [_transport(gms[k], spaces[k], maps[k], like=gms[0]) for k in range(1, len(gms))])


def vanilla(prep, cfg) -> GraphModule:
    """Plain parameter averaging."""
    return average(prep.models)


def git_rebasin(prep, cfg) -> GraphModule:
    """Align ``models[1:]`` to ``models[0]`` by activation matching (:func:`fxfuse._align.align`), then average
    each neuron's parameters weighted by its importance score (appendix C)."""
    aligned = align_with(prep.models, prep.data, cfg)
    return average(aligned.models, aligned.spaces, aligned.scores)


def last_layer_kd(prep, cfg) -> GraphModule:
    """``models[0]`` with only its head level retrained to match the models' mean softmax.

    The head is the last level of :func:`fxfuse.passes.partition_levels`; its
    inputs are computed once (every fusion sample is needed for the fit). The
    loss is KL(mean softmax ‖ softmax(head)) with Adam; early stopping on a
    validation split keeps the best head.
    """
    from fxfuse.passes import partition_levels

    from ._engine import progress_bar
    from ._solve import fit_gradient

    gms = prep.models
    plan = partition_levels(trace(gms[0], prep.data.example.to(cfg.device)))
    levels = plan.split()
    feats, probs = [], []
    with torch.no_grad():
        for x, _ in prep.data.batches(cfg.batch_size, cfg.device):
            f = x
            for lv in levels[:-1]:
                f = lv(f)
            feats.append(f)
            probs.append(torch.stack([g(x).softmax(-1) for g in gms]).mean(0))

    def kl(logits: Tensor, p: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits, -1), p, reduction="batchmean")

    bar = progress_bar(cfg.train.epochs, "last-layer-kd", cfg.progress)
    fit_gradient(levels[-1], torch.cat(feats), torch.cat(probs), cfg.train, progress=bar, loss_fn=kl)
    if bar is not None:
        bar.close()
    return plan.gm


def np_merge_models(prep, cfg) -> GraphModule:
    """NP Merge (section III): align each pair, learn α, reset BatchNorm; pairwise for > 2 models.

    ``cfg.objective``: ``"distill"`` (default) learns α on the KL divergence from
    the mean softmax of *all* base models (the ensemble), so intermediate merges
    of more than two models keep aiming at the whole ensemble; ``"ce"`` is the
    paper's cross-entropy on the fusion labels.
    """
    from ._engine import progress_bar
    from ._npmerge import np_merge, pairwise, teacher_probs

    x, y = prep.data.materialise(device=cfg.device)  # every sample trains α
    if cfg.objective == "distill":
        targets = teacher_probs(prep.models, x, cfg.temperature, cfg.batch_size)
    else:
        targets = y

    def merge(a: GraphModule, b: GraphModule) -> GraphModule:
        pair = align_with([a, b], prep.data, cfg).models
        bar = progress_bar(cfg.train.epochs, f"np-merge ({cfg.objective})", cfg.progress)
        out = np_merge(*pair, x, targets, cfg.train, objective=cfg.objective, temperature=cfg.temperature,
                       progress=bar)
        if bar is not None:
            bar.close()
        return out

    return pairwise(prep.models, merge)
