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
}

# baselines (see fxfuse._baselines): they return GraphModules like every other method
BASELINES = ("vanilla", "ensemble", "git-rebasin")

_DEFAULTS: dict[str, Any] = {
    "reset_bn": False,  # vanilla / git-rebasin: recompute BatchNorm statistics on the fusion data
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
          keeps class identity and averages the logits;
       c. targets T: importance-weighted cluster means;
       d. approximate: closed-form least squares for affine levels under a
          ``*-linear`` method, else Adam on the MSE to T (also the fallback for
          non-affine levels under a linear method, reported as such);
    5. emit the fused GraphModule in eval mode on ``device``, with a per-level
       report in ``fused.meta["fxfuse"]``.

    Args:
        models: Two or more trained models with the same number of levels.
        data: Fusion data: a Tensor of inputs, an ``(inputs, labels)`` tuple, an
            iterable of Tensors or of ``(inputs, labels)`` pairs, or a DataLoader.
        method: ``"hf-linear"``, ``"kf-linear"``, ``"kf-gradient"`` or ``"hf-gradient"``;
            or a baseline: ``"vanilla"`` (parameter averaging), ``"ensemble"`` (a module
            averaging the logits) or ``"git-rebasin"`` (activation matching per neuron
            space, then averaging).
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.
        device: Where to compute; defaults to CUDA when available, else CPU.
        seed: Seed of k-means, data splits and gradient fitting.
        progress: Show progress bars and print the per-level report.
        **options: ``reset_bn`` (vanilla, git-rebasin: recompute BatchNorm statistics on
            the data), ``class_weights`` (ensemble), ``target`` (a model whose architecture the fused model takes,
            e.g. a wider one; default ``models[0]``), ``max_rows``, ``batch_size``,
            ``epochs``, ``lr``, ``weight_decay``, ``train_batch_size``,
            ``val_split``, ``patience``, ``noise``, ``n_init``, ``importance_steps``.

    Returns:
        The fused model, a plain ``torch.fx.GraphModule``.

    Raises:
        ValueError: unknown method, importance or option value; fewer than two
            models; empty data; non-finite data; hf-* with unequal widths.
        TypeError: unknown option or bad data type.
        AlignmentError: models with different level counts or head widths.
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
    opts = {**_DEFAULTS, **options}
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
        return _baseline(models, x, example, method, importance, dev, seed, progress, opts, t_start)
    plans = [partition_levels(trace(m, example).to(dev)) for m in models]
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
    if grouping == "hf":
        for i in range(L - 1):
            ws = [plans[0][i].width, plans[1][i].width, fused_plan[i].width]
            if len(set(ws)) != 1:
                raise ValueError(
                    f"level {i} (`{plans[0][i].name}`): models have widths {ws[0]} and {ws[1]}"
                    f"{'' if ws[2] == ws[0] else f' (fused {ws[2]})'}; {method} needs equal widths, use method='kf-linear'"
                )
    base_levels = [p.split() for p in plans]
    fused_levels = fused_plan.split()
    bs = int(opts["batch_size"])

    # 3. importance scores (labels: given, else the ensemble's argmax)
    if labels is None and importance != "uniform":
        with torch.no_grad():
            probs = sum(_run(p.gm, x, bs).softmax(-1) for p in plans)
        labels = probs.argmax(-1)
    if labels is not None:
        labels = labels.to(dev)
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
            inner = _progress(opts["epochs"], f"level {i} {name}", progress, leave=False)
            # eval mode: norms keep their running statistics while their affine parameters train
            fit_gradient(
                fused_levels[i], xf, T, epochs=opts["epochs"], lr=opts["lr"], weight_decay=opts["weight_decay"],
                batch_size=opts["train_batch_size"], val_split=opts["val_split"], patience=opts["patience"],
                noise=opts["noise"], seed=seed + i, progress=inner,
            )
            if inner is not None:
                inner.close()
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


def _baseline(models, x, example, method, importance, dev, seed, progress, opts, t_start) -> GraphModule:
    from ._baselines import align, average, ensemble, reset_batchnorm

    if importance != "uniform":
        raise ValueError(f"{method} supports importance='uniform' only in this version; got {importance!r}")
    gms = [trace(m, example).to(dev) for m in models]
    if method != "ensemble":
        shapes = [{k: tuple(v.shape) for k, v in g.state_dict().items()} for g in gms]
        for k in range(1, len(gms)):
            if shapes[k] != shapes[0]:
                raise AlignmentError(
                    f"{method} averages parameters, so models need identical architectures; models[{k}] differs "
                    f"from models[0]. Use method='kf-linear' for models of different widths."
                )
    if method == "ensemble":
        fused = ensemble(gms, example, opts["class_weights"])
    elif method == "vanilla":
        fused = average(gms)
    else:
        fused = average(align(gms, x, batch_size=opts["batch_size"], max_rows=opts["max_rows"], seed=seed))
    if opts["reset_bn"] and method != "ensemble":
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
