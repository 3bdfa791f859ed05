"""Does every model of the README's timm zoo fuse? A smoke sweep that prints a table.

    python benchmarks/zoo_sweep.py [--models resnet18 swin_tiny_patch4_window7_224 ...]
                                   [--runs hf-linear:uniform kf-linear:deeplift kf-gradient:conductance]
                                   [--samples 24] [--epochs 1]

For each model, two instances of seeds 0 and 1 (``pretrained=False``, 5 classes, ``img_size`` set for the
transformers and MLP-Mixers; 32 px, 64 for mobilevit) are fused on random inputs with each METHOD:IMPORTANCE
of ``--runs`` (gradient fits with ``--epochs`` epochs: this checks that fusion runs, not how well). A row gives
how many levels were solved in closed form, the seconds, and whether the fused model's outputs are finite, or
the error a fusion raised (the sweep goes on). It found that every Swin fusion failed once the engine's copies
became channels-last (a traced 5-d constant).
"""

from __future__ import annotations

import argparse
import time
import warnings

import timm
import torch

import fxfuse

ZOO = ("resnet18", "resnet34", "resnet50", "resnet10t", "vgg11", "vgg16", "vit_tiny_patch16_224",
       "deit_tiny_patch16_224", "convnext_atto", "swin_tiny_patch4_window7_224", "efficientnet_b0",
       "mobilenetv3_small_100", "regnetx_002", "densenet121", "mixer_s16_224", "poolformer_s12", "ghostnet_100",
       "levit_128s", "mobilevit_xxs")
SIZED = ("vit", "deit", "swin", "levit", "mixer", "resmlp", "gmixer")  # built for the input size they are fed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(ZOO))
    ap.add_argument("--runs", nargs="+", default=["hf-linear:uniform", "kf-linear:deeplift", "kf-gradient:conductance"],
                    help="METHOD:IMPORTANCE pairs")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows, failed = [], 0
    for name in args.models:
        size = 64 if name.startswith("mobilevit") else 32
        kw = {"img_size": size} if name.startswith(SIZED) else {}
        torch.manual_seed(0)
        a = timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()
        torch.manual_seed(1)
        b = timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()
        x = torch.randn(args.samples, 3, size, size, generator=torch.Generator().manual_seed(0))
        for run in args.runs:
            method, _, importance = run.partition(":")
            t0 = time.perf_counter()
            try:
                fused = fxfuse.fuse([a, b], x, method=method, importance=importance or "uniform", progress=False,
                                    epochs=args.epochs)
                with torch.no_grad():
                    finite = bool(torch.isfinite(fused(x[:4])).all())
                levels = fused.meta["fxfuse"]["levels"]
                closed = sum(r["approximation"].startswith("closed form") for r in levels)
                rows.append((name, run, f"{closed}/{len(levels)}", f"{time.perf_counter() - t0:.1f}",
                             "yes" if finite else "**no**"))
                failed += not finite
            except Exception as e:  # a sweep: report and go on
                rows.append((name, run, "", f"{time.perf_counter() - t0:.1f}",
                             f"**{type(e).__name__}**: {str(e)[:120]}"))
                failed += 1
            print(f"# {' '.join(rows[-1])}", flush=True)
    print(f"\ntimm zoo sweep: {args.samples} random inputs, seeds 0 and 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | method:importance | levels in closed form | s | finite outputs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(rows) - failed} of {len(rows)} fusions ran with finite outputs")


if __name__ == "__main__":
    main()
