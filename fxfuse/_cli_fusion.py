"""The ``demo``, ``fuse`` and ``export`` subcommands."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

# (row label, method) of the demo table
DEMO_METHODS = (
    ("vanilla averaging", "vanilla"),
    ("ensemble (2x cost)", "ensemble"),
    ("git-rebasin", "git-rebasin"),
    ("np-merge", "np-merge"),
    ("hf-linear", "hf-linear"),
    ("kf-linear", "kf-linear"),
    ("kf-gradient", "kf-gradient"),
)


DEMO_RECIPE = """\
format: fxfuse-recipe/1
# written by `fxfuse demo`: the demo's two CNNs, fused with kf-linear and compared
seed: {seed}
device: auto
models:
  - {{model: "local-dir:{out}/bases/cnn_1", name: base model 1}}
  - {{model: "local-dir:{out}/bases/cnn_2", name: base model 2}}
data:
  fusion: {{source: tensors, path: {out}/data/fusion.safetensors}}   # 400 samples of the first model's split
  eval: {{source: tensors, path: {out}/data/test.safetensors}}       # the held-out quarter of the digits
  transform: model
method: {{name: kf-linear}}
compare: [{compare}]
output: {{path: {out}/fused_cnn, formats: [safetensors, torchscript], overwrite: true}}
report: {{html: report.html, json: report.json}}
"""


def write_demo_inputs(models, fusion, test, out: str, seed: int = 0) -> str:
    """Save the demo's CNNs as timm model directories and its data as tensor files; returns the recipe's path.

    The bases are 16×16 gray-digit ``test_resnet``s whose inputs are the raw digits
    (mean 0, std 1), so their ``config.json`` says so.
    """
    from safetensors.torch import save_file

    from ._run import save_timm_dir

    dc = {"input_size": (1, 16, 16), "interpolation": "bilinear", "mean": (0.0,), "std": (1.0,), "crop_pct": 1.0,
          "crop_mode": "center"}
    for k, m in enumerate(models):
        save_timm_dir(m, os.path.join(out, "bases", f"cnn_{k + 1}"), dc, {"num_classes": 10, "in_chans": 1},
                      tag="fxfuse_demo")
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    for name, (x, y) in (("fusion", fusion), ("test", test)):
        save_file({"inputs": x.contiguous(), "labels": y.contiguous()}, os.path.join(out, "data", f"{name}.safetensors"))
    compare = ", ".join(m for _, m in DEMO_METHODS if m != "kf-linear")
    path = os.path.join(out, "cnn_recipe.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(DEMO_RECIPE.format(seed=seed, out=out, compare=compare))
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    from fxfuse import fuse

    from ._experiments import make_setting
    from ._recipe import load_recipe
    from ._run import run
    from ._train import accuracy

    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    print("fxfuse demo: 2 MLPs and 2 timm CNNs (test_resnet) trained on a non-IID Dirichlet 2-way split "
          "of scikit-learn's digits (paper appendix D.1), fused zero-shot with 400 samples of the first split.")
    os.makedirs(args.out, exist_ok=True)
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    # MLPs: fused in memory
    t0 = time.perf_counter()
    s = make_setting("mlp", split="dirichlet", n_models=2, seed=args.seed)
    xt, yt = s.test
    print(f"  trained 2 MLPs on splits of {s.split_sizes[0]} and {s.split_sizes[1]} digits in "
          f"{time.perf_counter() - t0:.1f} s")
    for k, m in enumerate(s.models):
        rows.setdefault(f"base model {k + 1}", {})["mlp"] = (accuracy(m, xt, yt), float("nan"))
    for label, method in DEMO_METHODS:
        t0 = time.perf_counter()
        fused = fuse(s.models, s.fusion, method=method, progress=False, seed=args.seed)
        rows.setdefault(label, {})["mlp"] = (accuracy(fused, xt, yt), time.perf_counter() - t0)
    # CNNs: saved as timm model directories and fused by a recipe, which also writes the report
    t0 = time.perf_counter()
    s = make_setting("cnn", split="dirichlet", n_models=2, seed=args.seed)
    print(f"  trained 2 CNNs on splits of {s.split_sizes[0]} and {s.split_sizes[1]} digits in "
          f"{time.perf_counter() - t0:.1f} s")
    recipe_path = write_demo_inputs(s.models, s.fusion, s.test, args.out, args.seed)
    rec = run(load_recipe(recipe_path, progress=False))
    labels = {m: label for label, m in DEMO_METHODS}
    for r in rec.results:
        name = r["model"] if r["kind"] == "base" else labels.get(r["model"].removeprefix("fused (").rstrip(")"))
        rows.setdefault(name, {})["cnn"] = (r["accuracy"], r["seconds"] if r["seconds"] is not None else float("nan"))
    print()
    print(f"{'method':20s} {'MLP acc %':>10s} {'s':>6s} {'CNN acc %':>10s} {'s':>6s}")
    for name, r in rows.items():
        cells = []
        for arch in ("mlp", "cnn"):
            acc, secs = r[arch]
            cells.append(f"{acc:10.1f} {'' if secs != secs else f'{secs:.1f}':>6s}")
        print(f"{name:20s} " + " ".join(cells))
    out = rec.recipe.output.path
    print(f"\nThe CNN column comes from the recipe {recipe_path} (run it yourself: fxfuse run {recipe_path}).")
    print(f"wrote the kf-linear fused CNN to {out}/: a timm model directory "
          f"(timm.create_model('local-dir:{out}', pretrained=True)) and TorchScript (model.torchscript.pt)")
    print(f"report: {os.path.join(out, rec.recipe.report.html)}")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return 0


def fuse_recipe(args: argparse.Namespace):
    """The :class:`~fxfuse._recipe.Recipe` that ``fxfuse fuse``'s flags describe (one configuration, two views)."""
    from ._recipe import RECIPE_FORMAT, recipe_from_dict

    models = []
    for spec in args.models:
        if os.path.exists(spec):
            models.append({"checkpoint": spec})
        elif "=" in spec:
            arch, path = spec.split("=", 1)
            margs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
            if args.input_size is not None and args.in_chans is None:
                margs["in_chans"] = args.input_size[0]
            models.append({"model": arch, "checkpoint": path, "model_args": margs})
        else:
            raise ValueError(
                f"{spec!r} is neither a checkpoint path nor ARCH=WEIGHTS (e.g. resnet18=weights.pth); "
                "write checkpoints with fxfuse.save_checkpoint"
            )
    if args.data == "digits":
        fusion = {"source": "digits"}
    elif os.path.isdir(args.data):
        fusion = {"source": "imagefolder", "path": args.data}
    elif os.path.exists(args.data):
        fusion = {"source": "tensors", "path": args.data, "resize": args.resize}
    else:
        raise ValueError(f"--data {args.data!r}: not 'digits', an image folder, or a tensor file")
    fusion["samples"] = args.samples
    transform: Any = args.transform
    if args.input_size is not None:
        transform = {"input_size": list(args.input_size)} if args.transform == "model" else transform
    options = {k: v for k, v in (("objective", args.objective), ("match", args.match),
                                 ("importance_target", args.importance_target)) if v is not None}
    output = {k: v for k, v in (("checkpoint", args.out), ("torchscript", args.torchscript), ("export", args.export))
              if v is not None}
    d = {"format": RECIPE_FORMAT, "seed": args.seed, "device": args.device or "auto", "models": models,
         "data": {"fusion": fusion, "transform": transform}, "method": {"name": args.method, "options": options},
         "importance": args.importance, "output": output}
    return recipe_from_dict(d, progress=not args.quiet)


# recipe key paths and the `fxfuse fuse` flags they come from
_FLAGS = (("method.options.objective", "--objective"), ("method.options.match", "--match"),
          ("method.options.importance_target", "--importance-target"), ("method", "--method"),
          ("data.fusion", "--data"), ("data.transform", "--input-size"), ("output.checkpoint", "--out"),
          ("output.torchscript", "--torchscript"), ("output.export", "--export"), ("device", "--device"),
          ("importance", "--importance"))


def _as_flag(path: str) -> str:
    if path.startswith("models["):
        return f"MODEL {int(path[7:path.index(']')]) + 1}"
    return next((flag for key, flag in _FLAGS if path.startswith(key)), f"`{path}`")


def cmd_fuse(args: argparse.Namespace) -> int:
    from ._recipe import RecipeError
    from ._run import run

    try:
        recipe = fuse_recipe(args)  # validated, with every file checked, before any work
        rec = run(recipe)
    except RecipeError as e:  # the same checks as a recipe's, named by the flag
        raise ValueError(e.message.replace(f"`{e.path}`", _as_flag(e.path))) from e
    if recipe.output.checkpoint:
        print(f"wrote fused checkpoint {recipe.output.checkpoint} ({rec.models[0]['arch']})")
    for path in (recipe.output.torchscript, recipe.output.export):
        if path:
            print("wrote", path)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ._recipe import load_recipe
    from ._run import plan_text, run

    overrides: dict[str, Any] = {}
    if args.out is not None:
        overrides["output.path"] = args.out
    if args.overwrite:
        overrides["output.overwrite"] = True
    recipe = load_recipe(args.recipe, progress=not args.quiet, overrides=overrides)
    if args.dry_run:
        print(plan_text(recipe))
        return 0
    rec = run(recipe)
    out = recipe.output.path
    print(f"wrote {out}/: " + ", ".join(o["file"] for o in rec.outputs))
    if recipe.report.html:
        print(f"report: {os.path.join(out, recipe.report.html)}")
    for n in rec.notes:
        print(f"note: {n}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fxfuse import build_model, export, trace

    model, size = build_model(args.model, input_size=args.input_size, num_classes=args.num_classes)
    x = torch.randn(2, *size)
    path = export(trace(model, x), args.out, x, format=args.format)
    print(f"wrote {path} ({args.format})")
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def add_parsers(sub) -> None:
    from ._config import IMPORTANCE_TARGETS, MATCHES, OBJECTIVES
    from ._importance import IMPORTANCES
    from ._methods import METHODS

    # an ensemble keeps every model, so it is no checkpoint of one architecture
    fuse_methods = [m.name for m in METHODS.values() if m.one_model]
    d = sub.add_parser("demo", help="train, fuse and compare models on the embedded digits (about half a minute on CPU)",
                       description="Train 2 MLPs and 2 timm CNNs on a non-IID split of scikit-learn's digits, fuse "
                       "each pair with every method and print an accuracy table.")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="fxfuse-demo", metavar="DIR",
                   help="folder for the bases, the data, the recipe and the fused CNN with its report "
                   "(default fxfuse-demo)")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("fuse", help="fuse checkpoints into one model",
                       description="Fuse two or more models of one architecture. MODEL is an fxfuse checkpoint "
                       "or ARCH=WEIGHTS (a timm name and a state_dict file).")
    f.add_argument("models", nargs="+", metavar="MODEL")
    f.add_argument("--data", default="digits", help="'digits', an image folder, or a tensor file (default digits)")
    f.add_argument("--samples", type=_positive_int, default=400, help="fusion samples to use (default 400)")
    f.add_argument("--resize", action="store_true", help="resize a tensor file's inputs to the models' input size")
    f.add_argument("--transform", default="model", choices=["model", "none"],
                   help="image-folder preprocessing: timm's eval transform from the models' data config "
                   "(resize, crop, normalise; default) or none (resize only)")
    f.add_argument("--method", default="kf-linear", choices=fuse_methods, metavar="METHOD",
                   help="; ".join(f"{n}: {METHODS[n].summary}" for n in fuse_methods) + " (default kf-linear)")
    f.add_argument("--importance", default="uniform", choices=list(IMPORTANCES))
    f.add_argument("--importance-target", default=None, choices=list(IMPORTANCE_TARGETS),
                   help="the logit conductance and deeplift attribute: each model's own prediction (default, no "
                   "labels needed), the labels, or the ensemble's prediction")
    f.add_argument("--objective", default=None, choices=list(OBJECTIVES),
                   help="np-merge's loss: distill (KL to the ensemble's softmax, no labels; default) or ce (labels)")
    f.add_argument("--match", default=None, choices=list(MATCHES),
                   help="activation matching of git-rebasin, otfusion and np-merge: correlation (default) or inner")
    f.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    f.add_argument("--num-classes", type=int, default=None, help="classes of ARCH=WEIGHTS models")
    f.add_argument("--in-chans", type=int, default=None, help="input channels of ARCH=WEIGHTS models (e.g. 1)")
    f.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="input size of ARCH=WEIGHTS models (default: the model's)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default="fused.pt", help="fused fxfuse checkpoint (default fused.pt)")
    f.add_argument("--torchscript", default=None, metavar="FILE", help="also save as TorchScript")
    f.add_argument("--export", default=None, metavar="FILE", help="also save as a torch.export program")
    f.add_argument("--quiet", action="store_true", help="no progress bars or report")
    f.set_defaults(func=cmd_fuse)

    r = sub.add_parser("run", help="run a recipe file: fuse, compare, evaluate, write a model directory and a report",
                       description="Run a fusion recipe (YAML, format fxfuse-recipe/1): load the models and data, "
                       "fuse, evaluate beside the bases and the compare entries, and write a timm model directory "
                       "with a model card and an HTML/JSON report. See README.md, 'Recipes'.")
    r.add_argument("recipe", metavar="RECIPE.yaml")
    r.add_argument("--dry-run", action="store_true", help="validate and print the resolved plan; fuse nothing")
    r.add_argument("--out", default=None, metavar="DIR", help="model directory to write (overrides output.path)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    r.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("export", help="save a model as TorchScript or a torch.export program",
                       description="Trace MODEL (timm name or checkpoint) and save it; the saved model is "
                       "reloaded and checked against the original.")
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--format", default="torchscript", choices=["torchscript", "export"])
    e.add_argument("--out", required=True, metavar="FILE")
    e.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    e.add_argument("--num-classes", type=int, default=None)
    e.set_defaults(func=cmd_export)
