"""The paper's CIFAR VGG11, fused with 400 samples, side by side with the reference implementation.

    python benchmarks/vgg11.py [--seeds 1] [--first-seed 0] [--epochs 8] [--methods NAME[:OPTION=VALUE,…] …] [--device cpu]
    REF_DIR=/path/to/neuron-interpolation-model-fusion python benchmarks/vgg11.py

Two VGG11s (conv widths 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M, then one
Linear; no BatchNorm; biases: the "Model Fusion via Neuron Interpolation" paper's
CIFAR model) are trained on a non-IID 2-way Dirichlet split (appendix D.1) of the
digits upsampled to 3×32×32, then fused zero-shot with 400 samples of the first
model's split. The table gives test accuracy on a held-out quarter of the digits
and seconds per fusion.

If ``REF_DIR`` points to a checkout of the reference implementation
(github AndrewSpano/neuron-interpolation-model-fusion), the base models are built
from its ``models.vgg.VGG`` class (the same architecture), and its ``LSFusion``
(Hungarian and k-means, uniform scores) fuses the same model objects on the same
samples; the table then adds the speed ratio. Nothing of it is copied here: it is
imported from the path you give.

A method may carry options after a colon, ``name:option=value,option=value``; the
default rows are hf-linear and kf-linear with fxfuse's defaults (the paper's squared
pair cost, ridges by generalised cross-validation) and hf-linear with the reference's
two choices (``regularisation=pinv``: the minimum-norm pseudo-inverse solution at
``torch.linalg.pinv``'s default cut-off for float32 activations; ``hf_cost=distance``:
its unsquared pair cost).

Trained base models are cached in ``--cache`` (default ``.bench_cache/``) so that
runs with other fusion settings skip training.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import fxfuse
from fxfuse._train import BASE_TRAINING, accuracy, train_classifier
from fxfuse.data import dirichlet_split, load_digits, train_test_split

CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """The paper's CIFAR VGG11: 3×3 convs with bias and ReLU, max pooling, one Linear head; no BatchNorm."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


REFERENCE_CHOICES = "hf-linear:regularisation=pinv,hf_cost=distance"


def _method(text: str) -> tuple[str, dict[str, object]]:
    """``name:option=value,option=value`` as the method name and its fxfuse.fuse options."""
    name, _, opts = text.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--methods {text!r}: options are option=value, separated by commas")
        try:  # numbers and booleans as Python literals (n_init=20, held_out=0.1), anything else a string
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name, options


def _reference(ref_dir: str | None):
    if not ref_dir:
        return None
    sys.path.insert(0, ref_dir)
    from fusion_algorithms.hf_kf import LSFusion  # the user's checkout
    from models.vgg import VGG

    return LSFusion, VGG


def _build(ref, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if ref is None:
        return VGG11()
    return ref[1]("VGG11", 10, (3, 32, 32), batch_norm=False, use_bias=True)


def _setting(seed: int, epochs: int, ref, cache: str):
    x, y = load_digits(size=32, channels=3)
    tr, te = train_test_split(len(y), 0.25, seed=seed)
    parts = dirichlet_split(y[tr], 2, min_max_ratio=0.2, seed=seed)
    models = []
    for k, p in enumerate(parts):
        m = _build(ref, 1000 * seed + k)
        path = os.path.join(cache, f"vgg11-{'ref' if ref else 'plain'}-s{seed}-m{k}-e{epochs}.pt")
        if os.path.exists(path):
            m.load_state_dict(torch.load(path, weights_only=True))
            m.eval()
        else:
            t0 = time.perf_counter()
            train_classifier(m, x[tr][p], y[tr][p], BASE_TRAINING.replace(epochs=epochs, lr=1e-3, seed=seed + k))
            print(f"# trained model {k} of seed {seed} on {len(p)} digits in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            os.makedirs(cache, exist_ok=True)
            torch.save(m.state_dict(), path)
        models.append(m.eval())
    first = parts[0][torch.randperm(len(parts[0]), generator=torch.Generator().manual_seed(seed))[:400]]
    return models, (x[tr][first], y[tr][first]), (x[te], y[te])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed … first-seed + seeds − 1")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["hf-linear", "kf-linear", REFERENCE_CHOICES],
                    help="method names, each optionally with options: name:option=value,option=value")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=".bench_cache")
    ap.add_argument("--ref-kf", action="store_true", help="also run the reference's k-means fusion (slow)")
    ap.add_argument("--skip-ref", action="store_true", help="build the models from REF_DIR but do not run its fusion")
    args = ap.parse_args()
    ref = _reference(os.environ.get("REF_DIR"))
    dev = torch.device(args.device)
    rows: dict[str, list[tuple[float, float]]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        models, (xf, yf), (xt, yt) = _setting(seed, args.epochs, ref, args.cache)
        for k, m in enumerate(models):
            rows.setdefault(f"base model {k + 1}", []).append((accuracy(m, xt, yt), float("nan")))
        fxfuse.trace(models[0], xf[:1])  # warm-up: the first trace imports timm's registries (about 2 s), once per process
        for method in args.methods:
            name, options = _method(method)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fused = fxfuse.fuse(models, (xf, yf), method=name, device=dev, progress=False, seed=seed, **options)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            label = f"fxfuse {name}" + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")
            rows.setdefault(label, []).append((accuracy(fused.cpu(), xt, yt), secs))
            print(f"# seed {seed} {label}: {rows[label][-1][0]:.1f}% in {secs:.1f} s", flush=True)
        if ref is not None and not args.skip_ref:
            for how in ("hungarian", "k_means") if args.ref_kf else ("hungarian",):
                for m in models:
                    m.to(dev)
                t0 = time.perf_counter()
                fused = ref[0](models).fuse(xf.to(dev), yf.to(dev), fusion_method=how)
                secs = time.perf_counter() - t0
                label = f"reference LSFusion {'HF' if how == 'hungarian' else 'KF'}"
                rows.setdefault(label, []).append((accuracy(fused.cpu().eval(), xt, yt), secs))
                print(f"# seed {seed} {label}: {rows[label][-1][0]:.1f}% in {secs:.1f} s", flush=True)
                for m in models:
                    m.cpu()
    print(f"\nVGG11 (paper CIFAR variant, no BatchNorm) on 3x32x32 digits, 2-way Dirichlet split, 400 fusion samples, "
          f"{args.seeds} seed(s) from {args.first_seed}, device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    ref_secs = {k: statistics.mean(s for _, s in v) for k, v in rows.items() if k.startswith("reference")}
    print("| | test accuracy % | s per fusion | speed-up vs reference HF |")
    print("|---|---|---|---|")
    for label, vals in rows.items():
        accs = [a for a, _ in vals]
        secs = [s for _, s in vals if not math.isnan(s)]
        acc = f"{statistics.mean(accs):.1f}" + (f" ± {statistics.pstdev(accs):.1f}" if len(accs) > 1 else "")
        t = f"{statistics.mean(secs):.1f}" if secs else ""
        ratio = ""
        if secs and "reference LSFusion HF" in ref_secs:
            ratio = f"{ref_secs['reference LSFusion HF'] / statistics.mean(secs):.1f}x"
        print(f"| {label} | {acc} | {t} | {ratio} |")


if __name__ == "__main__":
    main()
