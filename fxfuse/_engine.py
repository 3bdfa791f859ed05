"""The stages of a fusion, each a function from one frozen object to the next.

:func:`fxfuse.fuse` calls them in order (DESIGN.md, "Pipeline"):
``prepare`` → ``align_depth`` → ``score_neurons`` → per level ``fuse_level``
(collect → group → solve → write) → ``emit``. Grouping strategies and solvers
live in the registries :data:`GROUPINGS` and :data:`SOLVERS`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from ._collect import Collector, FusionData
from ._config import FuseConfig
from ._errors import AlignmentError, FxFuseError, TraceError, user_stacklevel
from ._grouping import distance_pair_costs, gram_pair_costs, hungarian_pairs, kernel_inertia, kernel_kmeans
from ._methods import Method, get_method
from ._solve import (
    GramStats,
    affine_params,
    design_rows,
    fit_gradient,
    from_rows,
    grouped_sq_norm,
    op_input,
    read_affine,
    to_rows,
    unreproduced,
)
from ._trace import out_of_place, trace

__all__ = [
    "GROUPINGS",
    "SOLVERS",
    "Grouping",
    "LevelRecord",
    "Prepared",
    "align_depth",
    "as_model_list",
    "check_plans",
    "level_features",
    "emit",
    "fuse_level",
    "prepare",
    "progress_bar",
    "score_neurons",
]


@dataclass(frozen=True, eq=False)
class Prepared:
    """Traced copies of the models and what the later stages need.

    Attributes:
        models: The base models, traced copies on the device (float32 where the
            user's are half precision); the user's models are never touched.
        data: The fusion data; with ``importance_target="ensemble"`` labelled with the ensemble's argmax.
        plans: Level plans of the base models (level-wise methods only).
        fused_plan: Level plan of the fused model, a traced copy of ``target=`` or
            ``models[0]`` whose parameters the solvers rewrite.
        dtype: The dtype the fused model is emitted in.
        grad_flags: ``requires_grad`` of the fused architecture's parameters, restored at emit.
        alignment: Models of different depth: the :class:`DepthPlan` after which
            ``models`` and ``plans`` hold identity or merged levels; None otherwise.
    """

    models: list[GraphModule]
    data: FusionData
    plans: list[Any]
    fused_plan: Any
    dtype: torch.dtype
    grad_flags: dict[str, bool]
    alignment: Any = None


@dataclass(frozen=True)
class Grouping:
    """The grouping of one level's concatenated base neurons (Algorithm 1, lines 4–6).

    Attributes:
        labels: Tensor of shape (n_neurons,): the fused neuron of each base neuron.
        matrix: Tensor of shape (n_neurons, width): T = Z A gives the targets.
        cost: The importance-weighted grouping error (Eq. 4).
        how: How the neurons were grouped, for the report.
    """

    labels: Tensor
    matrix: Tensor
    cost: float
    how: str


@dataclass(frozen=True)
class LevelRecord:
    """What fusing one level did: one row of the report."""

    level: int
    name: str
    kind: str
    grouping: str
    approximation: str
    grouping_cost: float
    approx_error: float
    seconds: float
    rows: int
    columns: int
    ridge: float | None = None  # closed form: the chosen ridge μ / λ_max (generalised cross-validation)
    ops: list[dict[str, Any]] | None = None  # block levels solved op by op: one record per op (or sum of ops)
    identity: tuple[str, ...] = ()  # models of different depth: the models whose level here is an inserted identity
    merged: tuple[str, ...] = ()  # a deeper model's levels merged into this one ("models[k]: a + b")
    held_out_error: float | None = None  # held_out > 0: the relative error on the samples no fit saw


def progress_bar(total: int | None, desc: str, enabled: bool, leave: bool = True):
    """A tqdm bar, or None when progress is off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave)


# --- 1. prepare ------------------------------------------------------------------------


def as_model_list(models: Any) -> list[nn.Module]:
    """``models`` as a list of modules (a list, a tuple or an ``nn.ModuleList``), checked."""
    if isinstance(models, nn.ModuleList):
        return list(models)
    if isinstance(models, nn.Module):
        raise TypeError(
            f"models must be a sequence of models, got a single {type(models).__name__}; pass [model_a, model_b]"
        )
    try:
        out = list(models)
    except TypeError:
        raise TypeError(f"models must be a sequence of torch.nn.Module, got {type(models).__name__}") from None
    for k, m in enumerate(out):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{k}] is a {type(m).__name__}, not a torch.nn.Module")
    return out


def _check_finite_params(k: int, m: nn.Module) -> None:
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"models[{k}]: `{name}` holds {bad} NaN or Inf values; fusing it would give a broken model. "
                "Check the checkpoint"
            )


def _trace_copy(k: Any, m: nn.Module, example: Tensor, dev: torch.device) -> GraphModule:
    p0 = next((p for p in m.parameters() if p.is_floating_point()), None)
    if p0 is not None:  # trace on the model's own device and dtype; the copy then computes in float32
        example = example.to(p0.device, p0.dtype if example.is_floating_point() else example.dtype)
    try:
        gm = trace(m, example)
    except TraceError as e:
        raise TraceError(f"models[{k}] ({type(m).__name__}) on fusion inputs of shape "
                         f"{tuple(example.shape)}: {e}") from e
    gm = out_of_place(gm).to(dev)  # stored intermediate values must not be overwritten by later ops
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in gm.parameters()):
        gm = gm.float()  # fits and statistics in float32 (half precision degrades them); emit casts back
    for p in gm.parameters():
        p.requires_grad_(True)  # copies: fitted whatever the user's flags
    p1 = next((p for p in gm.parameters() if p.is_floating_point()), None)
    if example.dim() == 4 and example.is_floating_point() and p1 is not None:
        from ._importance import _channels_last_if_it_runs

        # image models compute channels-last where they can (oneDNN's convolutions are faster that way on the CPU;
        # every op computes the same function); emit returns the fused model in the standard format
        _channels_last_if_it_runs(gm, example.to(p1.device, p1.dtype))
    return gm


def _check_tied(plan, k: str) -> None:
    """Refuse parameters used by two levels: level-wise solving would overwrite one use with the other."""
    levels: dict[str, list[int]] = collections.defaultdict(list)
    by_name = {n.name: n for n in plan.gm.graph.nodes}
    for lv in plan:
        for name in lv.nodes:
            n = by_name[name]
            # a parameter-free module (one ReLU called twice, as torchvision's ResNets do) is harmless
            if n.op == "call_module" and any(True for _ in plan.gm.get_submodule(str(n.target)).parameters()):
                levels[str(n.target)].append(lv.index)
    shared = {t: sorted(set(ix)) for t, ix in levels.items() if len(set(ix)) > 1}
    if shared:
        t, ix = next(iter(shared.items()))
        raise FxFuseError(
            f"{k}: module `{t}` is called in levels {ix} (shared or tied weights); level-by-level fusion "
            "would solve each use separately and keep only the last. Untie the weights (a separate module per use), "
            "or use a whole-model method such as method='git-rebasin'"
        )


def _check_structure(plans, names: list[str]) -> None:
    ref = plans[0]
    counts = [len(p) for p in plans]
    if len(set(counts)) != 1:
        raise AlignmentError(
            f"models have different numbers of levels ({', '.join(f'{n} {c}' for n, c in zip(names, counts))}); "
            "after depth alignment; every model is aligned to the fused architecture's depth, so its stages (pinned, "
            "shape-changing levels) must be those of the models"
        )
    for k, p in enumerate(plans[1:], 1):
        for a, b in zip(ref, p):
            sa, sb = list(a.output_shape[1:]), list(b.output_shape[1:])
            if a.neuron_axis != b.neuron_axis or len(sa) != len(sb) or any(
                x != y for d, (x, y) in enumerate(zip(sa, sb), 1) if d != a.neuron_axis
            ):
                raise AlignmentError(
                    f"level {a.index}: {names[0]} level `{a.name}` outputs {a.output_shape} (neurons on dim "
                    f"{a.neuron_axis}) but {names[k]} level `{b.name}` outputs {b.output_shape} (neurons on dim "
                    f"{b.neuron_axis}); fused models must share their structure and differ only in widths"
                )
    heads = [p[-1].width for p in plans]
    if len(set(heads)) != 1:
        raise AlignmentError(f"head levels have different widths (classes) {heads}; fused models must share classes")


def prepare(models: Any, data: Any, cfg: FuseConfig) -> Prepared:
    """Validate the models and data, trace copies, and (for level-wise methods) partition them.

    Raises:
        TypeError / ValueError: bad models or data (the message names which).
        TraceError: a model cannot run on the fusion inputs.
        AlignmentError: the models' levels do not correspond.
    """
    from fxfuse.passes import partition_levels

    method = get_method(cfg.method)
    models = as_model_list(models)
    if len(models) < 2:
        raise ValueError(f"fuse needs at least two models, got {len(models)}")
    if method.n_models is not None and len(models) != method.n_models:
        raise ValueError(f"{method.name} fuses exactly {method.n_models} models, got {len(models)}; "
                         "use method='kf-linear' for more")
    if cfg.target is not None and not method.takes_target:
        raise ValueError(f"{method.name} combines the models' own parameters; it takes no target= (remove it)")
    if not method.uses_importance and cfg.importance != "uniform":
        raise ValueError(f"{method.name} uses no importance scores; got importance={cfg.importance!r}, "
                         "leave it 'uniform'")
    for k, m in enumerate(models):
        _check_finite_params(k, m)
    data = data if isinstance(data, FusionData) else FusionData(data)
    from ._dist import check_same_across_ranks, is_distributed, model_checksum

    if is_distributed():  # before any work: every rank must hold the same models and data of one shape
        check_same_across_ranks("the number of models", float(len(models)))
        check_same_across_ranks("the base models' parameters (checksums)",
                                torch.stack([model_checksum(m) for m in models]))
        shape = [float(s) for s in data.example.shape[1:]][:8]
        check_same_across_ranks("the per-sample shapes of the fusion data", shape + [-1.0] * (8 - len(shape)))
    if method.uses_objective and cfg.objective == "ce" and not data.has_labels:
        raise ValueError(
            f"{method.name} with objective='ce' learns on the labels: pass data as (inputs, labels), or use the "
            "default objective='distill', which needs none"
        )
    dev = cfg.device
    gms = [_trace_copy(k, m, data.example, dev) for k, m in enumerate(models)]
    if data.example.dtype in (torch.float16, torch.bfloat16):
        data.input_dtype = torch.float32  # the traced copies compute in float32
        data.example = data.example.float()
    with torch.no_grad():
        outs = [g(data.example.to(dev)) for g in gms]
    shapes = [tuple(o.shape) for o in outs]
    if len(set(shapes)) != 1:
        raise AlignmentError(f"{method.name}: the models' outputs have different shapes {shapes}; fused models must "
                             "share classes")
    if len(shapes[0]) == 2:
        data.n_classes = shapes[0][1]
    if not method.levelwise and (method.same_parameters or method.uses_match):
        from fxfuse.passes import partition_levels

        try:
            depths = [len(partition_levels(g)) for g in gms]
        except FxFuseError:  # models these methods can still align (neuron spaces) but not cut into levels
            depths = []
        for k, d in enumerate(depths):
            if d != depths[0]:
                raise AlignmentError(
                    f"models[{k}] has {d} levels and models[0] {depths[0]}: {method.name} combines the models' "
                    "parameters tensor by tensor, so the models need the same depth. Fuse models of different depth "
                    "with kf-linear or hf-linear, which align them (cross-layer alignment) and insert identity levels"
                )
    if method.same_parameters:
        ref = {k: tuple(v.shape) for k, v in gms[0].state_dict().items()}
        for k, g in enumerate(gms[1:], 1):
            if {n: tuple(v.shape) for n, v in g.state_dict().items()} != ref:
                raise AlignmentError(
                    f"{method.name} combines parameters one to one, so models need identical architectures; "
                    f"models[{k}] differs from models[0]. Use method='otfusion' or 'kf-linear' for models of "
                    "different widths."
                )
    if cfg.uses_labels and data.has_labels and data.n_classes:
        _warn_skew(data, method, cfg)
    if cfg.importance != "uniform":
        target = cfg.importance_target
        if target == "labels" and not data.has_labels:
            raise ValueError("importance_target='labels' attributes each fusion sample's label, but the data has "
                             "none: pass (inputs, labels), or use importance_target='ensemble' or 'own', which need "
                             "no labels")
        if target == "ensemble" and method.uses_objective and cfg.objective == "ce":
            raise ValueError(f"{method.name}: importance_target='ensemble' would replace the labels that "
                             "objective='ce' learns on; use objective='distill' or importance_target='own'")
        if target == "ensemble":
            data = data.with_labels(lambda x: sum(g(x).softmax(-1) for g in gms).argmax(-1), replace=True)
    if not method.levelwise:
        target = cfg.target if cfg.target is not None else models[0]
        dtype = next((p.dtype for p in target.parameters() if p.is_floating_point()), torch.float32)
        return Prepared(gms, data, [], None, dtype, {n: p.requires_grad for n, p in target.named_parameters()})
    plans = [partition_levels(g) for g in gms]
    depths = [len(p) for p in plans]
    deepest = max(range(len(plans)), key=lambda k: (depths[k], -k))
    if len(set(depths)) > 1 and method.grouping == "aligned":
        raise AlignmentError(
            f"models have different depths ({', '.join(f'models[{k}] {d} levels' for k, d in enumerate(depths))}); "
            f"{method.name} interpolates parameters one to one and cannot use identity levels. Use hf-linear, "
            "kf-linear, hf-gradient or kf-gradient, which align depth (cross-layer alignment)"
        )
    if method.grouping == "aligned":
        gms = GROUPINGS["aligned"].prepare(gms, data, cfg)
        plans = [partition_levels(g) for g in gms]
    # models of different depth: the fused model takes the deepest one's architecture unless target= is given
    t = 0 if len(set(depths)) == 1 else deepest
    target, target_name = (cfg.target, "target") if cfg.target is not None else (models[t], f"models[{t}]")
    dtype = next((p.dtype for p in target.parameters() if p.is_floating_point()), torch.float32)
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    if cfg.target is None and method.grouping != "aligned":
        fused_gm = copy.deepcopy(gms[t])  # the same trace of models[t], untouched so far: copied, not traced again
    else:
        fused_gm = _trace_copy(target_name, target, data.example, dev)
    fused_plan = partition_levels(fused_gm)
    prep = Prepared(gms, data, plans, fused_plan, dtype, flags)
    if all(d == len(fused_plan) for d in depths):
        check_plans(prep, cfg, target_name)
    return prep


def check_plans(prep: Prepared, cfg: FuseConfig, target_name: str = "target") -> None:
    """The level plans of the models and the fused model correspond level by level (shapes, heads, tied
    weights, and equal widths where the method needs them); raises naming the level otherwise."""
    method = get_method(cfg.method)
    plans, fused_plan = prep.plans, prep.fused_plan
    names = [f"models[{k}]" for k in range(len(plans))] + [target_name]
    _check_structure(plans + [fused_plan], names)
    for k, p in enumerate(plans + [fused_plan]):
        _check_tied(p, names[k])
    if method.equal_widths:
        for i in range(len(fused_plan) - 1):
            ws = [p[i].width for p in plans] + [fused_plan[i].width]
            if len(set(ws)) != 1:
                raise ValueError(
                    f"level {i} (`{plans[0][i].name}`): models have widths {ws[0]} and {ws[1]}"
                    f"{'' if ws[-1] == ws[0] else f' (fused {ws[-1]})'}; {method.name} needs equal widths, "
                    "use method='kf-linear'"
                )


def _warn_skew(data: FusionData, method: Method, cfg: FuseConfig) -> None:
    """Warn once when the labels this fusion reads miss classes or are far from uniform."""
    from ._collect import warn_label_skew

    uses, fixes = [], []
    if method.uses_objective and cfg.objective == "ce":
        uses.append(f"{method.name} with objective='ce'")
        fixes.append("objective='distill' (the default) learns from the ensemble's softmax and needs no labels")
    if cfg.importance != "uniform" and cfg.importance_target == "labels":
        uses.append(f"importance={cfg.importance!r} (scores for the labelled class)")
        fixes.append("importance_target='own' (the default) attributes each model's own prediction instead (on one "
                     "party's skewed sample it is far more accurate: README), and importance='uniform' reads no labels")
    warn_label_skew(data.label_counts(data.n_classes), " and ".join(uses), "Label-free choice: " + "; ".join(fixes) + ".")


# --- 2. depth alignment (cross-layer alignment fills this slot) ---------------------------


# level outputs wider than this are compared through a count sketch of this many features (CKA needs
# only inner products between samples, which the sketch preserves in expectation)
CLA_FEATURES = 4096


def level_features(prep: Prepared, cfg: FuseConfig) -> list[list[Tensor]]:
    """Per model, per level: the first ``cfg.cla_samples`` samples' level outputs, flattened, as float32
    Tensors of shape (n_samples, ≤ CLA_FEATURES) (a fixed count sketch when wider)."""
    chains = [p.split() for p in prep.plans]
    feats: list[list[list[Tensor]]] = [[[] for _ in p] for p in prep.plans]
    sketches: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = 0
    for x, _ in prep.data.batches(cfg.batch_size, cfg.device):
        x = x[: cfg.cla_samples - seen]
        for k, chain in enumerate(chains):
            h = x
            with torch.no_grad():
                for i, lv in enumerate(chain):
                    h = lv(h)
                    z = h.reshape(h.shape[0], -1).float()
                    if z.shape[1] > CLA_FEATURES:
                        if (k, i) not in sketches:
                            idx = torch.randint(CLA_FEATURES, (z.shape[1],), generator=gen)
                            sign = torch.randint(2, (z.shape[1],), generator=gen).float() * 2 - 1
                            sketches[(k, i)] = (idx.to(z.device), sign.to(z.device))
                        idx, sign = sketches[(k, i)]
                        z = torch.zeros(z.shape[0], CLA_FEATURES, device=z.device).index_add_(1, idx, z * sign)
                    feats[k][i].append(z.cpu())
        seen += x.shape[0]
        if seen >= cfg.cla_samples:
            break
    from ._dist import all_gather_rows

    # in a process group: the first cla_samples of all shards, in rank order
    return [[all_gather_rows(torch.cat(f))[: cfg.cla_samples] for f in fk] for fk in feats]


@dataclass(frozen=True)
class DepthPlan:
    """How every model's levels map onto the fused model's when depths differ (``Prepared.alignment``).

    Attributes:
        reference: The model the others were aligned to: a base model with the fused
            model's depth (``"models[k]"``), or ``"target"`` when none has it (then the
            alignment is the uniform one: no level outputs of the target to compare).
        cost: ``"cka"`` or ``"uniform"``.
        identity: Per model: the fused levels where it has an inserted identity level.
        merged: Per model: fused level -> the names of the model's levels merged into it
            (a model deeper than the fused architecture).
        alignments: Per model: its :class:`fxfuse.passes.DepthAlignment` with the
            reference (None for models of the fused depth).
    """

    reference: str
    cost: str
    identity: tuple[tuple[int, ...], ...]
    merged: tuple[dict[int, tuple[str, ...]], ...]
    alignments: tuple[Any, ...]


def align_depth(prep: Prepared, cfg: FuseConfig) -> Prepared:
    """Make the models' level plans correspond one to one with the fused model's (CLAFusion's cross-layer alignment).

    Models with the fused model's depth pass through. Every other model is aligned to a
    reference, a base model of that depth (:func:`fxfuse.passes.align_depth`: 1 − linear
    CKA of level outputs on ``cla_samples`` fusion samples, a dynamic program between
    pinned levels; when no base model has the fused depth, the uniform mapping). A
    shallower model gets identity levels where it lacks one
    (:func:`fxfuse.passes.insert_identity`, checked to leave its function unchanged); a
    deeper one (fusing into a shallower ``target=``) has its unmatched levels merged into
    the matched level that follows them (:func:`fxfuse.passes._depth.merge_levels`), so
    that level's targets are the output of the merged levels.
    """
    from fxfuse.passes import align_depth as cla
    from fxfuse.passes import insert_identity
    from fxfuse.passes._depth import merge_levels

    depths = [len(p) for p in prep.plans]
    T = len(prep.fused_plan)
    if all(d == T for d in depths):
        return prep
    ref = next((k for k, d in enumerate(depths) if d == T), None)
    cost = "cka" if ref is not None else "uniform"
    feats = level_features(prep, cfg) if ref is not None else None
    ref_plan = prep.plans[ref] if ref is not None else prep.fused_plan
    gms, plans = list(prep.models), list(prep.plans)
    identity: list[tuple[int, ...]] = [() for _ in plans]
    merged: list[dict[int, tuple[str, ...]]] = [{} for _ in plans]
    alignments: list[Any] = [None for _ in plans]
    example = prep.data.example.to(cfg.device)
    for k, d in enumerate(depths):
        if d == T:
            continue
        if d < T:
            al = cla([ref_plan, plans[k]], None if feats is None else [feats[ref], feats[k]], target=0, cost=cost)
            gms[k], plans[k] = insert_identity(gms[k], plans[k], al.insertions[1], example=example)
            identity[k] = tuple(al.inserted_levels(1))
        else:
            try:
                al = cla([plans[k], ref_plan], None if feats is None else [feats[k], feats[ref]], target=0, cost=cost)
            except AlignmentError as e:
                raise AlignmentError(f"models[{k}] is deeper than the fused architecture and cannot be merged into it: "
                                     f"{e}") from e
            ends = list(al.mapping[1])
            old = plans[k]
            plans[k] = merge_levels(old, ends)
            starts = [0, *[e + 1 for e in ends[:-1]]]
            merged[k] = {j: tuple(lv.name for lv in old.levels[a : b + 1])
                         for j, (a, b) in enumerate(zip(starts, ends)) if b > a}
        alignments[k] = al
    depth_plan = DepthPlan(f"models[{ref}]" if ref is not None else "target", cost, tuple(identity), tuple(merged),
                           tuple(alignments))
    out = dataclasses.replace(prep, models=gms, plans=plans, alignment=depth_plan)
    check_plans(out, cfg, "target" if cfg.target is not None else f"models[{ref}]")
    return out


# --- 3. importance ---------------------------------------------------------------------------


_SCORE_BATCH = 128  # samples per attribution batch (conductance runs n_steps + 1 copies of each at once)


def score_neurons(prep: Prepared, cfg: FuseConfig) -> list[list[Tensor]]:
    """Per model, per level: the importance score of every neuron (Tensor of shape (width,), float64)."""
    from ._importance import level_scores, scoring_batch

    bar = None
    if cfg.importance != "uniform":  # attributions: interpolated passes over the fusion data, per model
        batches = [prep.data.n_batches(scoring_batch(p.gm, cfg.importance, _SCORE_BATCH, cfg.importance_steps))
                   for p in prep.plans]
        bar = progress_bar(None if None in batches else sum(batches), f"importance ({cfg.importance})", cfg.progress)
    try:
        return [level_scores(p, prep.data, cfg.importance, n_steps=cfg.importance_steps, batch_size=_SCORE_BATCH,
                             target=cfg.score_target,
                             device=cfg.device, progress=bar) for p in prep.plans]
    finally:
        if bar is not None:
            bar.close()



# --- 4. per level: grouping strategies --------------------------------------------------------


def _cluster_matrix(labels: Tensor, scores: Tensor, k: int) -> Tensor:
    """A (n_neurons, k): A[j, c] = s_j / Σ_{j' ∈ c} s_j', so that T = Z A (Algorithm 1, line 6)."""
    A = torch.zeros(labels.shape[0], k, dtype=torch.float64, device=scores.device)
    A[torch.arange(labels.shape[0], device=scores.device), labels] = scores
    return A / A.sum(0, keepdim=True).clamp_min(1e-300)


def _order_like_first(labels: Tensor, scores: Tensor, w0: int, k: int) -> Tensor:
    """Relabel clusters so that cluster t holds the first model's neuron t where possible.

    The fused model starts from the first model's weights; ordering its neurons
    like that model's keeps gradient initialisation matched to the grouping.
    """
    if w0 != k:
        return labels
    cost = torch.zeros(k, k, dtype=torch.float64)
    cost[labels[:w0].cpu(), torch.arange(w0)] = -scores[:w0].cpu()
    return hungarian_pairs(cost).to(labels.device)[labels]


class HungarianGrouping:
    """HF: pair every neuron of models[1] with one of models[0] (Hungarian on the pair costs, appendix B.1)."""

    how = "hungarian"

    def fit(self, gram: Tensor, scores: Tensor, widths: list[int], k: int, seed: int, cfg: FuseConfig,
            residual: Tensor | None = None) -> Tensor:
        w0 = widths[0]
        if len(widths) == 1:  # one model's neurons only (the others' level here is an inserted identity)
            return torch.arange(w0, device=gram.device)
        if cfg.hf_cost == "distance":
            res = residual if residual is not None else torch.zeros(gram.shape[0], dtype=gram.dtype, device=gram.device)
            cost = distance_pair_costs(gram, res, scores[:w0], scores[w0:])
        else:
            cost = gram_pair_costs(gram, scores[:w0], scores[w0:])
        match = hungarian_pairs(cost).to(gram.device)
        labels = torch.empty(sum(widths), dtype=torch.long, device=gram.device)
        labels[:w0] = torch.arange(w0, device=gram.device)
        labels[w0 + match] = torch.arange(w0, device=gram.device)
        return labels


class KMeansGrouping:
    """KF: importance-weighted k-means of all models' neurons (section 4.3.1), in kernel form on their Gram matrix.

    Greedy k-means++ seeding with ``n_init`` restarts (default 5). Seeding from the
    Hungarian matching to the first model was measured and rejected: on the digits
    MLPs its k-means objective was 1.4–2.4× that of k-means++ (it stays near HF's
    pairs, while k-means may group neurons in other numbers), and one k-means++ run
    was 3–7% worse than five.
    """

    how = "k-means"

    def fit(self, gram: Tensor, scores: Tensor, widths: list[int], k: int, seed: int, cfg: FuseConfig,
            residual: Tensor | None = None) -> Tensor:
        labels, _ = kernel_kmeans(gram, scores, k, n_init=cfg.n_init, seed=seed)
        return _order_like_first(labels.to(gram.device), scores, widths[0], k)


class AlignedGrouping:
    """Models aligned beforehand (git-rebasin's matching): neuron j of every model forms group j."""

    how = "aligned"

    def prepare(self, gms: list[GraphModule], data: FusionData, cfg: FuseConfig) -> list[GraphModule]:
        from ._align import align_with

        return align_with(gms, data, cfg).models

    def fit(self, gram: Tensor, scores: Tensor, widths: list[int], k: int, seed: int, cfg: FuseConfig,
            residual: Tensor | None = None) -> Tensor:
        return torch.cat([torch.arange(w, device=gram.device) for w in widths])


GROUPINGS: dict[str, Any] = {"hf": HungarianGrouping(), "kf": KMeansGrouping(), "aligned": AlignedGrouping()}


def group(gram: Tensor, scores: Tensor, widths: list[int], k: int, *, is_head: bool, strategy: str, seed: int,
          cfg: FuseConfig, residual: Tensor | None = None) -> Grouping:
    """Group the concatenated neurons into ``k`` fused ones, from their Gram matrix (Tensor of shape (n_neurons, n_neurons)).

    ``residual``: each neuron's squared norm outside what ``gram`` describes (‖z_j‖² − gram_jj), for the
    ``"distance"`` HF cost. The head keeps class identity: class c of every model forms group c.
    """
    if is_head:
        labels, how = torch.cat([torch.arange(w, device=gram.device) for w in widths]), "mean of logits"
    else:
        g = GROUPINGS[strategy]
        labels, how = g.fit(gram, scores, widths, k, seed, cfg, residual=residual), g.how
    A = _cluster_matrix(labels, scores, k)
    return Grouping(labels, A, kernel_inertia(gram, scores.to(torch.float64), labels, k), how)


# --- 4. per level: collect, solve, write ---------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _LevelData:
    """What one pass over the data gathered for a level."""

    stats: GramStats | None  # closed form: streamed second moments
    eig: tuple[Tensor, Tensor] | None  # closed form: eigenpairs of G above the cut-off
    gram: Tensor  # grouping: the neurons' Gram matrix, Tensor of shape (n_neurons, n_neurons), float64
    fit_inputs: Tensor | None  # gradient: the fused level's inputs, Tensor of shape (n_samples, ...)
    fit_rows: Tensor | None  # gradient: base outputs as rows, Tensor of shape (n_rows, n_neurons)
    rows: int
    columns: int


def _check_finite(t: Tensor, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FxFuseError(f"{where}: {bad} non-finite values (NaN or Inf); check the input data and the model's weights")


# elements of one unfolded design chunk (float32: 32 MB); bounds the memory of im2col at any resolution
_DESIGN_CHUNK = 8 << 20


@torch.no_grad()
def _add_design(stats: GramStats, level: GraphModule, spec, h: Tensor, zs: list[Tensor], axes: list[int]) -> int:
    """Add one batch to the Gram statistics, a few samples at a time (their unfolded inputs and output rows).

    Returns the number of rows added.
    """
    rows_per_sample = max(1, zs[0].numel() // (zs[0].shape[0] * zs[0].shape[axes[0]]))
    fan = level.get_submodule(spec.op).weight[0].numel() + 1
    step = max(1, _DESIGN_CHUNK // (rows_per_sample * (fan + sum(z.shape[a] for z, a in zip(zs, axes)))))
    n = 0
    for s in range(0, h.shape[0], step):
        X = design_rows(level, spec, op_input(level, spec, h[s : s + step]))
        zr = torch.cat([to_rows(z[s : s + step], a) for z, a in zip(zs, axes)], 1)
        stats.add(X, zr)
        n += zr.shape[0]
    return n


def collect(i: int, prep: Prepared, col: Collector, spec, cfg: FuseConfig) -> _LevelData:
    """One pass over the data: base level-i outputs and the fused level's input, reduced to what the solver needs.

    Closed form (``spec`` given) keeps only G = XᵀX, XᵀZ, ZᵀZ; grouping uses the
    neurons' Gram matrix as a ridge fit from X reproduces them
    (:meth:`GramStats.grouping_gram`). Otherwise grouping uses K = ZᵀZ, streamed, and
    the rows are kept for the gradient fit.
    """
    base = [chain[i] for chain in col.chains[:-1]]
    fused = col.chains[-1][i]
    stats = GramStats() if spec is not None else None
    fit_x, fit_z = [], []
    K = None
    n_rows = 0
    axes = [p[i].neuron_axis for p in prep.plans]
    for b, ins, _ in col.inputs(i):
        zs = []
        for k, (lv, h) in enumerate(zip(base, ins[:-1])):
            with torch.no_grad():
                z = lv(h)
            _check_finite(z, f"level {i} (`{prep.plans[k][i].name}`) of models[{k}]")
            col.store(k, i, b, z)
            zs.append(z)
        if stats is not None:
            n_rows += _add_design(stats, fused, spec, ins[-1], zs, axes)
        else:
            fit_x.append(ins[-1])
            fit_z.append(torch.cat([to_rows(z, a) for z, a in zip(zs, axes)], 1))
            n_rows += fit_z[-1].shape[0]
            for c in fit_z[-1].split(8192):
                c = c.to(torch.float64)
                K = c.T @ c if K is None else K.addmm_(c.T, c)
    # statistics are sums over samples: the shards of a process group join here (no-ops in one process)
    from ._dist import all_reduce_, all_reduce_number

    n_rows = all_reduce_number(n_rows)
    if stats is not None:
        stats.reduce()
        lam, V = stats.eig_for(cfg.regularisation)
        gram, _ = stats.grouping_gram(lam, V, ridge=cfg.regularisation == "gcv")
        return _LevelData(stats, (lam, V), gram, None, None, n_rows, stats.d)
    n_params = sum(p.numel() for p in fused.parameters())
    all_reduce_(K)
    return _LevelData(None, None, K, torch.cat(fit_x), torch.cat(fit_z), n_rows, n_params)


@dataclass(frozen=True, eq=False)
class Solution:
    """What a solver found for one level.

    Attributes:
        params: Qualname -> new value, for :func:`fxfuse.passes.rewrite_params`.
        how: How the level was solved, for the report.
        error: Relative error against the targets, when the solver knows it (closed form).
        targets: The targets, when the error is measured on the solved level's outputs (gradient fits).
    """

    params: dict[str, Tensor]
    how: str
    error: float | None = None
    targets: Tensor | None = None
    ridge: float | None = None


def _solve_closed_form(i, prep, col, spec, data: _LevelData, grouping: Grouping, cfg) -> Solution:
    # start: the fused level's current weights (models[0]'s, or target's); the data fixes every direction it spans
    level = col.chains[-1][i]
    lam, V = data.eig
    A = grouping.matrix
    t2 = grouped_sq_norm(A, data.stats.K)
    # "gcv": regularised towards the start weights (models[0]'s, or the target's), directions the data does not
    # determine keep them; "pinv": the minimum-norm solution on the directions pinv_rank kept, no ridge
    W, ridge = data.stats.solve_for(cfg.regularisation, lam, V, A, W0=read_affine(level, spec))
    if cfg.regularisation == "pinv":
        return Solution(affine_params(level, spec, W), "closed form (pinv)", error=ridge.rss / max(t2, 1e-300))
    return Solution(affine_params(level, spec, W), "closed form", error=ridge.rss / max(t2, 1e-300), ridge=ridge.relative)


def _targets(prep, i: int, data: _LevelData, grouping: Grouping, dtype) -> Tensor:
    lv = prep.fused_plan[i]
    return from_rows((data.fit_rows.to(torch.float64) @ grouping.matrix).to(dtype), lv.output_shape, lv.neuron_axis)


def _solve_gradient(i, prep, col, spec, data, grouping, cfg, *, fallback: bool = False):
    work = copy.deepcopy(col.chains[-1][i])
    T = _targets(prep, i, data, grouping, data.fit_inputs.dtype)
    bar = progress_bar(cfg.train.epochs, f"level {i} {prep.fused_plan[i].name}", cfg.progress, leave=False)
    # eval mode: norms keep their running statistics while their affine parameters train
    fit_gradient(work, data.fit_inputs, T, cfg.train.replace(seed=cfg.seed + i), progress=bar)
    if bar is not None:
        bar.close()
    return Solution(dict(work.state_dict()), "gradient" + (" (fallback: not affine)" if fallback else ""), targets=T)


def _solve_np(i, prep, col, spec, data, grouping, cfg):
    from ._align import reset_batchnorm
    from ._npmerge import Interpolation

    work = copy.deepcopy(col.chains[-1][i])
    other = col.chains[1][i]
    T = _targets(prep, i, data, grouping, data.fit_inputs.dtype)
    # only the level's α_pre trains; it starts at α = 0.5 with BatchNorm statistics of that merge on the
    # fused input (REPAIR), which the eval-mode fit keeps as part of the function
    mix = Interpolation(work, other)
    mix.write()
    reset_batchnorm(work, data.fit_inputs, cfg.batch_size)
    bar = progress_bar(cfg.train.epochs, f"level {i} {prep.fused_plan[i].name}", cfg.progress, leave=False)
    fit_gradient(mix, data.fit_inputs, T, cfg.train.replace(seed=cfg.seed + i, noise=0.0), progress=bar)
    if bar is not None:
        bar.close()
    mix.apply()
    return Solution(dict(work.state_dict()), "np interpolation", targets=T)


def _solve_linear(i, prep, col, spec, data, grouping, cfg):
    if spec is not None:
        return _solve_closed_form(i, prep, col, spec, data, grouping, cfg)
    return _solve_gradient(i, prep, col, spec, data, grouping, cfg, fallback=True)


SOLVERS: dict[str, Any] = {"linear": _solve_linear, "gradient": _solve_gradient, "np": _solve_np}


def fuse_level(i: int, prep: Prepared, scores: list[list[Tensor]], col: Collector, cfg: FuseConfig,
               held: Collector | None = None) -> LevelRecord:
    """Fuse level ``i``: collect, group, solve, write (Algorithm 1, lines 3–8); returns its record.

    With ``held`` (a collector over the held-out samples, option ``held_out``), the level's and its ops' errors
    are also measured there."""
    from fxfuse.passes import affine_spec, rewrite_params

    t0 = time.perf_counter()
    method: Method = get_method(cfg.method)
    lv = prep.fused_plan[i]
    level = col.chains[-1][i]
    spec = affine_spec(level) if method.solver == "linear" else None
    bspec = _block_spec(i, col, prep) if method.solver == "linear" and spec is None and cfg.blocks == "closed-form" else None
    ops = None
    op_targets: list = []
    warm = None
    if method.solver == "gradient" and cfg.start == "closed-form":
        warm = affine_spec(level) or _block_spec(i, col, prep)
    if warm is not None:
        # a–d. gradient from the closed-form solution: solve and write it, then Adam on the same grouping
        from fxfuse.passes import AffineSpec

        from ._blocks import fuse_block

        if isinstance(warm, AffineSpec):
            data, grouping = _collect_and_group(i, prep, scores, col, warm, cfg)
            rewrite_params(prep.fused_plan.gm, _solve_closed_form(i, prep, col, warm, data, grouping, cfg).params,
                           in_place=True)
        else:
            grouping = fuse_block(i, prep, scores, col, cfg, warm).grouping
        data = collect(i, prep, col, None, cfg)
        rows, columns = data.rows, data.columns
        sol = dataclasses.replace(_solve_gradient(i, prep, col, None, data, grouping, cfg),
                                  how="gradient from closed form")
        rewrite_params(prep.fused_plan.gm, sol.params, in_place=True)
    elif bspec is not None:
        # a–d. a block: each op collected, grouped, solved and written in graph order (fxfuse._blocks)
        from ._blocks import fuse_block

        res = fuse_block(i, prep, scores, col, cfg, bspec)
        grouping, ops, op_targets = res.grouping, res.ops, res.targets
        pinv = ", pinv" if cfg.regularisation == "pinv" else ""
        if pinv:  # no ridge, as a single-op level's pinv solve says (the report leaves it blank)
            for op in ops:
                op["ridge"] = None
        sol = Solution({}, f"closed form (block: {len(bspec.units)} ops{pinv})", error=res.error,
                       ridge=None if pinv else res.ridge)
        rows, columns = res.rows, res.columns
    else:
        # a–b. collect, group
        data, grouping = _collect_and_group(i, prep, scores, col, spec, cfg)
        rows, columns = data.rows, data.columns
        # c. solve
        sol = SOLVERS[method.solver](i, prep, col, spec, data, grouping, cfg)
        # d. write: the fused model's parameters, which the level module shares
        rewrite_params(prep.fused_plan.gm, sol.params, in_place=True)
    col.groupings[i] = grouping  # the next level's input neurons
    # e. run the solved level once, for the next level's input (and the error of a gradient fit)
    sq_err = sq_t = 0.0
    offset = 0
    last = len(col.chains) - 1
    for b, (h,), _ in col.inputs(i, which=[last]):
        with torch.no_grad():
            out = level(h)
        _check_finite(out, f"level {i} (`{lv.name}`) of the fused model")
        col.store(last, i, b, out)
        if sol.targets is not None:
            t = sol.targets[offset : offset + out.shape[0]]
            sq_err += float(((out - t) ** 2).sum())
            sq_t += float((t**2).sum())
        offset += out.shape[0]
    from ._dist import all_reduce_number

    sq_err, sq_t = all_reduce_number(sq_err), all_reduce_number(sq_t)
    err = sol.error if sol.error is not None else sq_err / max(sq_t, 1e-300)
    held_err = None
    if held is not None:
        from ._blocks import OpTarget, held_out_errors

        errs = held_out_errors(i, prep, held, [OpTarget("__output__", lv.neuron_axis, grouping.matrix), *op_targets])
        held_err = errs[0]
        for op, e in zip(ops or [], errs[1:]):
            op["held_out_error"] = e
    return LevelRecord(i, lv.name, lv.kind, grouping.how, sol.how, grouping.cost, err, time.perf_counter() - t0,
                       rows, columns, sol.ridge, ops, identity=_identity_at(prep, i),
                       merged=_merged_at(prep, i), held_out_error=held_err)


def _collect_and_group(i: int, prep: Prepared, scores: list[list[Tensor]], col: Collector, spec,
                       cfg: FuseConfig) -> tuple[_LevelData, Grouping]:
    """Steps a–b of a level: one pass over the data (:func:`collect`), then its importance-weighted grouping."""
    lv = prep.fused_plan[i]
    data = collect(i, prep, col, spec, cfg)
    widths = [p[i].width for p in prep.plans]
    s = torch.cat([sc[i] for sc in scores]).to(data.gram.device)
    residual = None
    if cfg.hf_cost == "distance" and data.stats is not None:  # what the fused level cannot reproduce of each neuron
        residual = unreproduced(data.stats.K, data.gram)
    grouping = group(data.gram, s, widths, lv.width, is_head=lv.is_head, strategy=get_method(cfg.method).grouping,
                     seed=cfg.seed + i, cfg=cfg, residual=residual)
    return data, grouping


def _identity_at(prep: Prepared, i: int) -> tuple[str, ...]:
    """The models whose level ``i`` is an inserted identity (models of different depth)."""
    if prep.alignment is None:
        return ()
    return tuple(f"models[{k}]" for k in range(len(prep.plans)) if i in prep.alignment.identity[k])


def _merged_at(prep: Prepared, i: int) -> tuple[str, ...]:
    """The deeper models' levels merged into level ``i`` (fusing into a shallower architecture)."""
    if prep.alignment is None:
        return ()
    return tuple(f"models[{k}]: {' + '.join(m[i])}" for k, m in enumerate(prep.alignment.merged) if i in m)


def _block_spec(i: int, col: Collector, prep: Prepared):
    """The fused level's :func:`~fxfuse.passes.block_spec` when the base levels have the same nodes, else None."""
    from fxfuse.passes import block_spec

    bspec = block_spec(col.chains[-1][i])
    if bspec is None:
        return None
    from ._blocks import has_nodes, same_structure

    names = {bspec.pre, *bspec.fixed, *(u.output for u in bspec.units), *(u.spec.op_node for u in bspec.units)}
    # every base level has the block's nodes, except inserted identity levels (models of different depth),
    # which contribute their level output only; at least one base must have them all
    have = [same_structure(prep, k, i) and has_nodes(chain[i], names) for k, chain in enumerate(col.chains[:-1])]
    if not any(have):
        return None
    if any(u.spec.groups != 1 for u in bspec.inner) and not all(have):
        return None  # a grouped conv's neurons are grouped on every base model's values
    if bspec.attention:
        from fxfuse.passes import attention_heads

        # an attention's heads are matched across every base model: all of them have it, with as many heads and
        # head dims as the fused model
        shape = [(a.heads, len(a.q[0]), len(a.v[0])) for a in bspec.attention]
        for k, chain in enumerate(col.chains[:-1]):
            base = [attention_heads(chain[i], a.node) if have[k] else None for a in bspec.attention]
            if any(b is None for b in base) or [(b.heads, len(b.q[0]), len(b.v[0])) for b in base] != shape:
                return None
    from ._blocks import positional_spaces, unit_is_shared

    def as_fused_everywhere(u, dims: slice) -> bool:
        """Every base has the unit's Linear/Conv2d, with the fused one's weight shape over ``dims``."""
        shape = col.chains[-1][i].get_submodule(u.spec.op).weight.shape[dims]
        return all(have) and all(chain[i].get_submodule(u.spec.op).weight.shape[dims] == shape
                                 for chain in col.chains[:-1])

    for u in bspec.units:
        if not unit_is_shared(i, prep, bspec, u) or (u in bspec.terms and bspec.moves):
            continue
        # rows over grouped neurons (an MLP-Mixer token MLP): the base models' op runs on the fused rows, so it must
        # be a plain Linear/Conv2d of the same fan-in in every base; a term is fitted so only through axis moves
        plain = (u in bspec.inner and not u.spec.depthwise and u.spec.groups == 1 and u.spec.norm is None
                 and u.spec.channel is None and all(u.output != a.unit for a in bspec.attention))
        if not plain or not as_fused_everywhere(u, slice(1, None)):
            return None
    if bspec.moves and not all(have):
        return None  # the sum's base values are read at the sum node itself
    positional = positional_spaces(i, prep, bspec)
    for u in bspec.inner:
        # outputs that are positions keep them (fixed_grouping): a plain op, as many in every base
        if u.space in positional and (u.spec.channel is not None or u.spec.groups != 1 or u.spec.depthwise
                                      or not as_fused_everywhere(u, slice(0, 1))):
            return None
    # neurons tied to the level input (a depthwise conv, a gate) are grouped as the input: every base must have
    # them, and the input's grouping must be known
    if bspec.tied or bspec.constants or any(u.space is not None and (u.space in bspec.input_spaces
                                                                     or u.space == bspec.pre_space)
                                            for u in bspec.inner):
        if not all(have) or (i > 0 and i - 1 not in col.groupings):
            return None
    return bspec


# --- 5. emit -------------------------------------------------------------------------------------


def emit(fused: GraphModule, prep: Prepared, records: list[LevelRecord], cfg: FuseConfig, t_start: float,
         score_seconds: float = 0.0) -> GraphModule:
    """The fused GraphModule in eval mode on the device, in the target's dtype and ``requires_grad`` flags,
    with the report in ``fused.meta["fxfuse"]`` (``seconds`` in all, ``score_seconds`` of them for the importance
    scores)."""
    fused = fused.to(device=cfg.device, dtype=prep.dtype).to(memory_format=torch.contiguous_format).eval()
    for n, p in fused.named_parameters():
        p.requires_grad_(prep.grad_flags.get(n, True))
    from ._dist import check_same_across_ranks, model_checksum

    # every rank solved the same all-reduced statistics: their fused models must agree
    check_same_across_ranks("the fused parameters (checksums)", model_checksum(fused), rtol=1e-9)
    def own(r) -> bool:  # a level solved as one op in closed form, with fewer rows than unknowns
        return r.approximation.startswith("closed form") and not r.ops and r.rows < r.columns

    exact = [r for r in records if own(r) or any(op["rows"] < op["columns"] for op in r.ops or [])]
    if exact:
        def short(r) -> str:  # the level's own solve, else its op with the fewest rows per unknown
            if own(r):
                return f"{r.level} (`{r.name}`: {r.rows} rows, {r.columns} columns)"
            op = min((op for op in r.ops if op["rows"] < op["columns"]), key=lambda op: op["rows"] / op["columns"])
            return f"{r.level} (`{r.name}`, op `{op['op']}`: {op['rows']} rows, {op['columns']} columns)"

        names = ", ".join(short(r) for r in exact[:5])
        warnings.warn(
            f"fxfuse: {len(exact)} closed-form level(s) had fewer fusion rows than unknowns: levels {names}. Their "
            + ("regularisation was chosen by cross-validation on those rows" if cfg.regularisation == "gcv" else
               "minimum-norm solutions fit those rows") + ", and the reported error is measured on them; "
            "use more fusion samples for a fit and an error that hold on new inputs (held_out=0.1 measures each "
            "level's error on samples no fit sees).",
            stacklevel=user_stacklevel(),
        )
    fused.meta["fxfuse"] = {
        "method": cfg.method, "importance": cfg.importance, "n_models": len(prep.models), "seed": cfg.seed,
        "importance_target": cfg.importance_target if cfg.importance != "uniform" else None,
        "seconds": time.perf_counter() - t_start, "score_seconds": score_seconds,
        "levels": [dataclasses.asdict(r) for r in records],
    }
    if cfg.progress:
        print(format_report(fused))
    return fused


def _fmt_err(e: float | None) -> str:
    return "—" if e is None else f"{e:.3g}"


def format_report(fused: GraphModule) -> str:
    """A readable table of the per-level report stored in ``fused.meta["fxfuse"]``."""
    meta = fused.meta.get("fxfuse")
    if not meta:
        raise ValueError("this GraphModule carries no fxfuse report; it was not made by fxfuse.fuse")
    head = ("level", "name", "kind", "grouping", "approximation", "ridge", "group cost", "rel. approx err", "s")
    rows = [head] + [
        (str(r["level"]), r["name"], r["kind"], r["grouping"], r["approximation"],
         "" if r.get("ridge") is None else f"{r['ridge']:.0e}", f"{r['grouping_cost']:.4g}",
         f"{r['approx_error']:.3g}", f"{r['seconds']:.2f}")
        for r in meta["levels"]
    ]
    if any(r.get("held_out_error") is not None for r in meta["levels"]):  # option held_out
        rows = [(*row[:8], "held-out err" if k == 0 else _fmt_err(meta["levels"][k - 1].get("held_out_error")),
                 row[8]) for k, row in enumerate(rows)]
        head = rows[0]
    if any(r.get("identity") or r.get("merged") for r in meta["levels"]):  # models of different depth

        def depth_cell(r: dict) -> str:
            parts = [f"identity in {', '.join(r['identity'])}"] if r.get("identity") else []
            return "; ".join(parts + [f"merged {m}" for m in r.get("merged") or ()])

        rows = [(*row, "depth alignment" if k == 0 else depth_cell(meta["levels"][k - 1])) for k, row in enumerate(rows)]
        head = rows[0]
    w = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = [f"fxfuse: {meta['method']} with {meta['importance']} importance, {meta['n_models']} models, "
             f"{meta['seconds']:.1f} s"]
    lines += ["  ".join(c.ljust(x) for c, x in zip(r, w)).rstrip() for r in rows]
    return "\n".join(lines)
