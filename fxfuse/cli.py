"""The ``fxfuse`` command line.

Subcommands:
    demo           Train, fuse and compare models on the embedded digits.
    fuse MODEL...  Fuse checkpoints into one model.
    export MODEL   Save a model as TorchScript or a torch.export program.
    levels MODEL   Trace a timm model (or an fxfuse checkpoint), print its level table
                   and write a dump (.html, .txt, .dot or .svg). With several models:
                   their depth alignment side by side (and an HTML page of it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from ._errors import FxFuseError

__all__ = ["main"]


def _alignment_inputs(args: argparse.Namespace, size: tuple[int, ...]):
    import torch

    if args.data == "random":
        return torch.randn(args.samples, *size, generator=torch.Generator().manual_seed(0))
    from torch.nn import functional as F

    from .data import load_digits

    x, _ = load_digits(size=8)
    x = x[: args.samples]
    if tuple(x.shape[2:]) != tuple(size[1:]):
        x = F.interpolate(x, size=tuple(size[1:]), mode="bilinear", align_corners=False)
    return x.repeat(1, size[0], 1, 1) if size[0] != 1 else x


def _cmd_alignment(args: argparse.Namespace) -> int:
    """``fxfuse levels A B ...``: the depth alignment of several models, side by side."""
    import torch

    from fxfuse import build_model, trace

    from ._config import make_config
    from ._collect import FusionData
    from ._engine import Prepared, level_features
    from ._trace import out_of_place
    from .passes import align_depth, partition_levels
    from .passes._render import alignment_html

    out = args.out or "alignment.html"
    if not out.endswith(".html"):  # checked before any work
        raise ValueError(f"an alignment is written as .html, got --out {out}")
    t0 = time.perf_counter()
    built = [build_model(m, input_size=args.input_size, num_classes=args.num_classes) for m in args.model]
    sizes = {tuple(s) for _, s in built}
    if len(sizes) > 1:
        raise ValueError(f"the models expect different input sizes {sorted(sizes)}; pass --input-size C H W")
    size = next(iter(sizes))
    x = _alignment_inputs(args, size)
    gms = [out_of_place(trace(m, x[:1])) for m, _ in built]
    plans = [partition_levels(g) for g in gms]
    cfg = make_config("kf-linear", device="cpu", progress=False, cla_samples=args.samples, batch_size=32)
    prep = Prepared(gms, FusionData(x), plans, None, torch.float32, {})
    al = align_depth(plans, level_features(prep, cfg))
    names = [os.path.basename(os.fspath(m)) for m in args.model]
    print(f"depth alignment of {', '.join(f'{n} ({len(p)} levels)' for n, p in zip(names, plans))} on {x.shape[0]} "
          f"{args.data} inputs of size {tuple(size)} ({time.perf_counter() - t0:.1f} s); target: {names[al.target]}")
    print(al.table(names, plans))
    for k, ins in enumerate(al.insertions):
        if ins:
            print(f"{names[k]}: an identity level after its level(s) {', '.join(str(a) for a, _ in ins)}")
    with open(out, "w", encoding="utf-8") as f:
        f.write(alignment_html(al, plans, names))
    print(f"wrote {out}")
    return 0


def _cmd_levels(args: argparse.Namespace) -> int:
    import torch

    from fxfuse import build_model, trace
    from fxfuse.passes import partition_levels

    if len(args.model) > 1:
        return _cmd_alignment(args)
    args.model = args.model[0]
    t0 = time.perf_counter()
    model, size = build_model(args.model, input_size=args.input_size, num_classes=args.num_classes)
    x = torch.randn(args.batch_size, *size)
    plan = partition_levels(trace(model, x))
    secs = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {len(plan)} levels, {n_params:,} parameters, input {tuple(x.shape)} ({secs:.1f} s)")
    print(plan.dump())
    out = args.out
    if out is None:
        stem = os.path.splitext(os.path.basename(os.fspath(args.model)))[0] if os.path.exists(args.model) else args.model
        out = f"{stem}.levels.html"
    path = plan.save(out)
    print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from fxfuse import __version__

    p = argparse.ArgumentParser(prog="fxfuse", description="Fuse trained neural networks level by level.")
    p.add_argument("--version", action="version", version=f"fxfuse {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    lv = sub.add_parser(
        "levels",
        help="show how fxfuse cuts a model into levels",
        description="Trace MODEL, print its level table and write a dump of the partition. "
        "MODEL is a timm model name (built with pretrained=False) or an fxfuse checkpoint path. With two or more "
        "models, print how their levels align (cross-layer alignment, as fxfuse.fuse does for models of "
        "different depth) and write it as an HTML page.",
    )
    lv.add_argument("model", metavar="MODEL", nargs="+",
                    help="timm model name (e.g. resnet18) or checkpoint path; several to align them")
    lv.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                    help="input size; defaults to the model's configured size (e.g. 3 224 224)")
    lv.add_argument("--num-classes", type=int, default=None, help="number of classes of a model built by name")
    lv.add_argument("--batch-size", type=int, default=1, help="batch of the random example input (default 1)")
    lv.add_argument("--out", default=None, metavar="FILE",
                    help="dump to write: .html (default MODEL.levels.html), .txt, .dot or .svg (needs Graphviz); "
                    "several models: .html (default alignment.html)")
    lv.add_argument("--data", choices=("random", "digits"), default="random",
                    help="several models: inputs the alignment compares level outputs on (default random normal; "
                    "digits: the embedded digits, resized)")
    lv.add_argument("--samples", type=int, default=128, help="several models: number of inputs (default 128)")
    lv.set_defaults(func=_cmd_levels)
    from ._cli_fusion import add_parsers

    add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxfuse`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("fuse", "run"):
            from ._dist import init_from_env

            init_from_env()  # under torchrun: join its process group (gloo on CPU, NCCL on GPUs)
        rc = args.func(args)
        if args.command in ("fuse", "run") and rc == 0:
            from ._dist import shutdown

            shutdown()
        return rc
    except (ValueError, TypeError) as e:
        print(f"fxfuse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FxFuseError as e:
        print(f"fxfuse {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a command-line user gets one line, not a traceback
        print(f"fxfuse {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
