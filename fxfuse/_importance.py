"""Neuron importance scores of a level's outputs, computed with captum.

Scores follow "Model Fusion via Neuron Interpolation", section 4.1 and F.4:
captum's ``LayerConductance`` or ``LayerDeepLift`` on the level output, with the
label as target; absolute values are summed over positions or tokens and
averaged over samples. As in the paper (F.1), scores are not normalised: the
raw attributions of different models share a scale (the label's logit), and
normalising distorted the relative differences in our runs too. A floor of
1e-8 × the mean score keeps every neuron's weight positive.

Both attributions are computed for every level from one set of passes per batch
(:func:`_conductance_all`, :func:`_deeplift_all`); :func:`_attribute`, captum's
per-layer route, is the reference they are tested against.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

__all__ = ["IMPORTANCES", "level_scores", "node_scores"]

IMPORTANCES = ("uniform", "conductance", "deeplift")
# what node_scores attributes: each sample's label, or the class the scored model predicts for it
SCORE_TARGETS = ("labels", "own")

# Conductance's integration steps by default: the reference implementation's (its ``Conductance`` scores call
# captum's ``LayerConductance`` with ``n_steps=10``). Each step is one more copy of every batch in the forward and
# backward passes; on the CNN of benchmarks/fusion_table.py 10 steps give fusions as accurate as 20 (README).
CONDUCTANCE_STEPS = 10

# Bytes of activations one scoring pass may keep for its backward pass, all copies of its batch together (estimated
# by :func:`sample_bytes`); batches are cut to fit, down to one sample. Without it conductance's 11 copies of 128
# samples of a resnet50 at 224 px would keep ~200 GiB (measured here: 22 copies 2.6 GiB, 44 copies 4.8 GiB of peak
# memory, about 110 MiB per copy; the estimate says 154 MiB per sample). Smaller passes were not slower here:
# resnet50's conductance on 400 samples at 32 px took 20.9 s in passes of 59 samples, 30.6 s in passes of 128.
SCORE_PASS_BYTES = 2 << 30


def sample_bytes(gm: GraphModule) -> int:
    """Bytes of activations one sample leaves for a backward pass through ``gm``, estimated from the traced shapes
    (``meta["fxfuse"]``): the sum of every op's output per sample (the batch dim dropped)."""
    total = 0
    for n in gm.graph.nodes:
        meta = n.meta.get("fxfuse", {}) if n.op in ("call_module", "call_function", "call_method") else {}
        shape, dtype = meta.get("shape"), meta.get("dtype")
        if isinstance(shape, tuple) and len(shape) >= 1:
            total += math.prod(int(d) for d in shape[1:]) * (dtype.itemsize if isinstance(dtype, torch.dtype) else 4)
    return total


def scoring_batch(gm: GraphModule, importance: str, batch_size: int, n_steps: int = CONDUCTANCE_STEPS) -> int:
    """Samples per attribution pass: ``batch_size``, cut so that the pass's copies of them (conductance: n_steps + 1;
    DeepLift: input and baseline, counted twice, as captum's rescale hooks keep every nonlinearity's input and
    output again: measured here, resnet50 at 224 px, about twice conductance's memory per copy) keep at most
    :data:`SCORE_PASS_BYTES` of activations (at least one sample)."""
    copies = n_steps + 1 if importance == "conductance" else 4
    return max(1, min(batch_size, SCORE_PASS_BYTES // max(copies * sample_bytes(gm), 1)))


def level_scores(plan: Any, data: Any, importance: str, **kwargs: Any) -> list[Tensor]:
    """Importance score of every neuron of every level of one model: :func:`node_scores` at the level outputs.

    Args:
        plan: The model's :class:`fxfuse.passes.LevelPlan`.
        data: Labelled fusion data: a :class:`fxfuse._collect.FusionData` or any
            form it accepts, e.g. ``(inputs, labels)``; streamed batch by batch.
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.
        **kwargs: ``n_steps``, ``batch_size``, ``device``, ``progress`` as for :func:`node_scores`.

    Returns:
        One Tensor of shape (width,) per level, float64, positive.
    """
    return node_scores(plan.gm, [(lv.output, lv.neuron_axis) for lv in plan], data, importance, **kwargs)


def _as_data(data: Any):
    from ._collect import FusionData

    return data if isinstance(data, FusionData) else FusionData(data)


def _attribute(
    model: nn.Module, layer: nn.Module, axis: int, width: int, data, importance: str, n_steps: int,
    batch_size: int, device,
) -> Tensor:
    """|attribution| at ``layer``'s output, summed over all but ``axis`` and averaged over samples."""
    from captum.attr import LayerConductance, LayerDeepLift

    algo = LayerConductance(model, layer) if importance == "conductance" else LayerDeepLift(model, layer)
    total, n = None, 0
    for xb, yb in data.batches(batch_size, device):
        if importance == "conductance":
            attr = algo.attribute(xb, target=yb, n_steps=n_steps)
        else:
            attr = algo.attribute(xb, baselines=torch.zeros_like(xb), target=yb)
        part = _summed(attr, axis)
        total = part if total is None else total + part
        n += xb.shape[0]
    from ._dist import all_reduce_number

    return _mean_score(total, all_reduce_number(n))


def _summed(attr: Tensor, axis: int) -> Tensor:
    """|attr| summed over samples and every dim but ``axis``: float64, shape (width,)."""
    a = attr.detach().abs().to(torch.float64).movedim(axis, -1)
    return a.reshape(a.shape[0], -1, a.shape[-1]).sum(1).sum(0)


def _mean_score(total: Tensor, n: int) -> Tensor:
    """The per-sample mean of summed attributions over ``n`` samples (all shards), floored at 1e-8 × its mean."""
    from ._dist import all_reduce_

    score = all_reduce_(total) / n  # sums over the shards of a process group
    return score + 1e-8 * score.mean().clamp_min(1e-30)


def _gauss_legendre_alphas(n: int) -> list[float]:
    """The interpolation points of captum's default ``"gausslegendre"`` rule, in [0, 1], ascending."""
    import numpy as np

    return list(0.5 * (1 + np.polynomial.legendre.leggauss(n)[0]))


def _channels_last_if_it_runs(model: nn.Module, xb: Tensor) -> bool:
    """Put ``model`` (a private copy) in channels-last memory format when its input ``xb`` is a 4-d image batch and
    a forward pass on two of its samples runs that way; return whether it did.

    Every op computes the same function in either format, and oneDNN's convolutions are faster channels-last on
    the CPU (forward and backward pass on 400 samples at 32 px: resnet18 1.8×, convnext_atto 1.4×,
    mobilenetv3_small_100 2.5×, measured here). A model that calls ``.view`` on a conv output fails loudly in
    that format; the probe catches that and the passes stay in the standard format. Only 4-d parameters and
    buffers change format (``Module.to(memory_format=...)`` refuses a 5-d one, e.g. the attention-mask constant
    a traced Swin holds)."""
    if xb.dim() != 4:
        return False
    _four_d_in(model, torch.channels_last)
    try:
        with torch.no_grad():
            model(xb[:2].contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        _four_d_in(model, torch.contiguous_format)
        return False
    return True


def _four_d_in(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Put every 4-d parameter and buffer of ``model`` in ``memory_format``, in place (the others as they are)."""
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=memory_format)
        for name, b in mod.named_buffers(recurse=False):  # (yields no None buffers)
            if b.dim() == 4:
                mod._buffers[name] = b.contiguous(memory_format=memory_format)


def _keep_outputs(layers: list[nn.Module], saved: list) -> list:
    """Forward hooks that keep each layer's output in ``saved[k]`` and pass a clone on, as captum's do, so that an
    in-place op after the layer cannot change what was kept; returns their handles."""

    def keep(k: int):
        def hook(module, inputs, out):
            saved[k] = out
            return out.clone()
        return hook

    return [layer.register_forward_hook(keep(k)) for k, layer in enumerate(layers)]


def _all_at_once(model: nn.Module, layers: list[nn.Module], axes: list[int], data, batch_size: int, device,
                 progress, *, copies: int, inputs, attribution, rules=contextlib.nullcontext,
                 own: bool = False, x_first: bool = False) -> list[Tensor]:
    """Attributions at every layer from one forward and one backward pass per batch.

    ``inputs(xb)`` stacks ``copies`` versions of the batch (interpolated inputs, or inputs and baselines); the
    target logits of all of them are differentiated at once with respect to every layer's output ``a``, and
    ``attribution(a, ∂F/∂a, m)`` (m samples in the batch) gives the layer's attribution per sample. ``rules()``
    is the context in which the passes run (DeepLift's gradient rules). With ``own`` the target of each sample is
    the model's own predicted class on it instead of its label: read from the pass itself when ``x_first`` (the
    first m rows of ``inputs(xb)`` are the batch), else from one more forward pass without gradients."""
    totals: list[Tensor | None] = [None] * len(layers)
    n, fmt = 0, None
    for xb, yb in data.batches(batch_size, device):
        if fmt is None:  # decided on the first batch
            fmt = _channels_last_if_it_runs(model, xb)
        if fmt:
            xb = xb.contiguous(memory_format=torch.channels_last)
        m = xb.shape[0]
        if own and not x_first:
            with torch.no_grad():
                yb = model(xb).argmax(1)
        saved: list[Tensor | None] = [None] * len(layers)
        handles = _keep_outputs(layers, saved)
        try:
            with rules():
                out = model(inputs(xb).requires_grad_())
                if own and x_first:
                    yb = out[:m].detach().argmax(1)
                target = yb.repeat(copies).reshape(-1, 1).to(out.device)
                grads = torch.autograd.grad(torch.gather(out, 1, target).sum(), saved, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for k, (a, g) in enumerate(zip(saved, grads)):
            a = a.detach()
            if g is None:  # the target does not depend on this layer: no attribution (the floor of _mean_score)
                g = torch.zeros_like(a)
            part = _summed(attribution(a, g, m), axes[k])
            totals[k] = part if totals[k] is None else totals[k] + part
        n += m
        if progress is not None:
            progress.update(1)
    from ._dist import all_reduce_number

    n = all_reduce_number(n)  # samples of all shards
    return [_mean_score(total, n) for total in totals]


def _conductance_all(model: nn.Module, layers: list[nn.Module], axes: list[int], data, n_steps: int,
                     batch_size: int, device, progress=None, own: bool = False) -> list[Tensor]:
    """:func:`_attribute`'s conductance at every layer at once: one set of interpolated forward passes and one
    backward pass per batch serve all layers, instead of one set per layer.

    The same computation as captum's ``LayerConductance`` (zero baseline, Gauss-Legendre points): with inputs
    α_k·x at the n_steps + 1 points and a_k the layer's output there, the attribution is
    Σ_k ∂F_target/∂a (at α_k) · (a_{k+1} − a_k), k < n_steps.
    """
    alphas = _gauss_legendre_alphas(n_steps + 1)

    def attribution(a: Tensor, g: Tensor, m: int) -> Tensor:
        return ((a[m:] - a[:-m]) * g[:-m]).reshape(n_steps, m, *a.shape[1:]).sum(0)

    return _all_at_once(model, layers, axes, data, batch_size, device, progress, copies=n_steps + 1,
                        inputs=lambda xb: torch.cat([a * xb for a in alphas]),  # baseline 0 + α(x − 0)
                        attribution=attribution, own=own)


def _deeplift_all(model: nn.Module, layers: list[nn.Module], axes: list[int], data, batch_size: int,
                  device, progress=None, own: bool = False) -> list[Tensor]:
    """:func:`_attribute`'s DeepLift at every layer at once: one forward and one backward pass per batch serve
    all layers, instead of one pair per layer.

    The same computation as captum's ``LayerDeepLift`` (zero baseline, rescale rule, multiplied by the
    difference from the baseline): inputs and baselines run as one batch [x; 0] through the model with captum's
    own DeepLift hooks on its nonlinear modules (``DeepLift._register_hooks``: the rescale rule replaces their
    gradients in the backward pass); the attribution at a layer is (a(x) − a(0)) · ∂F/∂a, F the sum of the
    target logits of both halves, as captum takes it. Gradients at a layer depend only on the modules after
    it, so one backward pass gives every layer's.
    """
    from captum.attr import LayerDeepLift

    dl = LayerDeepLift(model, layers[0])  # only for its hooks on the nonlinear modules

    @contextlib.contextmanager
    def rules():
        try:
            model.apply(lambda mod: dl._register_hooks(mod, attribute_to_layer_input=False))
            yield
        finally:
            dl._remove_hooks([])
            dl.forward_handles, dl.backward_handles = [], []

    return _all_at_once(model, layers, axes, data, batch_size, device, progress, copies=2,
                        inputs=lambda xb: torch.cat([xb, torch.zeros_like(xb)]),
                        attribution=lambda a, g, m: (a[:m] - a[m:]) * g[:m], rules=rules, own=own, x_first=True)


def _tapped(gm: GraphModule, names: list[str]) -> GraphModule:
    """``gm`` in eval mode with an ``nn.Identity`` module ``fxfuse_tap_<k>`` after the k-th named node.

    The result has a graph of its own but shares ``gm``'s submodules and parameters (deep-copying them took 0.3 s
    for a resnet50 here, per model and scoring); a ``gm`` with a module in training mode is deep-copied first, so
    that putting it in eval mode leaves ``gm`` as it was. (The scoring passes may put the shared parameters in
    channels-last format, :func:`_channels_last_if_it_runs`, which computes the same function.)"""
    if any(m.training for m in gm.modules()):
        gm = copy.deepcopy(gm).eval()
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    tapped = GraphModule(gm, graph)
    nodes = {n.name: n for n in tapped.graph.nodes}
    for k, name in enumerate(names):
        node = nodes[name]
        tapped.add_submodule(f"fxfuse_tap_{k}", nn.Identity())
        with tapped.graph.inserting_after(node):
            tap = tapped.graph.call_module(f"fxfuse_tap_{k}", (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
    tapped.graph.lint()
    tapped.recompile()
    return tapped.eval()


def node_scores(
    gm: GraphModule,
    taps: Sequence[tuple[str, int]],
    data: Any,
    importance: str,
    *,
    n_steps: int = CONDUCTANCE_STEPS,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: Any = None,
    target: str = "labels",
) -> list[Tensor]:
    """Importance score of every neuron at arbitrary nodes of a traced model.

    A copy of ``gm`` gets an ``nn.Identity`` tap after each node, and captum
    attributes at the tap's output, as :func:`level_scores` does at level outputs.

    Args:
        gm: A GraphModule from :func:`fxfuse.trace` (its shape metadata gives the widths).
        taps: ``(node_name, neuron_dim)`` pairs.
        data: Fusion data as :func:`level_scores` takes it; its labels are the
            attribution targets with ``target="labels"`` (unused for ``"uniform"``).
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.
        n_steps: Conductance's integration steps (default 10, the reference implementation's).
        batch_size: Samples per attribution pass at most; fewer where the pass's copies of them would keep more
            than ``SCORE_PASS_BYTES`` of activations (:func:`scoring_batch`).
        progress: Anything with ``update(1)`` (a tqdm bar), called once per batch of attributions.
        target: Which logit of each sample is attributed: ``"labels"`` (the sample's label, as the papers do)
            or ``"own"`` (the class the model itself predicts for it: needs no labels).

    Returns:
        One Tensor of shape (width,) per tap, float64, positive.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse._importance import node_scores
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> gm = fxfuse.trace(mlp, torch.randn(2, 4))
        >>> s = node_scores(gm, [("_1", 1)], (torch.randn(16, 4), torch.zeros(16, dtype=torch.long)), "conductance")
        >>> s[0].shape
        torch.Size([8])
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    widths = []
    for name, d in taps:
        if name not in by_name:
            raise ValueError(f"node_scores: no node named {name!r} in the graph; valid names: {list(by_name)[:10]} ...")
        widths.append(by_name[name].meta["fxfuse"]["shape"][d])
    if importance not in IMPORTANCES:
        raise ValueError(f"node_scores: unknown importance {importance!r}; valid importance scores: "
                         f"{', '.join(IMPORTANCES)}")
    if target not in SCORE_TARGETS:  # checked for uniform scores too: a typo must not pass silently
        raise ValueError(f"node_scores: unknown target {target!r}; valid: {', '.join(map(repr, SCORE_TARGETS))}")
    if importance == "uniform":
        dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
        return [torch.ones(w, dtype=torch.float64, device=dev) for w in widths]
    data = _as_data(data)
    if target == "labels" and not data.has_labels:
        raise ValueError(f"importance={importance!r} with target='labels' needs labels to attribute to; pass "
                         "(inputs, labels) as data, or attribute to each model's own prediction (target='own')")
    batch_size = scoring_batch(gm, importance, batch_size, n_steps)  # bounded activation memory per pass
    tapped = _tapped(gm, [name for name, _ in taps])
    layers = [tapped.get_submodule(f"fxfuse_tap_{k}") for k in range(len(taps))]
    axes = [d for _, d in taps]
    # every tap from one set of passes (captum's LayerConductance / LayerDeepLift, per tap, in _attribute)
    if importance == "conductance":
        return _conductance_all(tapped, layers, axes, data, n_steps, batch_size, device, progress, own=target == "own")
    return _deeplift_all(tapped, layers, axes, data, batch_size, device, progress, own=target == "own")
