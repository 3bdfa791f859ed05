"""The fusion orchestrator: ``fxfuse.fuse``. The stages live in :mod:`fxfuse._engine`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from . import _baselines, _dist
from ._collect import Collector, FusionData
from ._errors import FxFuseError
from ._config import make_config
from ._engine import align_depth, as_model_list, emit, format_report, fuse_level, prepare, progress_bar, score_neurons
from ._methods import BASELINES, LEVELWISE, METHODS, get_method

__all__ = ["fuse", "format_report", "METHODS", "LEVELWISE", "BASELINES"]


def fuse(
    models: Sequence[nn.Module],
    data: Any,
    *,
    method: str = "kf-gradient",
    importance: str = "uniform",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> GraphModule:
    """Fuse several trained models of one architecture into one model, level by level.

    Implements "Model Fusion via Neuron Interpolation" (Algorithm 1) and the
    baselines it compares against. The steps (each a function of
    :mod:`fxfuse._engine`, callable on its own):

    1. validate every argument into one frozen config (:func:`fxfuse._config.make_config`);
    2. prepare: trace copies of the models, check them, cut them into levels
       (:func:`fxfuse.trace`, :func:`fxfuse.passes.partition_levels`); whole-model
       baselines (vanilla, ensemble, last-layer-kd, git-rebasin, otfusion,
       np-merge) build their model from here;
    3. depth alignment: models of different depth are aligned to the deepest by
       cross-layer alignment (CLAFusion: 1 − linear CKA of level outputs, a dynamic
       program between pinned, shape-changing levels) and get exact identity levels
       where they lack one (:func:`fxfuse.passes.align_depth`,
       :func:`fxfuse.passes.insert_identity`); into a shallower ``target=``, a deeper
       model's unmatched levels are merged into the matched level after them; equal
       depths pass through;
    4. importance scores of every neuron of every level of every model;
    5. for each level i: collect (stream the data once: base outputs, and the
       fused level's input — the fused model's own level i-1 output), group
       (HF: Hungarian; KF: importance-weighted k-means; for closed-form levels on
       the projection onto span of the fused input, appendix B.2; the head keeps
       class identity), solve (closed form, block levels op by op in closed form
       (:mod:`fxfuse._blocks`), Adam on the MSE to the targets, or NP Merge's α),
       write (:func:`fxfuse.passes.rewrite_params`);
    6. emit the fused GraphModule in eval mode on ``device`` with the per-level
       report in ``fused.meta["fxfuse"]``.

    Args:
        models: Two or more trained models (a list or an ``nn.ModuleList``) of one
            family: widths may differ for the k-means methods, and depths (blocks
            per stage, hidden layers) for hf-*/kf-* methods.
        data: Fusion data, streamed batch by batch: a Tensor of inputs, a tuple
            ``(inputs, labels)``, a dict ``{"inputs", "labels"}``, or an iterable (a
            list, a DataLoader) of Tensors, pairs or dicts. A tuple of two Tensors
            is always (inputs, labels); a list is always a list of batches. Labels
            are integer class indices of shape (n_samples,). See
            :data:`fxfuse._collect.LABEL_RULES`.
        method: A name of :data:`fxfuse._methods.METHODS`: ``"hf-linear"``,
            ``"kf-linear"``, ``"kf-gradient"``, ``"hf-gradient"``,
            ``"np-merge-levelwise"``, or a baseline: ``"vanilla"``, ``"ensemble"``,
            ``"last-layer-kd"``, ``"git-rebasin"``, ``"otfusion"``, ``"np-merge"``.
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.
        device: Where to compute; defaults to CUDA when available, else CPU.
        seed: Seed of k-means, data splits and gradient fitting.
        progress: Show progress bars and print the per-level report.
        **options: ``target`` (a model whose architecture the fused model takes;
            default ``models[0]``, or the deepest model when depths differ; a shallower one merges
            the deeper models' extra levels), ``cla_samples`` (models of
            different depth: samples the CKA compares, default 256), ``held_out`` (a fraction of the
            samples no fit sees; every level's and block op's error is also measured on them, default 0),
            ``reset_bn``, ``class_weights``, ``max_rows``,
            ``batch_size``, ``memory_budget`` (bytes of level outputs cached between
            levels, default 256 MiB; beyond it they are recomputed), ``n_init``,
            ``importance_steps``, ``importance_target`` (what conductance and DeepLift attribute: ``"own"``,
            default, each model's own prediction, needs no labels; ``"labels"``, each sample's label, as the
            reference implementation; ``"ensemble"``, the base models' ensemble prediction),
            ``match`` (alignment methods: ``"correlation"``,
            default, or ``"inner"``), ``objective`` (np-merge: ``"distill"``, default,
            needs no labels; ``"ce"``, the paper's, needs labels) and ``temperature``,
            ``blocks`` (``*-linear``: ``"closed-form"``, default, solves ResNet-style block
            levels op by op; ``"gradient"`` fits them by Adam), ``start`` (``*-gradient``:
            ``"closed-form"``, default, starts Adam from the linear solution where one
            exists; ``"first"`` from the first model's weights), ``regularisation`` (level-wise methods:
            ``"gcv"``, default, a ridge chosen by generalised cross-validation for every op solved in
            closed form, inside blocks too; ``"pinv"``, the minimum-norm pseudo-inverse solution at its
            default rank cut-off, as the reference implementation), ``hf_cost`` (hf-*: ``"squared"``,
            default, the paper's Eq. 7; ``"distance"``, the reference implementation's unsquared pair cost),
            and the gradient settings ``epochs``, ``lr``,
            ``weight_decay``, ``train_batch_size``, ``val_split``, ``patience``,
            ``noise`` (Table 5, Setting 1; np-merge: lr 0.01 for 10 epochs).

    Returns:
        The fused model, a plain ``torch.fx.GraphModule``, in the dtype and with
        the ``requires_grad`` flags of the fused architecture. The input models
        are never modified; fits run in float32 on copies, whatever their flags.

    Raises:
        ValueError / TypeError: a bad argument, option, model or data (the message
            names it and how to fix it).
        TraceError: a model cannot run on the fusion inputs.
        AlignmentError: the models' levels or neuron spaces do not correspond.
        FxFuseError: non-finite activations (the message names the level), or a
            module called in several levels (tied weights).

    Example:
        >>> import torch, fxfuse
        >>> _ = torch.manual_seed(0)
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> fused = fxfuse.fuse([a, a], torch.randn(64, 4), method="kf-linear", progress=False)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(fused(x), a(x), atol=1e-4)
        True
    """
    if not _dist.is_distributed():
        return _fuse(models, data, method, importance, device, seed, progress, **options)
    try:
        return _fuse(models, data, method, importance, device, seed, progress, **options)
    except Exception as e:  # every rank says which rank it is; a rank blocked in a collective says why
        if str(e).startswith("rank "):
            raise
        msg = f"{_dist.rank_prefix()}{type(e).__name__}: {e}"
        if isinstance(e, RuntimeError) and not isinstance(e, FxFuseError):
            raise _dist.DistributedError(f"{msg}; a collective failed, most likely because another rank stopped: "
                                         "see that rank's error") from e
        try:
            wrapped = type(e)(msg)
        except Exception:  # an exception type that cannot be rebuilt from a message
            raise e from None
        raise wrapped from e


def _fuse(models, data, method, importance, device, seed, progress, **options) -> GraphModule:
    t_start = time.perf_counter()
    # 1. validate
    cfg = make_config(method, importance, device, seed, progress, **options)
    spec = get_method(cfg.method)
    if _dist.is_distributed():
        # data is this process's shard; every statistic is summed over the ranks (fxfuse._dist)
        cfg = _dist.broadcast_seed(cfg)
        if not progress or _dist.world()[0] != 0:
            cfg = dataclasses.replace(cfg, progress=False)  # rank 0 alone shows progress
    data = data if isinstance(data, FusionData) else FusionData(data)
    held = None
    if cfg.held_out:  # samples no fit sees, on which every level's and op's error is measured too
        data, held = data.split(cfg.held_out, cfg.seed)
    model_list = as_model_list(models)
    if spec.pairwise and spec.levelwise and len(model_list) > 2:
        # NP Merge, section III-C: successive pairwise merges (whole-model np-merge pairs up on its own)
        from ._npmerge import pairwise

        return pairwise(model_list, lambda a, b: _fuse([a, b], data, method=method, importance=importance,
                                                      device=device, seed=seed, progress=progress, **options))
    # 2. prepare: traced copies, checks, level plans
    prep = prepare(model_list, data, cfg)
    if held is not None:
        held.input_dtype = prep.data.input_dtype  # half-precision inputs are cast as the fit's
    if not spec.levelwise:
        fused = getattr(_baselines, spec.solver)(prep, cfg)
        if cfg.reset_bn and spec.name in ("vanilla", "git-rebasin", "otfusion"):
            from ._align import reset_batchnorm

            reset_batchnorm(fused, prep.data, cfg.batch_size, cfg.device)
        return emit(fused, prep, [], cfg, t_start)
    # 3. depth alignment
    prep = align_depth(prep, cfg)
    # 4. importance scores
    t_scores = time.perf_counter()
    scores = score_neurons(prep, cfg)
    score_seconds = time.perf_counter() - t_scores
    # 5. level by level: collect, group, solve, write
    chains = [p.split() for p in prep.plans] + [prep.fused_plan.split()]
    col = Collector(prep.data, chains, batch_size=cfg.batch_size, device=cfg.device, budget=cfg.memory_budget)
    hcol = None if held is None else Collector(held, chains, batch_size=cfg.batch_size, device=cfg.device,
                                               budget=cfg.memory_budget)
    bar = progress_bar(len(prep.fused_plan), f"fusing ({cfg.method})", cfg.progress)
    records = []
    for i in range(len(prep.fused_plan)):
        _dist.barrier(f"level {i}")  # a rank that failed stops the others here, by name
        records.append(fuse_level(i, prep, scores, col, cfg, hcol))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # 6. emit
    return emit(prep.fused_plan.gm, prep, records, cfg, t_start, score_seconds=score_seconds)
