"""The fusion orchestrator: ``fxfuse.fuse``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from ._errors import AlignmentError, FxFuseError
from ._grouping import hungarian_pairs, pair_costs, weighted_kmeans
from ._importance import IMPORTANCES, level_scores
from ._solve import (
    GramStats, affine_spec, design_rows, fit_gradient, from_rows, op_input, read_affine, to_rows, write_affine,
)
from ._trace import trace
from .data import as_tensors

__all__ = ["fuse", "METHODS"]

# method -> (grouping, approximation)
METHODS = {
    "hf-linear": ("hf", "linear"),
    "kf-linear": ("kf", "linear"),
    "kf-gradient": ("kf", "gradient"),
    "hf-gradient": ("hf", "gradient"),
    # NP Merge's interpolation fitted level by level to the grouping's targets (label-free)
    "np-merge-levelwise": ("aligned", "np"),
}

# baselines (see fxfuse._baselines, fxfuse._npmerge): they return GraphModules like every other method
BASELINES = ("vanilla", "ensemble", "git-rebasin", "otfusion", "last-layer-kd", "np-merge")

_DEFAULTS: dict[str, Any] = {
    "reset_bn": False,  # vanilla / git-rebasin / otfusion: recompute BatchNorm statistics on the fusion data
    "class_weights": None,  # ensemble: per-class weights of each model, (n_models, n_classes)
    "target": None,  # nn.Module with the fused architecture; default: models[0]
    "max_rows": 50_000,  # rows (samples × positions) kept for k-means on non-closed-form levels
    "batch_size": 256,  # inference batch
    "epochs": 100,  # gradient fitting, Table 5 Setting 1
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "train_batch_size": 32,
    "val_split": 0.1,
    "patience": 10,
    "noise": 0.0,  # relative init perturbation ε (× each tensor's std)
    "n_init": 5,  # k-means restarts
    "importance_steps": 20,  # conductance integration steps
}

# where a method's own paper sets other defaults (NP Merge, section IV-A: Adam, lr 0.01, 10 epochs)
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "np-merge": {"lr": 1e-2, "epochs": 10, "weight_decay": 0.0, "val_split": 0.0},
    "np-merge-levelwise": {"lr": 1e-2},
}


def _run(module: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([module(x[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)])


def _check_finite(t: Tensor, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FxFuseError(
            f"{where}: {bad} non-finite values (NaN or Inf); check the input data and the model's weights"
        )


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
    first = labels[:w0].cpu()
    cost[first, torch.arange(w0)] = -scores[:w0].cpu()
    slot = hungarian_pairs(cost)  # cluster c -> slot
    return slot.to(labels.device)[labels]


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

    Implements "Model Fusion via Neuron Interpolation" (Algorithm 1). The steps:

    1. validate the arguments and collect the fusion data (labels are optional;
       where needed, the ensemble's argmax stands in);
    2. trace every model and cut it into levels (:func:`fxfuse.trace`,
       :func:`fxfuse.passes.partition_levels`); the fused model starts as a copy
       of ``models[0]`` (or ``target=``);
    3. compute neuron importance scores for every level of every model;
    4. for each level i, in order:
       a. collect each base model's level-i outputs on the fusion inputs; the
          fused level's input is the fused model's own level i-1 output;
       b. group the concatenated neurons: Hungarian matching (HF) or
          importance-weighted k-means (KF); for closed-form levels on their
          projection onto the span of the fused input (appendix B.2); the head
          keeps class identity and averages the logits; np-merge-levelwise
          aligns the models' neuron spaces first and groups neuron j with j;
       c. targets T: importance-weighted cluster means;
       d. approximate: closed-form least squares for affine levels under a
          ``*-linear`` method, else Adam on the MSE to T (also the fallback for
          non-affine levels under a linear method, reported as such); under
          np-merge-levelwise, Adam on the MSE over the level's α_pre only;
    5. emit the fused GraphModule in eval mode on ``device``, with a per-level
       report in ``fused.meta["fxfuse"]``.

    Args:
        models: Two or more trained models with the same number of levels.
        data: Fusion data: a Tensor of inputs, an ``(inputs, labels)`` tuple, an
            iterable of Tensors or of ``(inputs, labels)`` pairs, or a DataLoader.
        method: ``"hf-linear"``, ``"kf-linear"``, ``"kf-gradient"`` or ``"hf-gradient"``;
            ``"np-merge-levelwise"`` (align, then fit NP Merge's per-parameter α of
            each level to the level targets: label-free); or a baseline:
            ``"vanilla"`` (parameter averaging), ``"ensemble"`` (a module averaging
            the logits), ``"last-layer-kd"`` (``models[0]`` with its head retrained to
            the mean softmax), ``"git-rebasin"`` (activation matching per neuron
            space, then an importance-weighted average), ``"otfusion"`` (exact
            optimal transport per neuron space with importance marginals; widths
            may differ) or ``"np-merge"`` (align, then learn α on the task loss:
            needs labels; more than two models merge pairwise).
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.
        device: Where to compute; defaults to CUDA when available, else CPU.
        seed: Seed of k-means, data splits and gradient fitting.
        progress: Show progress bars and print the per-level report.
        **options: ``reset_bn`` (vanilla, git-rebasin, otfusion: recompute BatchNorm
            statistics on the data), ``class_weights`` (ensemble), ``target`` (a model
            whose architecture the fused model takes, e.g. a wider one; default
            ``models[0]``), ``max_rows``, ``batch_size``, ``epochs``, ``lr``,
            ``weight_decay``, ``train_batch_size``, ``val_split``, ``patience``,
            ``noise``, ``n_init``, ``importance_steps``. Training options default to
            Table 5, Setting 1 (lr 1e-3, 100 epochs, weight decay 1e-4, validation
            split 0.1); np-merge defaults to its paper's lr 0.01 for 10 epochs with no
            weight decay or validation split, np-merge-levelwise to lr 0.01.

    Returns:
        The fused model, a plain ``torch.fx.GraphModule``.

    Raises:
        ValueError: unknown method, importance or option value; fewer than two
            models; empty data; non-finite data; hf-* or np-merge* with unequal
            widths; np-merge without labels.
        TypeError: unknown option or bad data type.
        AlignmentError: models with different level counts or head widths; for
            the alignment methods, models whose neuron spaces differ or are all fixed.
        FxFuseError: non-finite activations (the message names the level).

    Example:
        >>> import torch, fxfuse
        >>> _ = torch.manual_seed(0)
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> fused = fxfuse.fuse([a, a], torch.randn(64, 4), method="kf-linear", progress=False)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(fused(x), a(x), atol=1e-4)
        True
    """
    # 1. validate
    if method not in METHODS and method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join([*METHODS, *BASELINES])}")
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; valid importance scores: {', '.join(IMPORTANCES)}")
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(_DEFAULTS)}")
    opts = {**_DEFAULTS, **_METHOD_DEFAULTS.get(method, {}), **options}
    for name, lo in (("max_rows", 1), ("batch_size", 1), ("epochs", 0), ("train_batch_size", 1), ("patience", 1),
                     ("n_init", 1), ("importance_steps", 2)):
        if not isinstance(opts[name], int) or isinstance(opts[name], bool) or opts[name] < lo:
            raise ValueError(f"option {name} must be an int >= {lo}, got {opts[name]!r}")
    for name in ("lr", "weight_decay", "noise"):
        if not isinstance(opts[name], (int, float)) or opts[name] < 0 or (name == "lr" and opts[name] == 0):
            raise ValueError(f"option {name} must be a {'positive' if name == 'lr' else 'non-negative'} number, got {opts[name]!r}")
    if not isinstance(opts["val_split"], (int, float)) or not 0.0 <= opts["val_split"] < 1.0:
        raise ValueError(f"option val_split must be in [0, 1), got {opts['val_split']!r}")
    if opts["target"] is not None and not isinstance(opts["target"], nn.Module):
        raise TypeError(f"option target must be an nn.Module, got {type(opts['target']).__name__}")
    models = list(models) if not isinstance(models, nn.Module) else [models]
    if len(models) < 2:
        raise ValueError(f"fuse needs at least two models, got {len(models)}")
    for k, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{k}] is a {type(m).__name__}, not a torch.nn.Module")
    grouping, approx = METHODS.get(method, ("", ""))
    if grouping == "hf" and len(models) != 2:
        raise ValueError(f"{method} (Hungarian) fuses exactly 2 models, got {len(models)}; use method='kf-linear'")
    if grouping == "aligned" and opts["target"] is not None:
        raise ValueError(f"{method} interpolates the models' own parameters; it takes no target= (remove it)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, labels = as_tensors(data)
    if x.shape[0] == 0:
        raise ValueError("data is empty: fusion needs at least one input sample")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("data contains NaN or Inf values; clean the inputs before fusing")
    x = x.to(dev)
    t_start = time.perf_counter()

    # 2. trace and partition (copies: the user's models are never touched)
    from fxfuse.passes import partition_levels

    example = x[: min(2, x.shape[0])]
    if method in BASELINES:
        return _baseline(models, x, labels, example, method, importance, dev, seed, progress, opts, t_start)
    if grouping == "aligned" and len(models) > 2:
        # NP Merge, section III-C: successive pairwise merges
        from ._npmerge import pairwise

        def merge(a: nn.Module, b: nn.Module) -> GraphModule:
            return fuse([a, b], (x, labels) if labels is not None else x, method=method, importance=importance,
                        device=dev, seed=seed, progress=progress, **options)

        return pairwise(models, merge)
    gms = [trace(m, example).to(dev) for m in models]
    bs = int(opts["batch_size"])
    if labels is None and importance != "uniform":
        labels = _ensemble_labels(gms, x, bs)
    if labels is not None:
        labels = labels.to(dev)
    if grouping == "aligned":
        from ._baselines import align

        gms = align(gms, x, importance=importance, labels=labels, batch_size=bs, max_rows=opts["max_rows"],
                    seed=seed, n_steps=opts["importance_steps"], method=method).models
    plans = [partition_levels(g) for g in gms]
    target = opts["target"] if opts["target"] is not None else models[0]
    fused_plan = partition_levels(trace(target, example).to(dev))
    n_levels = [len(p) for p in plans]
    if len(set(n_levels + [len(fused_plan)])) != 1:
        raise AlignmentError(
            f"models have different numbers of levels ({', '.join(map(str, n_levels))}"
            f"{'' if opts['target'] is None else f'; target {len(fused_plan)}'}); "
            "level-by-level fusion needs equal depth. Depth alignment (cross-layer alignment) is needed "
            "for models of different depth."
        )
    L = n_levels[0]
    heads = [p[-1].width for p in plans] + [fused_plan[-1].width]
    if len(set(heads)) != 1:
        raise AlignmentError(f"head levels have different widths (classes) {heads}; fused models must share classes")
    if grouping in ("hf", "aligned"):
        for i in range(L - 1):
            ws = [plans[0][i].width, plans[1][i].width, fused_plan[i].width]
            if len(set(ws)) != 1:
                raise ValueError(
                    f"level {i} (`{plans[0][i].name}`): models have widths {ws[0]} and {ws[1]}"
                    f"{'' if ws[2] == ws[0] else f' (fused {ws[2]})'}; {method} needs equal widths, use method='kf-linear'"
                )
    base_levels = [p.split() for p in plans]
    fused_levels = fused_plan.split()

    # 3. importance scores (labels: given, else the ensemble's argmax, computed above)
    scores = [
        level_scores(lv, [l.neuron_axis for l in p], x, labels, importance, n_steps=opts["importance_steps"])
        for lv, p in zip(base_levels, plans)
    ]

    # 4. level by level
    report: list[dict[str, Any]] = []
    acts = [x] * len(models)
    xf = x
    bar = _progress(L, f"fusing ({method})", progress)
    for i in range(L):
        t0 = time.perf_counter()
        lv_f = fused_plan[i]
        name = lv_f.name
        # a. base outputs on the fusion inputs
        outs = []
        for k, lv in enumerate(base_levels):
            z = _run(lv[i], acts[k], bs)
            _check_finite(z, f"level {i} (`{plans[k][i].name}`) of models[{k}]")
            outs.append(z)
        widths = [p[i].width for p in plans]
        s = torch.cat([sc[i] for sc in scores])
        k_out = lv_f.width
        spec = affine_spec(fused_levels[i]) if approx == "linear" else None
        # b. points for grouping: projected coordinates (closed form) or raw outputs
        stats = Z = None
        if spec is not None:
            stats = GramStats()
            for st in range(0, x.shape[0], bs):
                xb = xf[st : st + bs]
                with torch.no_grad():
                    X = design_rows(fused_levels[i], spec, op_input(fused_levels[i], spec, xb))
                zb = torch.cat([to_rows(z[st : st + bs], p[i].neuron_axis) for z, p in zip(outs, plans)], 1)
                stats.add(X, zb)
            lam, V = stats.eig()
            points = stats.projected(lam, V).T
        else:
            # rows × concatenated neurons; also the source of the gradient targets
            Z = torch.cat([to_rows(z, p[i].neuron_axis) for z, p in zip(outs, plans)], 1)
            rows = Z
            if rows.shape[0] > opts["max_rows"]:
                g = torch.Generator().manual_seed(seed + i)
                rows = rows[torch.randperm(rows.shape[0], generator=g)[: opts["max_rows"]].to(rows.device)]
            points = rows.T.to(torch.float64)
        # c. grouping and targets
        if lv_f.is_head:
            lab = torch.cat([torch.arange(w, device=dev) for w in widths])
            how = "mean of logits"
        elif grouping == "hf":
            w0 = widths[0]
            cost = pair_costs(points[:w0], points[w0:], s[:w0], s[w0:])
            match = hungarian_pairs(cost).to(dev)
            lab = torch.empty(sum(widths), dtype=torch.long, device=dev)
            lab[:w0] = torch.arange(w0, device=dev)
            lab[w0 + match] = torch.arange(w0, device=dev)
            how = "hungarian"
        elif grouping == "aligned":
            # the alignment already matched neuron j of models[1] to neuron j of models[0]
            lab = torch.cat([torch.arange(w, device=dev) for w in widths])
            how = "aligned"
        else:
            lab, _, _ = weighted_kmeans(points, s, k_out, n_init=opts["n_init"], seed=seed + i)
            lab = _order_like_first(lab.to(dev), s, widths[0], k_out)
            how = "k-means"
        A = _cluster_matrix(lab, s, k_out)
        centers = A.T @ points
        group_cost = float((s * ((points - centers[lab]) ** 2).sum(1)).sum())
        # d. approximate
        if spec is not None:
            # start: the fused level's current weights (models[0]'s, or target's), neurons
            # ordered like the clusters; the data fixes every direction it spans
            W0 = read_affine(fused_levels[i], spec)
            W = stats.solve(lam, V, A, W0=W0)
            write_affine(fused_levels[i], spec, W)
            t2 = float(torch.einsum("ij,ik,kj->", A, stats.K, A))
            err = stats.residual(lam, V, A) / max(t2, 1e-300)
            approx_used = "closed form"
        else:
            T = from_rows((Z.to(torch.float64) @ A).to(xf.dtype), lv_f.output_shape, lv_f.neuron_axis)
            fitted: nn.Module = fused_levels[i]
            if approx == "np":
                from ._baselines import reset_batchnorm
                from ._npmerge import Interpolation

                # only the level's α_pre trains; it starts at α = 0.5 with BatchNorm statistics of that
                # merge on the fused input (REPAIR), which the eval-mode fit keeps as part of the function
                fitted = Interpolation(fused_levels[i], base_levels[1][i])
                fitted.write()
                reset_batchnorm(fused_levels[i], xf, bs)
            inner = _progress(opts["epochs"], f"level {i} {name}", progress, leave=False)
            # eval mode: norms keep their running statistics while their affine parameters train
            fit_gradient(
                fitted, xf, T, epochs=opts["epochs"], lr=opts["lr"], weight_decay=opts["weight_decay"],
                batch_size=opts["train_batch_size"], val_split=opts["val_split"], patience=opts["patience"],
                noise=0.0 if approx == "np" else opts["noise"], seed=seed + i, progress=inner,  # noise: base weights
            )
            if inner is not None:
                inner.close()
            if approx == "np":
                fitted.apply()
                approx_used = "np interpolation"
            else:
                approx_used = "gradient" + (" (fallback: not affine)" if approx == "linear" else "")
        xf_in = xf
        xf = _run(fused_levels[i], xf_in, bs)
        if spec is None:
            err = float(((xf - T) ** 2).sum() / (T**2).sum().clamp_min(1e-300))
        _check_finite(xf, f"level {i} (`{name}`) of the fused model")
        acts = outs
        report.append({
            "level": i, "name": name, "kind": lv_f.kind, "grouping": how, "approximation": approx_used,
            "grouping_cost": group_cost, "approx_error": err, "seconds": time.perf_counter() - t0,
        })
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    # 5. emit
    fused = fused_plan.gm
    fused.eval()
    fused.meta["fxfuse"] = {
        "method": method, "importance": importance, "n_models": len(models), "seed": seed,
        "seconds": time.perf_counter() - t_start, "levels": report,
    }
    if progress:
        print(format_report(fused))
    return fused


def _ensemble_labels(gms: Sequence[nn.Module], x: Tensor, batch_size: int) -> Tensor:
    """Attribution targets when the data has no labels: the ensemble's argmax."""
    with torch.no_grad():
        return sum(_run(g, x, batch_size).softmax(-1) for g in gms).argmax(-1)


def _baseline(models, x, labels, example, method, importance, dev, seed, progress, opts, t_start) -> GraphModule:
    from ._baselines import align, average, ensemble, last_layer_kd, otfusion, reset_batchnorm
    from ._npmerge import np_merge, pairwise

    if importance != "uniform" and method in ("vanilla", "ensemble", "last-layer-kd"):
        raise ValueError(f"{method} uses no importance scores; got importance={importance!r}, leave it 'uniform'")
    if method == "np-merge" and labels is None:
        raise ValueError(
            "np-merge learns its interpolation weights on the task loss and needs labels: pass data as "
            "(inputs, labels); for label-free merging use method='np-merge-levelwise'"
        )
    gms = [trace(m, example).to(dev) for m in models]
    bs = int(opts["batch_size"])
    if method in ("vanilla", "git-rebasin", "np-merge"):
        shapes = [{k: tuple(v.shape) for k, v in g.state_dict().items()} for g in gms]
        for k in range(1, len(gms)):
            if shapes[k] != shapes[0]:
                raise AlignmentError(
                    f"{method} combines parameters one to one, so models need identical architectures; models[{k}] "
                    "differs from models[0]. Use method='otfusion' or 'kf-linear' for models of different widths."
                )
    else:
        outs = [tuple(g(example).shape) for g in gms]
        if len(set(outs)) != 1:
            raise AlignmentError(f"{method}: the models' outputs have different shapes {outs}; they must share classes")
    if labels is not None:
        labels = labels.to(dev)
    elif importance != "uniform":
        labels = _ensemble_labels(gms, x, bs)
    common = {"importance": importance, "labels": labels, "batch_size": bs, "max_rows": opts["max_rows"],
              "seed": seed, "n_steps": opts["importance_steps"]}
    train = {"epochs": opts["epochs"], "lr": opts["lr"], "weight_decay": opts["weight_decay"],
             "batch_size": opts["train_batch_size"], "val_split": opts["val_split"], "patience": opts["patience"],
             "seed": seed}
    if method == "ensemble":
        fused = ensemble(gms, example, opts["class_weights"])
    elif method == "vanilla":
        fused = average(gms)
    elif method == "git-rebasin":
        aligned = align(gms, x, **common)
        fused = average(aligned.models, aligned.spaces, aligned.scores)
    elif method == "otfusion":
        fused = otfusion(gms, x, **common)
    elif method == "last-layer-kd":
        bar = _progress(opts["epochs"], "last-layer-kd", progress)
        fused = last_layer_kd(gms, x, progress=bar, **train)
        if bar is not None:
            bar.close()
    else:  # np-merge: align each pair, learn α on the task loss, reset BatchNorm (section III)
        def merge(a: GraphModule, b: GraphModule) -> GraphModule:
            bar = _progress(opts["epochs"], "np-merge", progress)
            out = np_merge(*align([a, b], x, method=method, **common).models, x, labels, progress=bar, **train)
            if bar is not None:
                bar.close()
            return out

        fused = pairwise(gms, merge)
    if opts["reset_bn"] and method in ("vanilla", "git-rebasin", "otfusion"):
        reset_batchnorm(fused, x, opts["batch_size"])
    fused.to(dev).eval()
    fused.meta["fxfuse"] = {
        "method": method, "importance": importance, "n_models": len(models), "seed": seed,
        "seconds": time.perf_counter() - t_start, "levels": [],
    }
    if progress:
        print(format_report(fused))
    return fused


def _progress(total: int, desc: str, enabled: bool, leave: bool = True):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave)


def format_report(fused: GraphModule) -> str:
    """A readable table of the per-level report stored in ``fused.meta["fxfuse"]``."""
    meta = fused.meta.get("fxfuse")
    if not meta:
        raise ValueError("this GraphModule carries no fxfuse report; it was not made by fxfuse.fuse")
    head = ("level", "name", "kind", "grouping", "approximation", "group cost", "rel. approx err", "s")
    rows = [head] + [
        (str(r["level"]), r["name"], r["kind"], r["grouping"], r["approximation"], f"{r['grouping_cost']:.4g}",
         f"{r['approx_error']:.3g}", f"{r['seconds']:.2f}")
        for r in meta["levels"]
    ]
    w = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = [f"fxfuse: {meta['method']} with {meta['importance']} importance, {meta['n_models']} models, "
             f"{meta['seconds']:.1f} s"]
    lines += ["  ".join(c.ljust(x) for c, x in zip(r, w)).rstrip() for r in rows]
    return "\n".join(lines)
