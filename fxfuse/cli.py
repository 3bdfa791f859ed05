"""The ``fxfuse`` command line.

Subcommands:
    demo           Train, fuse and compare models on the embedded digits.
    fuse MODEL...  Fuse checkpoints into one model.
    export MODEL   Save a model as TorchScript or a torch.export program.
    levels MODEL   Trace a timm model (or an fxfuse checkpoint), print its level table
                   and write a dump (.html, .txt, .dot or .svg).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from ._errors import FxFuseError

__all__ = ["main"]


def _cmd_levels(args: argparse.Namespace) -> int:
    import torch

    from fxfuse import build_model, trace
    from fxfuse.passes import partition_levels

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
        "MODEL is a timm model name (built with pretrained=False) or an fxfuse checkpoint path.",
    )
    lv.add_argument("model", metavar="MODEL", help="timm model name (e.g. resnet18) or checkpoint path")
    lv.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                    help="input size; defaults to the model's configured size (e.g. 3 224 224)")
    lv.add_argument("--num-classes", type=int, default=None, help="number of classes of a model built by name")
    lv.add_argument("--batch-size", type=int, default=1, help="batch of the random example input (default 1)")
    lv.add_argument("--out", default=None, metavar="FILE",
                    help="dump to write: .html (default MODEL.levels.html), .txt, .dot or .svg (needs Graphviz)")
    lv.set_defaults(func=_cmd_levels)
    from ._cli_fusion import add_parsers

    add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxfuse`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
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
