"""The ``demo``, ``fuse`` and ``export`` subcommands."""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from ._errors import FxFuseError

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


def cmd_demo(args: argparse.Namespace) -> int:
    from fxfuse import export, fuse
    from fxfuse._experiments import make_setting
    from fxfuse._methods import get_method
    from fxfuse._train import accuracy

    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    print("fxfuse demo: 2 MLPs and 2 timm CNNs (test_resnet) trained on a non-IID Dirichlet 2-way split "
          "of scikit-learn's digits (paper appendix D.1), fused zero-shot with 400 samples of the first split.")
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    fused_cnn = None
    for arch in ("mlp", "cnn"):
        t0 = time.perf_counter()
        s = make_setting(arch, split="dirichlet", n_models=2, seed=args.seed)
        xt, yt = s.test
        train_s = time.perf_counter() - t0
        print(f"  trained 2 {arch.upper()}s on splits of {s.split_sizes[0]} and {s.split_sizes[1]} digits in {train_s:.1f} s")
        for k, m in enumerate(s.models):
            rows.setdefault(f"base model {k + 1}", {})[arch] = (accuracy(m, xt, yt), float("nan"))
        for label, method in DEMO_METHODS:
            get_method(method)
            t0 = time.perf_counter()
            fused = fuse(s.models, s.fusion, method=method, progress=False, seed=args.seed)
            rows.setdefault(label, {})[arch] = (accuracy(fused, xt, yt), time.perf_counter() - t0)
            if arch == "cnn" and method == "kf-linear":
                fused_cnn = (fused, xt[:4])
    print()
    print(f"{'method':20s} {'MLP acc %':>10s} {'s':>6s} {'CNN acc %':>10s} {'s':>6s}")
    for name, r in rows.items():
        cells = []
        for arch in ("mlp", "cnn"):
            acc, secs = r[arch]
            cells.append(f"{acc:10.1f} {'' if secs != secs else f'{secs:.1f}':>6s}")
        print(f"{name:20s} " + " ".join(cells))
    fused, example = fused_cnn
    path = export(fused, args.out, example, format="torchscript")
    print(f"\nwrote the kf-linear fused CNN as TorchScript to {path} (load it with torch.jit.load)")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return 0


def _load_model(spec: str, args: argparse.Namespace) -> tuple[nn.Module, tuple[int, int, int], str, dict, bool]:
    """A checkpoint path, or ARCH=STATE_DICT_PATH for a timm architecture with raw weights.

    Returns the model, its input size, arch, model kwargs, and whether the size is
    known (a checkpoint's, or --input-size) rather than timm's default.
    """
    from fxfuse._models import _check_input_size, _create_timm, default_input_size, load_plain, read_checkpoint

    if os.path.exists(spec):
        return (*read_checkpoint(spec), True)
    if "=" in spec:
        arch, path = spec.split("=", 1)
        kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
        size = _check_input_size(args.input_size)
        if size is not None and args.in_chans is None:
            kwargs["in_chans"] = size[0]
        model = _create_timm(arch, size, kwargs)
        state = load_plain(path, f"{spec!r}: weights file")
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(f"{spec!r}: the weights do not fit timm's {arch!r} ({e}); pass --num-classes, "
                             "--in-chans or --input-size as the model was built") from e
        known = size is not None
        if size is None:
            size = default_input_size(model)
            size = (kwargs.get("in_chans", size[0]), *size[1:])
        return model.eval(), size, arch, kwargs, known
    raise ValueError(
        f"{spec!r} is neither a checkpoint path nor ARCH=WEIGHTS (e.g. resnet18=weights.pth); "
        "write checkpoints with fxfuse.save_checkpoint"
    )


def _load_data(spec: str, size: tuple[int, int, int], n: int, seed: int, resize: bool, known: bool = True):
    from fxfuse._models import load_plain
    from fxfuse.data import load_digits

    c, h, w = size
    if spec == "digits":
        if h != w:
            raise ValueError(f"--data digits needs a square input size, the models take {size}")
        x, y = load_digits(size=h, channels=c)
        if h != 8:
            print(f"resizing the digits from 8x8 to {h}x{w} (bilinear) for the models' input size")
    elif os.path.isdir(spec):
        from torchvision import datasets, transforms

        tf = transforms.Compose([
            transforms.Grayscale(c) if c == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize((h, w)),
            transforms.ToTensor(),
        ])
        ds = datasets.ImageFolder(spec, transform=tf)
        if len(ds) == 0:
            raise ValueError(f"image folder {spec!r} holds no images")
        print(f"reading {len(ds)} images from {spec!r}, resized to {h}x{w} (bilinear)")
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor(ds.targets)
    elif os.path.exists(spec):
        obj = load_plain(spec, "--data tensor file")
        if isinstance(obj, torch.Tensor):
            x, y = obj, None
        elif isinstance(obj, (tuple, list)) and len(obj) == 2:
            x, y = obj
        elif isinstance(obj, dict) and "inputs" in obj:
            x, y = obj["inputs"], obj.get("labels")
        else:
            raise ValueError(f"{spec!r}: expected a Tensor, an (inputs, labels) pair or a dict with 'inputs'")
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"--data {spec!r}: inputs must be a Tensor of shape (n, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if tuple(x.shape[1:]) != size and not known and x.shape[1] == c:
            print(f"using the data's own size {x.shape[2]}x{x.shape[3]} (the models' input size is not recorded)")
        elif tuple(x.shape[1:]) != size:
            if not resize or x.shape[1] != c:
                raise ValueError(
                    f"--data {spec!r}: inputs of shape {tuple(x.shape[1:])} but the models take {size}; "
                    + ("pass --resize to resize them (bilinear)" if x.shape[1] == c else "the channels differ")
                )
            print(f"resizing the inputs from {x.shape[2]}x{x.shape[3]} to {h}x{w} (bilinear, --resize)")
            x = torch.nn.functional.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"--data {spec!r}: not 'digits', an image folder, or a tensor file")
    if x.shape[0] > n:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        x, y = x[idx], (y[idx] if y is not None else None)
    return (x, y) if y is not None else x


def _check_writable(path: str | None, flag: str) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path!r} is not writable; choose another path")


def cmd_fuse(args: argparse.Namespace) -> int:
    from fxfuse import export, fuse, save_checkpoint
    from fxfuse._models import _create_timm

    for path, flag in ((args.out, "--out"), (args.torchscript, "--torchscript"), (args.export, "--export")):
        _check_writable(path, flag)  # before any work, not after the fusion
    loaded = [_load_model(spec, args) for spec in args.models]
    models = [m for m, *_ in loaded]
    size = loaded[0][1]
    data = _load_data(args.data, size, args.samples, args.seed, args.resize, known=all(ld[4] for ld in loaded))
    from ._methods import METHODS

    spec = METHODS[args.method]
    opts = {"objective": args.objective} if args.objective is not None and spec.uses_objective else {}
    if args.match is not None and spec.uses_match:
        opts["match"] = args.match
    for flag, value, used in (("--objective", args.objective, spec.uses_objective),
                              ("--match", args.match, spec.uses_match)):
        if value is not None and not used:
            raise ValueError(f"{flag} does not apply to --method {args.method}; remove it")
    fused = fuse(models, data, method=args.method, importance=args.importance, device=args.device,
                 seed=args.seed, progress=not args.quiet, **opts)
    example = (data[0] if isinstance(data, tuple) else data)[:2].to(next(fused.parameters()).device)
    arch, kwargs = loaded[0][2], loaded[0][3]
    size = tuple((data[0] if isinstance(data, tuple) else data).shape[1:])
    rebuilt = _create_timm(arch, size, kwargs)
    try:
        rebuilt.load_state_dict({k: v.cpu() for k, v in fused.state_dict().items()})
    except RuntimeError as e:
        raise FxFuseError(
            f"the fused model's parameters do not map back onto timm's {arch!r} ({e}); "
            "save it with --torchscript or --export instead"
        ) from e
    save_checkpoint(rebuilt, args.out, arch, input_size=size, **kwargs)
    print(f"wrote fused checkpoint {args.out} ({arch})")
    if args.torchscript:
        print("wrote", export(fused, args.torchscript, example, format="torchscript"))
    if args.export:
        print("wrote", export(fused, args.export, example, format="export"))
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
    from ._config import MATCHES, OBJECTIVES
    from ._importance import IMPORTANCES
    from ._methods import METHODS

    # an ensemble keeps every model, so it is no checkpoint of one architecture
    fuse_methods = [m.name for m in METHODS.values() if m.one_model]
    d = sub.add_parser("demo", help="train, fuse and compare models on the embedded digits (about a minute on CPU)",
                       description="Train 2 MLPs and 2 timm CNNs on a non-IID split of scikit-learn's digits, fuse "
                       "each pair with every method and print an accuracy table.")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="fused_cnn.pt", help="TorchScript file for the fused CNN (default fused_cnn.pt)")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("fuse", help="fuse checkpoints into one model",
                       description="Fuse two or more models of one architecture. MODEL is an fxfuse checkpoint "
                       "or ARCH=WEIGHTS (a timm name and a state_dict file).")
    f.add_argument("models", nargs="+", metavar="MODEL")
    f.add_argument("--data", default="digits", help="'digits', an image folder, or a tensor file (default digits)")
    f.add_argument("--samples", type=_positive_int, default=400, help="fusion samples to use (default 400)")
    f.add_argument("--resize", action="store_true", help="resize a tensor file's inputs to the models' input size")
    f.add_argument("--method", default="kf-linear", choices=fuse_methods, metavar="METHOD",
                   help="; ".join(f"{n}: {METHODS[n].summary}" for n in fuse_methods) + " (default kf-linear)")
    f.add_argument("--importance", default="uniform", choices=list(IMPORTANCES))
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

    e = sub.add_parser("export", help="save a model as TorchScript or a torch.export program",
                       description="Trace MODEL (timm name or checkpoint) and save it; the saved model is "
                       "reloaded and checked against the original.")
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--format", default="torchscript", choices=["torchscript", "export"])
    e.add_argument("--out", required=True, metavar="FILE")
    e.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    e.add_argument("--num-classes", type=int, default=None)
    e.set_defaults(func=cmd_export)
