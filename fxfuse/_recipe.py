"""Recipe files (``format: fxfuse-recipe/1``): one validated description of a fusion run.

A recipe says which models to fuse, on which data, with which method, what to
compare the result with, and where to write the model directory and the report.
``fxfuse run RECIPE.yaml`` runs one; ``fxfuse fuse`` builds the same
:class:`Recipe` from its flags, so the two are views of one configuration.

Validation reads the whole file before any work: an unknown key, a wrong type,
a missing file or an unknown method raises :class:`RecipeError`, which names the
key path (``method.name``), the line, and the nearest valid key.

Relative paths are taken from the current directory (as ``mergekit-yaml`` does),
so a recipe runs the same wherever it is stored.

Example:
    >>> from fxfuse._recipe import parse_recipe
    >>> text = '''
    ... format: fxfuse-recipe/1
    ... models: [{model: test_resnet}, {model: test_resnet}]
    ... data: {fusion: {source: digits, samples: 64}}
    ... method: kf-linear
    ... output: {path: out/fused}
    ... '''
    >>> r = parse_recipe(text, check_files=False)
    >>> r.method.name, r.data.fusion.samples, r.report.html
    ('kf-linear', 64, 'report.html')
    >>> parse_recipe(text.replace("method:", "methd:"), check_files=False)
    Traceback (most recent call last):
    ...
    fxfuse._recipe.RecipeError: recipe line 5: unknown key `methd`; did you mean `method`?
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RECIPE_FORMAT",
    "Recipe",
    "RecipeError",
    "ModelSpec",
    "SourceSpec",
    "TransformSpec",
    "DataSpec",
    "MethodSpec",
    "OutputSpec",
    "ReportSpec",
    "load_recipe",
    "parse_recipe",
    "recipe_from_dict",
    "SOURCES",
    "OUTPUT_FORMATS",
]

RECIPE_FORMAT = "fxfuse-recipe/1"
SOURCES = ("digits", "imagefolder", "tensors")
DIGIT_SPLITS = ("all", "train", "test")
OUTPUT_FORMATS = ("safetensors", "torchscript", "export")


class RecipeError(ValueError):
    """A recipe is invalid: the message names the key path, the line and a fix."""

    def __init__(self, message: str, path: str = "", line: int | None = None, file: str | None = None):
        where = (file or "recipe") + (f" line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}")
        self.message, self.path, self.line, self.file = message, path, line, file


# --- the validated recipe --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One base model.

    Attributes:
        model: A timm name (``"resnet18"``) or ``"local-dir:PATH"``; None when
            ``checkpoint`` is an fxfuse checkpoint that names its architecture.
        checkpoint: ``.safetensors``, ``.pth``, ``.pth.tar`` or ``.bin`` with timm's key
            conventions (``state_dict_ema``, ``model_ema``, ``state_dict``, a ``module.`` prefix),
            or an fxfuse checkpoint; None for ``local-dir:`` models.
        model_args: Keyword arguments of ``timm.create_model`` (e.g. ``num_classes``).
        use_ema: Prefer the EMA weights of a timm checkpoint when it has them.
        name: Label in the tables and the report.
    """

    model: str | None
    checkpoint: str | None = None
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    use_ema: bool = True
    name: str = ""


@dataclass(frozen=True)
class SourceSpec:
    """Where samples come from.

    Attributes:
        source: ``"digits"`` (scikit-learn's digits, resized to the models' input),
            ``"imagefolder"`` (a torchvision ImageFolder: one folder per class), or
            ``"tensors"`` (a ``.pt`` or ``.safetensors`` file with ``inputs`` and
            optional ``labels``, already preprocessed).
        path: Folder or file; unused for digits.
        samples: Use a seeded random subset of this many samples; None uses all.
        split: Digits only: ``"all"``, or the ``"train"`` / ``"test"`` part of the
            seeded 75/25 split the demo trains and tests on.
        resize: Tensor files only: resize the inputs to the models' input size (bilinear).
    """

    source: str
    path: str | None = None
    samples: int | None = None
    split: str = "all"
    resize: bool = False


@dataclass(frozen=True)
class TransformSpec:
    """Preprocessing: timm's data config of a base model, with explicit overrides.

    Attributes:
        from_model: Index of the model whose data config is used; None means
            every model's config, which must then agree.
        use_model: Whether to start from a model's data config at all
            (``transform: none`` only resizes).
        input_size, mean, std, interpolation, crop_pct: Overrides.
    """

    use_model: bool = True
    from_model: int | None = None
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None


@dataclass(frozen=True)
class DataSpec:
    fusion: SourceSpec
    eval: SourceSpec | None = None
    transform: TransformSpec = TransformSpec()
    batch_size: int = 256
    workers: int = 0


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class OutputSpec:
    """Attributes:
    path: The model directory to write (created at the end, atomically).
    formats: ``safetensors`` (a timm model directory), ``torchscript``, ``export``.
    overwrite: Replace an existing ``path``.
    checkpoint: Also write an fxfuse checkpoint file here (``fxfuse fuse --out``).
    torchscript, export: Also write these files (``fxfuse fuse --torchscript / --export``).
    """

    path: str | None
    formats: tuple[str, ...] = ("safetensors",)
    overwrite: bool = False
    checkpoint: str | None = None
    torchscript: str | None = None
    export: str | None = None


@dataclass(frozen=True)
class ReportSpec:
    html: str | None = "report.html"
    json: str | None = "report.json"


@dataclass(frozen=True, eq=False)
class Recipe:
    """A validated fusion run: the single configuration of ``fxfuse run`` and ``fxfuse fuse``.

    ``text`` is the recipe as written (YAML), ``lines`` maps key paths to lines
    for later errors (e.g. a checkpoint that does not fit its model).
    """

    models: tuple[ModelSpec, ...]
    data: DataSpec
    method: MethodSpec
    output: OutputSpec
    seed: int = 0
    device: str = "auto"
    importance: str = "uniform"
    compare: tuple[MethodSpec, ...] = ()
    report: ReportSpec = ReportSpec()
    progress: bool = True
    text: str = ""
    lines: dict[str, int] = dataclasses.field(default_factory=dict)

    def error(self, path: str, message: str) -> RecipeError:
        """A :class:`RecipeError` at ``path`` (with its line when the recipe came from a file)."""
        return RecipeError(f"`{path}`: {message}", path, self.lines.get(path))

    def fuse_device(self) -> str | None:
        return None if self.device == "auto" else self.device

    def fuse_kwargs(self, method: MethodSpec | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`fxfuse.fuse` for ``method`` (default: the recipe's method)."""
        m = method or self.method
        return dict(method=m.name, importance=self.importance, device=self.fuse_device(), seed=self.seed,
                    progress=self.progress, **m.options)


# --- the schema ------------------------------------------------------------------------------------

_MODEL_KEYS = {"model": str, "checkpoint": str, "model_args": dict, "use_ema": bool, "name": str}
_SOURCE_KEYS = {"source": str, "path": str, "samples": int, "split": str, "resize": bool}
_TRANSFORM_KEYS = {"from_model": int, "input_size": list, "mean": list, "std": list, "interpolation": str,
                   "crop_pct": float}
_DATA_KEYS = {"fusion": dict, "eval": dict, "transform": (str, dict), "batch_size": int, "workers": int}
_METHOD_KEYS = {"name": str, "options": dict}
_OUTPUT_KEYS = {"path": str, "formats": list, "overwrite": bool, "checkpoint": str, "torchscript": str, "export": str}
_REPORT_KEYS = {"html": (str, type(None)), "json": (str, type(None))}
_TOP_KEYS = {"format": str, "seed": int, "device": str, "models": list, "data": dict, "method": (str, dict),
             "importance": str, "compare": list, "output": dict, "report": dict}
_REQUIRED = {"": ("format", "models", "data", "method", "output"), "data": ("fusion",), "source": ("source",),
             "method": ("name",)}


def _type_name(t: Any) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a mapping (key: value)", type(None): "null"}
    return " or ".join(names[x] for x in ts)


class _Checker:
    def __init__(self, lines: dict[str, int]):
        self.lines = lines

    def fail(self, path: str, message: str) -> RecipeError:
        return RecipeError(f"`{path}`: {message}" if path else message, path, self.lines.get(path))

    def mapping(self, value: Any, path: str, keys: dict[str, Any], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected {_type_name(dict)}, got {_show(value)}")
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if not isinstance(k, str) or k not in keys:
                close = difflib.get_close_matches(str(k), list(keys), n=1, cutoff=0.5)
                hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(keys)}"
                raise RecipeError(f"unknown key `{sub}`; {hint}", sub, self.lines.get(sub))
            self.typed(v, sub, keys[k])
        for k in required:
            if k not in value:
                raise self.fail(path, f"missing key `{k}`" + (f" (under `{path}`)" if path else ""))
        return value

    def typed(self, v: Any, path: str, t: Any) -> None:
        ts = t if isinstance(t, tuple) else (t,)
        ok = any(
            (isinstance(v, x) and not (x in (int, float) and isinstance(v, bool)))
            or (x is float and isinstance(v, int) and not isinstance(v, bool))
            for x in ts
        )
        if not ok:
            raise self.fail(path, f"expected {_type_name(t)}, got {_show(v)}")

    def choice(self, v: str, path: str, valid: tuple[str, ...] | list[str]) -> str:
        if v not in valid:
            close = difflib.get_close_matches(v, list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise self.fail(path, f"unknown value {v!r}{hint} Valid values: {', '.join(valid)}")
        return v

    def positive(self, v: int, path: str) -> int:
        if v < 1:
            raise self.fail(path, f"must be a positive integer, got {v}")
        return v


def _show(v: Any) -> str:
    return f"{type(v).__name__} {v!r}" if not isinstance(v, (dict, list)) else type(v).__name__


def _source(c: _Checker, v: Any, path: str, check_files: bool) -> SourceSpec:
    d = c.mapping(v, path, _SOURCE_KEYS, ("source",))
    src = c.choice(d["source"], f"{path}.source", SOURCES)
    p = d.get("path")
    if src == "digits":
        if p is not None:
            raise c.fail(f"{path}.path", "the digits are embedded; remove `path`")
    elif p is None:
        raise c.fail(path, f"source {src} needs `path` (a {'folder' if src == 'imagefolder' else 'file'})")
    elif check_files:
        if src == "imagefolder" and not os.path.isdir(p):
            raise c.fail(f"{path}.path", f"image folder {p!r} does not exist (relative paths start at {os.getcwd()})")
        if src == "tensors":
            if not os.path.isfile(p):
                raise c.fail(f"{path}.path", f"tensor file {p!r} does not exist (relative paths start at {os.getcwd()})")
            if not p.endswith((".pt", ".pth", ".safetensors")):
                raise c.fail(f"{path}.path", f"{p!r}: a tensor file is .pt, .pth or .safetensors")
    split = d.get("split", "all")
    if "split" in d:
        if src != "digits":
            raise c.fail(f"{path}.split", "only the digits have a built-in split; remove it")
        c.choice(split, f"{path}.split", DIGIT_SPLITS)
    samples = d.get("samples")
    if samples is not None:
        c.positive(samples, f"{path}.samples")
    if d.get("resize") and src != "tensors":
        raise c.fail(f"{path}.resize", f"only tensor files are resized on request ({src} always is); remove it")
    return SourceSpec(src, p, samples, split, d.get("resize", False))


def _transform(c: _Checker, v: Any, path: str, n_models: int) -> TransformSpec:
    if isinstance(v, str):
        c.choice(v, path, ("model", "none"))
        return TransformSpec(use_model=v == "model")
    d = c.mapping(v, path, _TRANSFORM_KEYS)
    fm = d.get("from_model")
    if fm is not None and not 0 <= fm < n_models:
        raise c.fail(f"{path}.from_model", f"is an index into `models` (0 to {n_models - 1}), got {fm}")
    size = d.get("input_size")
    if size is not None:
        if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise c.fail(f"{path}.input_size", f"must be three positive integers [C, H, W], got {size}")
        size = tuple(size)
    stats = {}
    for k in ("mean", "std"):
        val = d.get(k)
        if val is not None:
            if not val or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in val):
                raise c.fail(f"{path}.{k}", f"must be a list of numbers (one per channel), got {val}")
            if k == "std" and any(s <= 0 for s in val):
                raise c.fail(f"{path}.std", f"must be positive, got {val}")
            stats[k] = tuple(float(s) for s in val)
    interp = d.get("interpolation")
    if interp is not None:
        c.choice(interp, f"{path}.interpolation", ("bilinear", "bicubic", "nearest"))
    crop = d.get("crop_pct")
    if crop is not None and not 0 < crop <= 1:
        raise c.fail(f"{path}.crop_pct", f"must be in (0, 1], got {crop}")
    return TransformSpec(True, fm, size, stats.get("mean"), stats.get("std"), interp,
                         float(crop) if crop is not None else None)


def _method(c: _Checker, v: Any, path: str, *, seed: int, importance: str, device: str) -> MethodSpec:
    from ._config import make_config
    from ._methods import METHODS

    if isinstance(v, str):
        v = {"name": v}
        c.lines.setdefault(f"{path}.name", c.lines.get(path, 0))
    d = c.mapping(v, path, _METHOD_KEYS, ("name",))
    name = c.choice(d["name"], f"{path}.name", list(METHODS))
    options = dict(d.get("options") or {})
    try:  # fxfuse.fuse's own validation, before any work
        make_config(name, importance, "cpu", seed, False, **options)
    except (TypeError, ValueError) as e:
        bad = [k for k in options if k in str(e)]
        where = f"{path}.options.{bad[0]}" if bad else f"{path}.options" if options else f"{path}.name"
        raise c.fail(where, str(e)) from e
    if "target" in options:
        raise c.fail(f"{path}.options.target", "a target architecture cannot be given in a recipe; use the Python API")
    return MethodSpec(name, options)


def _model(c: _Checker, v: Any, path: str, check_files: bool) -> ModelSpec:
    if isinstance(v, str):
        v = {"model": v}
    d = c.mapping(v, path, _MODEL_KEYS)
    model, ckpt = d.get("model"), d.get("checkpoint")
    if model is None and ckpt is None:
        raise c.fail(path, "give `model` (a timm name or local-dir:PATH), `checkpoint`, or both")
    if model is not None and model.startswith("local-dir:"):
        folder = model[len("local-dir:"):]
        if ckpt is not None:
            raise c.fail(f"{path}.checkpoint", "a local-dir: model holds its own weights; remove `checkpoint`")
        if check_files and not os.path.isfile(os.path.join(folder, "config.json")):
            raise c.fail(f"{path}.model", f"{folder!r} is not a timm model directory (no config.json in it)")
    elif model is not None:
        from ._models import _timm

        timm = _timm()
        if not timm.is_model(model):
            close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(x) for x in close)}?" if close else "; see timm.list_models()"
            raise c.fail(f"{path}.model", f"unknown timm model {model!r}{hint}")
    if ckpt is not None and check_files and not os.path.isfile(ckpt):
        raise c.fail(f"{path}.checkpoint", f"checkpoint {ckpt!r} does not exist (relative paths start at {os.getcwd()})")
    if model is None and d.get("model_args"):
        raise c.fail(f"{path}.model_args", "model_args need `model` (an fxfuse checkpoint stores its own)")
    label = d.get("name") or os.path.basename((ckpt or (model or "").replace("local-dir:", "")).rstrip("/"))
    return ModelSpec(model, ckpt, dict(d.get("model_args") or {}), d.get("use_ema", True), label)


def _output(c: _Checker, v: Any, path: str, check_files: bool) -> OutputSpec:
    d = c.mapping(v, path, _OUTPUT_KEYS, ())
    out = d.get("path")
    formats = tuple(d.get("formats", ["safetensors"]))
    for i, f in enumerate(formats):
        c.typed(f, f"{path}.formats[{i}]", str)
        c.choice(f, f"{path}.formats[{i}]", OUTPUT_FORMATS)
    overwrite = d.get("overwrite", False)
    if out is None and d.get("checkpoint") is None:
        raise c.fail(path, "missing key `path` (the model directory to write)")
    if check_files:
        for key in ("path", "checkpoint", "torchscript", "export"):
            p = d.get(key)
            if p is None:
                continue
            parent = os.path.dirname(os.path.abspath(p))
            if not os.path.isdir(parent):
                raise c.fail(f"{path}.{key}", f"directory {parent!r} does not exist; create it first")
            if not os.access(parent, os.W_OK):
                raise c.fail(f"{path}.{key}", f"{parent!r} is not writable; choose another path")
        if out is not None and os.path.exists(out) and not overwrite:
            raise c.fail(f"{path}.path", f"{out!r} already exists; set `output.overwrite: true` "
                                             "(fxfuse run --overwrite) or choose another path")
    return OutputSpec(out, formats, overwrite, d.get("checkpoint"), d.get("torchscript"), d.get("export"))


def recipe_from_dict(
    d: Any, *, text: str = "", lines: dict[str, int] | None = None, check_files: bool = True, progress: bool = True
) -> Recipe:
    """Validate a recipe given as a dict (the parsed YAML) into a :class:`Recipe`.

    Args:
        d: The recipe's mapping.
        text: The YAML it came from, kept verbatim for the report.
        lines: Key path → line, for error messages.
        check_files: Check that input files exist and the output can be written.
        progress: Show progress bars and print tables.

    Raises:
        RecipeError: the first problem, with its key path, line and a fix.
    """
    from ._importance import IMPORTANCES

    c = _Checker(dict(lines or {}))
    d = c.mapping(d, "", _TOP_KEYS, _REQUIRED[""])
    if d["format"] != RECIPE_FORMAT:
        raise c.fail("format", f"this fxfuse reads {RECIPE_FORMAT!r}, got {d['format']!r}")
    seed = d.get("seed", 0)
    device = d.get("device", "auto")
    if device != "auto":
        from ._config import resolve_device

        try:
            resolve_device(device)
        except ValueError as e:
            raise c.fail("device", f"{e}; or use `auto`") from e
    importance = c.choice(d.get("importance", "uniform"), "importance", list(IMPORTANCES))
    models = d["models"]
    if len(models) < 2:
        raise c.fail("models", f"fusion needs two or more models, got {len(models)}")
    specs = tuple(_model(c, m, f"models[{i}]", check_files) for i, m in enumerate(models))
    data = c.mapping(d["data"], "data", _DATA_KEYS, _REQUIRED["data"])
    fusion = _source(c, data["fusion"], "data.fusion", check_files)
    ev = _source(c, data["eval"], "data.eval", check_files) if data.get("eval") is not None else None
    tf = _transform(c, data.get("transform", "model"), "data.transform", len(specs))
    bs = c.positive(data.get("batch_size", 256), "data.batch_size")
    workers = data.get("workers", 0)
    if workers < 0:
        raise c.fail("data.workers", f"must be >= 0, got {workers}")
    method = _method(c, d["method"], "method", seed=seed, importance=importance, device=device)
    compare = []
    for i, m in enumerate(d.get("compare", [])):
        spec = _method(c, m, f"compare[{i}]", seed=seed, importance=importance, device=device)
        compare.append(spec)
    out = _output(c, d["output"], "output", check_files)
    if out.path is not None:  # overwriting must never delete an input
        root = os.path.abspath(out.path)
        inputs = [(f"models[{i}]", m.checkpoint or (m.model or "").removeprefix("local-dir:")) for i, m in
                  enumerate(specs) if m.checkpoint or (m.model or "").startswith("local-dir:")]
        inputs += [(f"data.{k}.path", src.path) for k, src in (("fusion", fusion), ("eval", ev)) if src and src.path]
        for key, p in inputs:
            if os.path.commonpath([root, os.path.abspath(p)]) == root:
                raise c.fail("output.path", f"{out.path!r} contains the input `{key}` ({p!r}); writing there would "
                                            "replace it. Choose another output path")
    rep = c.mapping(d.get("report", {}), "report", _REPORT_KEYS)
    report = ReportSpec(rep.get("html", "report.html"), rep.get("json", "report.json"))
    for k, p in (("html", report.html), ("json", report.json)):
        if p is not None and (os.path.isabs(p) or ".." in p.split("/")):
            raise c.fail(f"report.{k}", f"{p!r}: report files go inside output.path; give a relative file name")
    return Recipe(specs, DataSpec(fusion, ev, tf, bs, workers), method, out, seed, device, importance,
                  tuple(compare), report, progress, text, c.lines)


def _line_map(text: str) -> dict[str, int]:
    """Key path → 1-based line of every key and list item of a YAML document."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                sub = f"{path}.{k.value}" if path else str(k.value)
                lines[sub] = k.start_mark.line + 1
                walk(v, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                sub = f"{path}[{i}]"
                lines[sub] = v.start_mark.line + 1
                walk(v, sub)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def parse_recipe(
    text: str, *, check_files: bool = True, progress: bool = True, overrides: dict[str, Any] | None = None
) -> Recipe:
    """Parse and validate a recipe from YAML text (see the module docstring).

    ``overrides`` maps dotted key paths (``"output.path"``) to values that replace the file's.
    """
    import yaml

    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise RecipeError(f"is not valid YAML: {getattr(e, 'problem', None) or e}", "", line) from e
    if d is None:
        raise RecipeError(f"is empty; a recipe starts with `format: {RECIPE_FORMAT}`")
    for key, value in (overrides or {}).items():
        node = d
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[last] = value
    return recipe_from_dict(d, text=text, lines=_line_map(text), check_files=check_files, progress=progress)


def load_recipe(
    path: str | os.PathLike, *, check_files: bool = True, progress: bool = True, overrides: dict[str, Any] | None = None
) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        RecipeError: the file is missing or invalid (the message names the key and line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RecipeError(f"file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return parse_recipe(text, check_files=check_files, progress=progress, overrides=overrides)
    except RecipeError as e:
        raise RecipeError(e.message, e.path, e.line, file=path) from None
