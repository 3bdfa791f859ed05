"""Running a :class:`~fxfuse._recipe.Recipe`: load, fuse, compare, evaluate, write, report.

:func:`run` is what ``fxfuse run`` and ``fxfuse fuse`` call. Its stages each
return records (:class:`RunRecord`); the terminal table, the model card and the
HTML/JSON report (:mod:`fxfuse._report`) are renderings of them. Output goes
into a temporary directory beside ``output.path`` that is renamed at the end,
so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import FxFuseError
from ._recipe import ModelSpec, Recipe, SourceSpec

__all__ = ["LoadedModel", "RunRecord", "load_models", "resolve_data_config", "load_source", "run", "plan_text",
           "evaluate", "save_timm_dir"]

# preprocessing fields of timm's data config, and which sources use them
_DC_FIELDS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass(eq=False)
class LoadedModel:
    """A base model, loaded, with where it came from."""

    spec: ModelSpec
    model: nn.Module
    arch: str
    model_args: dict[str, Any]
    data_config: dict[str, Any]
    parameters: int
    size_known: bool = False  # the input size is recorded (fxfuse checkpoint, local-dir config), not timm's default


@dataclass
class RunRecord:
    """What a run did: the data of the terminal table, the report and the model card."""

    recipe: Recipe
    models: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    levels: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    spaces: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "cpu"
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    fused_plan: Any = None

    @contextlib.contextmanager
    def stage(self, name: str, progress: bool):
        t0 = time.perf_counter()
        if progress:
            print(f"[{name}]", flush=True)
        yield
        self.stages.append({"stage": name, "seconds": time.perf_counter() - t0})


# --- models --------------------------------------------------------------------------------------


def _load_one(recipe: Recipe, i: int, spec: ModelSpec) -> LoadedModel:
    from ._models import _timm, read_checkpoint

    timm = _timm()
    where = f"models[{i}]"
    size = None
    if spec.model is None:  # an fxfuse checkpoint names its own architecture
        try:
            model, size, arch, kwargs = read_checkpoint(spec.checkpoint)
        except ValueError as e:
            raise recipe.error(f"{where}.checkpoint", f"{e}. For a timm checkpoint, also give `model` (its timm name)") from e
    elif spec.model.startswith("local-dir:"):
        try:
            model = timm.create_model(spec.model, pretrained=True, **spec.model_args)
        except Exception as e:
            raise recipe.error(f"{where}.model", f"timm could not load {spec.model!r}: {type(e).__name__}: {e}") from e
        arch, kwargs = model.pretrained_cfg.get("architecture", spec.model), dict(getattr(model, "_model_args", {}))
    else:
        from ._models import _create_timm

        arch, kwargs = spec.model, dict(spec.model_args)
        size = recipe.data.transform.input_size
        try:
            model = _create_timm(arch, size, kwargs)
        except Exception as e:
            raise recipe.error(f"{where}.model_args", f"timm.create_model({arch!r}, **{kwargs}) failed: {e}") from e
        if spec.checkpoint is None:
            print(f"warning: {where} ({arch}) has no checkpoint: it is randomly initialised", file=sys.stderr)
        else:
            _load_timm_weights(recipe, where, model, spec)
    model.eval()
    dc = _model_data_config(model)
    if size is not None:
        dc["input_size"] = tuple(size)
    n = sum(p.numel() for p in model.parameters())
    known = size is not None or (spec.model or "").startswith("local-dir:")
    return LoadedModel(spec, model, arch, kwargs, dc, n, known)


def _load_timm_weights(recipe: Recipe, where: str, model: nn.Module, spec: ModelSpec) -> None:
    from timm.models import load_checkpoint

    try:  # timm's own loader: safetensors or torch files, EMA/state_dict keys, `module.` prefixes
        load_checkpoint(model, spec.checkpoint, use_ema=spec.use_ema, strict=True, weights_only=True)
    except Exception as e:
        if isinstance(e, RuntimeError) and "weights_only" not in str(e) and "pickl" not in str(e).lower():
            first = str(e).strip().splitlines()
            raise recipe.error(
                f"{where}.checkpoint",
                f"{spec.checkpoint!r} does not fit timm's {spec.model!r} with model_args {spec.model_args}: "
                f"{' '.join(first[:3])[:600]}. Give the model_args the model was trained with (e.g. num_classes, "
                "in_chans)",
            ) from e
        raise recipe.error(
            f"{where}.checkpoint",
            f"{spec.checkpoint!r} is not a plain PyTorch file of tensors ({type(e).__name__} in a weights-only "
            "load): fxfuse never unpickles code. Save plain data, e.g. torch.save(model.state_dict(), path), or "
            "safetensors",
        ) from e


def _model_data_config(model: nn.Module) -> dict[str, Any]:
    import logging

    from timm.data.model_config import resolve_input_data_config
    from timm.models._input import get_model_input_config

    log = logging.getLogger("timm.data.model_config")
    level = log.level
    log.setLevel(logging.ERROR)  # timm notes each channel adaptation of mean/std; the report shows the result
    try:
        dc = dict(resolve_input_data_config(model))
        fixed = get_model_input_config(model)
        if fixed.get("fixed_input_size"):
            dc["input_size"] = tuple(fixed["input_size"])
    except Exception:  # not a timm model: nothing to resolve
        from timm.data import resolve_data_config as rdc

        dc = dict(rdc(model=model))
    finally:
        log.setLevel(level)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dc.items()}


def load_models(recipe: Recipe) -> list[LoadedModel]:
    """Load every base model of a recipe (in eval mode, on the CPU)."""
    return [_load_one(recipe, i, s) for i, s in enumerate(recipe.models)]


def resolve_data_config(recipe: Recipe, loaded: list[LoadedModel]) -> dict[str, Any]:
    """The preprocessing of the run: a model's timm data config with the recipe's overrides.

    Raises:
        RecipeError: ``transform: model`` and the models' data configs disagree on a
            field that the recipe does not override (both are shown).
    """
    tf = recipe.data.transform
    overrides = {k: getattr(tf, k) for k in ("input_size", "mean", "std", "interpolation", "crop_pct")
                 if getattr(tf, k) is not None}
    # whether the input size is the models' own (recorded or given), not timm's default for the architecture
    known = {"size_known": tf.input_size is not None or loaded[tf.from_model or 0].size_known}
    if not tf.use_model:
        base = {"input_size": loaded[0].data_config["input_size"], "interpolation": "bilinear",
                "mean": None, "std": None, "crop_pct": 1.0, "crop_mode": "center"}
        return {**base, **overrides, **known}
    if tf.from_model is not None:
        return {**loaded[tf.from_model].data_config, **overrides, **known}
    first = loaded[0].data_config
    for j, lm in enumerate(loaded[1:], 1):
        diff = [k for k in _DC_FIELDS if k not in overrides and first.get(k) != lm.data_config.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {first.get(k)} (models[0]) vs {lm.data_config.get(k)} (models[{j}])" for k in diff)
            raise recipe.error(
                "data.transform",
                f"the models' timm data configs disagree ({shown}). Say which to use: "
                "`transform: {from_model: 0}`, or give the fields explicitly (e.g. input_size, mean, std)",
            )
    return {**first, **overrides, **known}


# --- data ----------------------------------------------------------------------------------------


def _subset(n: int, samples: int | None, seed: int) -> Tensor:
    if samples is None or samples >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values


def _normalise(x: Tensor, dc: dict[str, Any], explicit: bool) -> Tensor:
    if not explicit or dc.get("mean") is None:
        return x
    mean = torch.tensor(dc["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(dc["std"], dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def load_source(recipe: Recipe, src: SourceSpec, key: str, dc: dict[str, Any], *, need_labels: bool = False):
    """A dataset of (input, label) pairs for one data source, with the run's preprocessing.

    Image folders get timm's eval transform (resize, centre crop, to tensor,
    normalise). The digits are resized to ``input_size``; the digits and tensor
    files are normalised only by an explicit ``transform.mean``/``std``.

    Returns:
        (dataset, description) where the dataset yields ``(Tensor of shape (C, H, W), label)``.
    """
    from torch.utils.data import Subset, TensorDataset

    c, h, w = dc["input_size"]
    explicit = recipe.data.transform.mean is not None or recipe.data.transform.std is not None
    if src.source == "digits":
        from .data import load_digits, train_test_split

        x, y = load_digits(size=8)
        if src.split != "all":
            tr, te = train_test_split(len(y), 0.25, seed=recipe.seed)
            idx = tr if src.split == "train" else te
            x, y = x[idx], y[idx]
        if (h, w) != (8, 8):
            print(f"resizing the digits from 8x8 to {h}x{w} (bilinear) for the models' input size")
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if c != 1:
            x = x.repeat(1, c, 1, 1)
        x = _normalise(x, dc, explicit)
        ds, what = TensorDataset(x, y), f"digits ({src.split}), {h}x{w}"
    elif src.source == "tensors":
        x, y = _read_tensors(recipe, src, key)
        if x.shape[1] != c:
            raise recipe.error(f"{key}.path", f"inputs have {x.shape[1]} channels but the models take {c}")
        x = x.float()
        if tuple(x.shape[2:]) != (h, w) and src.resize:
            print(f"resizing the inputs from {x.shape[2]}x{x.shape[3]} to {h}x{w} (bilinear, resize: true)")
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        elif tuple(x.shape[2:]) != (h, w) and dc.get("size_known"):
            raise recipe.error(f"{key}.path", f"inputs of shape {tuple(x.shape[1:])} but the models take {(c, h, w)}; "
                               "pass --resize (recipe: `resize: true`) to resize them (bilinear)")
        x = _normalise(x, dc, explicit)
        ds = TensorDataset(x, y) if y is not None else TensorDataset(x)
        what = f"tensors {src.path} ({x.shape[2]}x{x.shape[3]})"
    else:
        ds, what = _image_folder(recipe, src, key, dc)
    if need_labels and src.source == "tensors" and len(ds.tensors) < 2:
        raise recipe.error(f"{key}.path", "evaluation needs labels; store them under `labels` in the file")
    if len(ds) == 0:
        raise recipe.error(f"{key}.path", "holds no samples")
    idx = _subset(len(ds), src.samples, recipe.seed)
    if len(idx) < len(ds):
        ds = Subset(ds, idx.tolist())
    return ds, f"{len(idx)} samples of {what}"


def _read_tensors(recipe: Recipe, src: SourceSpec, key: str) -> tuple[Tensor, Tensor | None]:
    from ._models import load_plain

    if src.path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(src.path)
    else:
        try:
            obj = load_plain(src.path, "tensor file")
        except ValueError as e:
            raise recipe.error(f"{key}.path", str(e)) from e
    if isinstance(obj, Tensor):
        x, y = obj, None
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    elif isinstance(obj, dict) and "inputs" in obj:
        x, y = obj["inputs"], obj.get("labels")
    else:
        raise recipe.error(f"{key}.path", "expected a Tensor, an (inputs, labels) pair or a mapping with `inputs` "
                                          "(and `labels`)")
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise recipe.error(f"{key}.path", f"inputs must be a Tensor of shape (n, C, H, W), got {got}")
    if y is not None and (not isinstance(y, Tensor) or y.shape != (x.shape[0],)):
        raise recipe.error(f"{key}.path", f"labels must be a Tensor of shape ({x.shape[0]},) of class indices")
    return x, (y.long() if y is not None else None)


def _image_folder(recipe: Recipe, src: SourceSpec, key: str, dc: dict[str, Any]):
    from timm.data import create_transform
    from torchvision import datasets, transforms

    c = dc["input_size"][0]
    kw = {k: dc[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode") if dc.get(k) is not None}
    if dc.get("mean") is not None:
        kw.update(mean=dc["mean"], std=dc["std"])
    else:
        kw.update(mean=(0.0,) * c, std=(1.0,) * c)
    tf = create_transform(**kw, is_training=False)
    gray = [transforms.Grayscale(1)] if c == 1 else []
    tf = transforms.Compose([*gray, *getattr(tf, "transforms", [tf])])
    try:
        ds = datasets.ImageFolder(src.path, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise recipe.error(f"{key}.path", f"{e}; an image folder holds one sub-folder of images per class") from e
    return ds, f"image folder {src.path} ({dc['input_size'][1]}x{dc['input_size'][2]}, timm eval transform)"


def _loader(recipe: Recipe, ds) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=recipe.data.batch_size, shuffle=False, num_workers=recipe.data.workers)


class _Batches:
    """The fusion data as an iterable of ``(inputs, labels)`` or input batches, the same every pass."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for b in self.loader:
            yield tuple(b) if len(b) == 2 else b[0]


# --- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, desc: str | None = None) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on a loader of (inputs, labels).

    ``desc`` shows a progress bar with that label.
    """
    from ._engine import progress_bar

    was = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    bar = progress_bar(len(loader), f"evaluating {desc}", desc is not None, leave=False)
    try:
        for x, y in loader:
            if bar is not None:
                bar.update(1)
            out = model(x.to(device))
            y = y.to(device)
            loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
            correct += int((out.argmax(-1) == y).sum())
            total += len(y)
    finally:
        model.train(was)
        if bar is not None:
            bar.close()
    return 100.0 * correct / max(total, 1), loss / max(total, 1)


# --- outputs -------------------------------------------------------------------------------------


def save_timm_dir(model: nn.Module, path: str, data_config: dict[str, Any], model_args: dict[str, Any],
                  tag: str = "fxfuse") -> None:
    """Write ``model.safetensors`` and ``config.json`` with timm's own writer, for ``local-dir:`` loading."""
    from timm.models import save_for_hf

    dc = {k: data_config[k] for k in _DC_FIELDS if data_config.get(k) is not None}
    args = {k: v for k, v in model_args.items() if k not in ("pretrained",)}
    save_for_hf(model, path, model_config={"pretrained_cfg": {"tag": tag}}, model_args=args or None,
                safe_serialization=True, data_config=dc)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _write_timm(rec: RunRecord, fused: nn.Module, first: LoadedModel, dc: dict[str, Any], tmp: str,
                example: Tensor) -> nn.Module | None:
    """The fused weights in the first model's timm architecture, written and checked; None when they do not map."""
    import timm

    rebuilt = copy.deepcopy(first.model).cpu()
    try:
        rebuilt.load_state_dict({k: v.detach().cpu() for k, v in fused.state_dict().items()}, strict=True)
    except (RuntimeError, TypeError) as e:
        rec.notes.append(f"model.safetensors not written: the fused parameters do not map onto timm's "
                         f"{first.arch!r} ({str(e).splitlines()[0][:200]}); the fused model is saved as TorchScript")
        return None
    rebuilt.eval()
    save_timm_dir(rebuilt, tmp, {**dc, "mean": dc.get("mean") or (0.0,) * dc["input_size"][0],
                                 "std": dc.get("std") or (1.0,) * dc["input_size"][0]}, first.model_args,
                  tag=f"fxfuse_{rec.recipe.method.name}")
    reloaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
    with torch.no_grad():
        diff = _max_diff(reloaded(example), fused.cpu()(example))
    ok = diff <= 1e-5
    rec.outputs.append({"file": "model.safetensors", "what": f"timm weights of {first.arch} (+ config.json)",
                        "check": f"timm.create_model('local-dir:…', pretrained=True): max abs diff {diff:.1e}",
                        "ok": ok})
    if not ok:
        os.remove(os.path.join(tmp, "model.safetensors"))
        os.remove(os.path.join(tmp, "config.json"))
        rec.notes.append(f"model.safetensors removed: timm's {first.arch!r} reloaded from it differs from the fused "
                         f"model by {diff:.1e}; the fused model is saved as TorchScript")
        return None
    return rebuilt


def _export_file(rec: RunRecord, fused: nn.Module, path: str, fmt: str, example: Tensor, label: str) -> None:
    from ._export import export

    export(fused, path, example, format=fmt)  # raises when the reloaded model differs
    if fmt == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
            loaded = torch.jit.load(path)
    else:
        loaded = torch.export.load(path).module()
    with torch.no_grad():
        diff = _max_diff(loaded(example), fused(example))
    rec.outputs.append({"file": label, "what": fmt, "check": f"reloaded: max abs diff {diff:.1e}", "ok": True})


# --- the run -------------------------------------------------------------------------------------


def plan_text(recipe: Recipe) -> str:
    """The resolved plan of a recipe (``fxfuse run --dry-run``): models, levels, data, method; nothing is fused."""
    from fxfuse import trace
    from fxfuse.passes import partition_levels

    from ._config import make_config

    loaded = load_models(recipe)
    dc = resolve_data_config(recipe, loaded)
    fusion, what = load_source(recipe, recipe.data.fusion, "data.fusion", dc)
    x = fusion[0][0].unsqueeze(0)
    from fxfuse.passes import affine_spec, block_spec

    from ._methods import get_method

    lines = [f"models ({len(loaded)}):"]
    plans = []
    for i, lm in enumerate(loaded):
        plan = partition_levels(trace(lm.model, x))
        plans.append(plan)
        src = lm.spec.checkpoint or lm.spec.model
        lines.append(f"  [{i}] {lm.spec.name}: {lm.arch} {lm.model_args or ''} from {src}; {lm.parameters:,} "
                     f"parameters, {len(plan)} levels")
    deepest = max(range(len(plans)), key=lambda k: (len(plans[k]), -k))
    if len({len(p) for p in plans}) > 1:
        lines.append(f"depths differ: every model is aligned to models[{deepest}] (the deepest, whose architecture "
                     "the fused model takes) by cross-layer alignment; identity levels go where a model lacks one "
                     "(`fxfuse levels A B` shows the alignment)")
    if get_method(recipe.method.name).solver == "linear":
        kinds = ["closed form" if affine_spec(g) else "block" if block_spec(g) else "gradient"
                 for g in plans[deepest].split()]
        if recipe.method.options.get("blocks") == "gradient":
            kinds = ["gradient" if k == "block" else k for k in kinds]
        lines.append(f"levels of models[{deepest}] under {recipe.method.name}: {kinds.count('closed form')} in closed form, "
                     f"{kinds.count('block')} blocks op by op in closed form, {kinds.count('gradient')} by gradient")
    lines.append(f"fusion data: {what}")
    if recipe.data.eval is not None:
        _, ewhat = load_source(recipe, recipe.data.eval, "data.eval", dc, need_labels=True)
        lines.append(f"eval data: {ewhat}")
    lines.append("preprocessing: " + ", ".join(f"{k}={dc[k]}" for k in _DC_FIELDS if k in dc))
    cfg = make_config(**recipe.fuse_kwargs())
    scored = {"own": " of each model's own prediction", "labels": " of the labels",
              "ensemble": " of the ensemble's prediction"}[cfg.importance_target]
    lines.append(f"method: {cfg.method} (importance {cfg.importance}{scored if cfg.importance != 'uniform' else ''}, "
                 f"seed {cfg.seed}, device {cfg.device})"
                 + (f" options {recipe.method.options}" if recipe.method.options else ""))
    if recipe.compare:
        lines.append("compare: " + ", ".join(m.name for m in recipe.compare))
    out = recipe.output
    lines.append(f"output: {out.path} ({', '.join(out.formats)})" if out.path else "output: (no directory)")
    if out.checkpoint:
        lines.append(f"fxfuse checkpoint: {out.checkpoint}")
    return "\n".join(lines)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(recipe: Recipe, *, loaded: list[LoadedModel] | None = None) -> RunRecord:
    """Run a recipe: load the models and data, fuse, compare, evaluate, write the outputs and the report.

    Args:
        recipe: A validated recipe (:func:`fxfuse._recipe.load_recipe`).
        loaded: Models already in memory (the demo); default: load them from the recipe.

    Returns:
        The run's record (also written as ``report.json``).

    Raises:
        RecipeError: a model or data file that does not fit (names the key).
        FxFuseError: the fusion or an output check failed; nothing is written then.
    """
    from fxfuse import fuse

    from ._config import resolve_device
    from . import _dist

    t_start = time.perf_counter()
    rec = RunRecord(recipe)
    rank, world = _dist.world()
    prog = recipe.progress and rank == 0  # under torchrun, rank 0 alone prints and writes
    dev = resolve_device(recipe.fuse_device())
    rec.device = str(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with rec.stage("load models", prog):
        loaded = loaded if loaded is not None else load_models(recipe)
        for lm in loaded:
            rec.models.append({"name": lm.spec.name, "model": lm.spec.model or lm.arch, "arch": lm.arch,
                               "checkpoint": lm.spec.checkpoint, "parameters": lm.parameters})
    with rec.stage("load data", prog):
        dc = resolve_data_config(recipe, loaded)
        fusion_ds, fwhat = load_source(recipe, recipe.data.fusion, "data.fusion", dc)
        if world > 1:  # this rank's contiguous shard; fuse sums the statistics of all shards
            from torch.utils.data import Subset

            n = len(fusion_ds)
            lo, hi = rank * n // world, (rank + 1) * n // world
            fusion_ds = Subset(fusion_ds, range(lo, hi))
            fwhat += f" (rank {rank} of {world}: samples {lo}..{hi - 1})"
        rec.data = {"fusion": fwhat, "preprocessing": {k: dc.get(k) for k in _DC_FIELDS}}
        eval_loader = None
        if recipe.data.eval is not None:
            eval_ds, ewhat = load_source(recipe, recipe.data.eval, "data.eval", dc, need_labels=True)
            rec.data["eval"] = ewhat
            eval_loader = _loader(recipe, eval_ds)
        fusion = _Batches(_loader(recipe, fusion_ds))
        if prog:
            print(f"  fusion data: {fwhat}" + (f"; eval data: {rec.data['eval']}" if eval_loader else ""))
    models = [lm.model for lm in loaded]
    with rec.stage(f"fuse ({recipe.method.name})", prog):
        t0 = time.perf_counter()
        fused = fuse(models, fusion, **recipe.fuse_kwargs())
        fuse_s = time.perf_counter() - t0
    meta = fused.meta.get("fxfuse", {})
    if rank == 0:  # the records feed the report, which rank 0 alone writes
        _level_records(rec, meta, fused, _fused_architecture(fused, loaded).model, fusion_ds)
    compared: list[tuple[str, nn.Module, float]] = []
    if recipe.compare:
        with rec.stage("compare", prog):
            for m in recipe.compare:
                t0 = time.perf_counter()
                other = fuse(models, fusion, **{**recipe.fuse_kwargs(m), "progress": False})
                compared.append((m.name, other, time.perf_counter() - t0))
    if rank != 0:  # the other ranks took part in every fusion; rank 0 evaluates and writes
        return rec
    rows = [(lm.spec.name, "base", lm.model, None) for lm in loaded]
    rows += [(name, "compare", m, s) for name, m, s in compared]
    rows.append((f"fused ({recipe.method.name})", "fused", fused, fuse_s))
    with rec.stage("evaluate" if eval_loader is not None else "count", prog):
        for name, kind, m, secs in rows:
            acc = loss = None
            if eval_loader is not None:
                m.to(dev)
                acc, loss = evaluate(m, eval_loader, dev, name if prog else None)
            n_params = sum(p.numel() for p in m.parameters())
            rec.results.append({"model": name, "kind": kind, "accuracy": acc, "loss": loss, "seconds": secs,
                                "parameters": n_params})
        for lm, info, r in zip(loaded, rec.models, rec.results):
            lm.model.cpu()
            info.update(accuracy=r["accuracy"], loss=r["loss"])
    if prog:
        print(format_results(rec))
    with rec.stage("write", prog):
        _write_outputs(rec, fused, loaded, dc, fusion_ds, t_start)
    return rec


def _fused_architecture(fused: nn.Module, loaded: list[LoadedModel]) -> LoadedModel:
    """The base model whose architecture the fused model has: models[0], or the deepest when depths differ."""
    shapes = {k: tuple(v.shape) for k, v in fused.state_dict().items()}
    for lm in loaded:
        if {k: tuple(v.shape) for k, v in lm.model.state_dict().items()} == shapes:
            return lm
    return loaded[0]


def _level_records(rec: RunRecord, meta: dict, fused: nn.Module, first: nn.Module, fusion_ds) -> None:
    from fxfuse import trace
    from fxfuse.passes import neuron_spaces, partition_levels

    for r in meta.get("levels", []):
        how = r["approximation"]
        solved = "closed form" if how.startswith("closed form") else "identity" if "identity" in how else (
            "gradient" if "gradient" in how else how)
        rec.levels.append({"index": r["level"], "name": r["name"], "kind": r["kind"], "error": r["approx_error"],
                           "seconds": r["seconds"], "solved_by": solved, "approximation": how,
                           "grouping": r["grouping"], "grouping_cost": r["grouping_cost"], "rows": r["rows"],
                           "columns": r["columns"], "ridge": r.get("ridge"), "ops": r.get("ops") or [],
                           "identity": list(r.get("identity") or ()), "held_out_error": r.get("held_out_error")})
    x = fusion_ds[0][0].unsqueeze(0)
    try:
        gm = trace(copy.deepcopy(first).cpu(), x)
        plan = partition_levels(gm)
        spaces = neuron_spaces(plan.gm)
    except Exception as e:  # the report still has everything else
        rec.notes.append(f"no level plan drawing: {type(e).__name__}: {e}")
        return
    rec.fused_plan = plan
    out_nodes = {lv.output: lv for lv in plan}
    node_level = {n.name: n.meta.get("fxfuse", {}).get("level") for n in plan.gm.graph.nodes}
    for s in spaces.spaces:
        names = [n for n, _ in s.nodes]
        grouped = [out_nodes[n] for n in names if n in out_nodes]
        inside = sorted({node_level[n] for n in names if node_level.get(n) is not None})
        if s.fixed:
            how = f"fixed ({s.reason})"
        elif grouped:
            how = f"grouped at level {grouped[0].index} (`{grouped[0].name}`)"
        else:
            how = "inside level " + ", ".join(str(i) for i in inside) + " (solved with its level)"
        rec.spaces.append({"index": s.index, "size": s.size, "fixed": s.fixed, "how": how,
                           "levels": inside, "tensors": len(s.tensors)})


def format_results(rec: RunRecord) -> str:
    """The results table: every base, compare entry and the fused model."""
    head = f"{'model':32s} {'accuracy %':>10s} {'loss':>8s} {'seconds':>8s}"
    lines = [head]
    for r in rec.results:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.1f}"
        loss = "" if r["loss"] is None else f"{r['loss']:.3f}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"{r['model'][:32]:32s} {acc:>10s} {loss:>8s} {secs:>8s}")
    return "\n".join(lines)


def _write_outputs(rec: RunRecord, fused, loaded: list[LoadedModel], dc: dict[str, Any], fusion_ds,
                   t_start: float) -> None:
    import yaml

    from . import _report
    from ._models import save_checkpoint

    recipe = rec.recipe
    out = recipe.output
    example = torch.stack([fusion_ds[i][0] for i in range(min(2, len(fusion_ds)))]).cpu()
    fused = fused.cpu().eval()
    first = _fused_architecture(fused, loaded)
    parent = os.path.dirname(os.path.abspath(out.path or out.checkpoint))
    tmp = tempfile.mkdtemp(prefix=".fxfuse-run-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        rebuilt = None
        if out.path is not None:
            wants = set(out.formats)
            if "safetensors" in wants:
                rebuilt = _write_timm(rec, fused, first, dc, tmp, example)
                if rebuilt is None:
                    wants.add("torchscript")
            if "torchscript" in wants:
                _export_file(rec, fused, os.path.join(tmp, "model.torchscript.pt"), "torchscript", example,
                             "model.torchscript.pt")
            if "export" in wants:
                _export_file(rec, fused, os.path.join(tmp, "model.pt2"), "export", example, "model.pt2")
            text = recipe.text or yaml.safe_dump(_as_dict(recipe), sort_keys=False)
            with open(os.path.join(tmp, "recipe.yaml"), "w", encoding="utf-8") as f:
                f.write(text)
            rec.outputs.append({"file": "recipe.yaml", "what": "the recipe as run", "check": "", "ok": True})
        ckpt_tmp = None
        if out.checkpoint is not None:
            if rebuilt is None:
                rebuilt = copy.deepcopy(first.model).cpu()
                try:
                    rebuilt.load_state_dict({k: v.detach().cpu() for k, v in fused.state_dict().items()})
                except RuntimeError as e:
                    raise FxFuseError(
                        f"the fused model's parameters do not map back onto timm's {first.arch!r} ({e}); "
                        "save it with output.torchscript / --torchscript instead"
                    ) from e
            ckpt_tmp = os.path.join(tmp, "checkpoint.pt")
            save_checkpoint(rebuilt, ckpt_tmp, first.arch, input_size=tuple(example.shape[1:]), **first.model_args)
        for fmt, path in (("torchscript", out.torchscript), ("export", out.export)):
            if path:
                _export_file(rec, fused, os.path.join(tmp, f"extra.{fmt}"), fmt, example, path)
        rec.seconds = time.perf_counter() - t_start
        rec.peak_rss_mb = _peak_rss_mb()
        if torch.cuda.is_available() and rec.device.startswith("cuda"):
            rec.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20
        if out.path is not None:
            _report.write_reports(rec, tmp)
        for name in [tmp, *(os.path.join(tmp, f) for f in os.listdir(tmp))]:  # mkdtemp's 0700 is not wanted
            os.chmod(name, (0o777 if os.path.isdir(name) else 0o666) & ~umask)
        # every file is complete: move them into place
        if ckpt_tmp is not None:
            shutil.move(ckpt_tmp, out.checkpoint)
        for fmt, path in (("torchscript", out.torchscript), ("export", out.export)):
            if path:
                shutil.move(os.path.join(tmp, f"extra.{fmt}"), path)
        if out.path is None:
            shutil.rmtree(tmp)
            return
        old = None
        if os.path.exists(out.path):
            old = out.path.rstrip("/") + f".old-{os.getpid()}"
            os.replace(out.path, old)
        os.replace(tmp, out.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _as_dict(recipe: Recipe) -> dict[str, Any]:
    """A recipe built from flags, written back as a recipe file."""
    def clean(v):
        if dataclasses.is_dataclass(v):
            return {k: clean(x) for k, x in dataclasses.asdict(v).items() if x not in (None, {}, ())}
        if isinstance(v, (tuple, list)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x not in (None, {}, ())}
        return v

    from ._recipe import RECIPE_FORMAT

    d: dict[str, Any] = {"format": RECIPE_FORMAT, "seed": recipe.seed, "device": recipe.device}
    d["models"] = [{k: v for k, v in clean(m).items() if k != "use_ema" or v is False} for m in recipe.models]
    data = clean(recipe.data)
    tf = data.pop("transform", {})
    tf.pop("use_model", None)
    data["transform"] = tf or ("model" if recipe.data.transform.use_model else "none")
    d["data"] = data
    d["method"] = clean(recipe.method)
    d["importance"] = recipe.importance
    if recipe.compare:
        d["compare"] = [clean(m) for m in recipe.compare]
    d["output"] = {k: v for k, v in clean(recipe.output).items() if k != "overwrite"}
    d["report"] = clean(recipe.report)
    return d
