"""Closed form inside blocks vs the gradient fallback, on CNNs trained on the digits; prints markdown tables.

    python benchmarks/blocks.py [--seeds 3] [--small-arch test_resnet] [--methods hf-linear kf-linear]
                                [--blocks closed-form gradient] [--realistic] [--epochs 6]

Table 1: the demo's CNN (timm ``test_resnet``, 16×16 gray digits; ``--small-arch`` picks
another timm model, e.g. ``mobilenetv3_small_100`` or ``convnext_atto``, at ``--small-size``) on the non-IID
Dirichlet 2-way split, 400 fusion samples of the first model's split; hf-linear and
kf-linear with ``blocks="closed-form"`` (every residual and bottleneck level solved
op by op in closed form, fxfuse._blocks) and ``blocks="gradient"`` (the whole
level fitted by Adam, 100 epochs with early stopping: the previous behaviour).
Cells: test accuracy mean ± std over seeds (seconds per fusion).

Table 2 (``--realistic``): timm ``resnet18`` at its real widths (64–512 channels) on
32×32 gray digits, same split, fused zero-shot: bases, ensemble, vanilla,
git-rebasin, kf-linear (closed form), kf-linear (gradient blocks), kf-gradient.
The bases train for ``--epochs`` epochs (Adam, lr 3e-3).

Table 3 (``--starts``): where the gradient methods start: ``start="first"`` (the
first model's level weights) vs ``start="closed-form"`` (the linear solution, the
default), kf-gradient and hf-gradient, on the demo's CNN and the 64-256-256-10 MLP.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch

import fxfuse
from fxfuse._train import BASE_TRAINING, accuracy, train_classifier
from fxfuse.data import dirichlet_split, load_digits, train_test_split


def _cell(vals: list[float], secs: list[float] | None = None) -> str:
    mean = statistics.mean(vals)
    std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}" + (f" ({statistics.mean(secs):.1f} s)" if secs else "")


def _setting(arch: str, size: int, seed: int, epochs: int):
    x, y = load_digits(size=size)
    tr, te = train_test_split(len(y), 0.25, seed=seed)
    parts = dirichlet_split(y[tr], 2, min_max_ratio=0.2, seed=seed)
    models = []
    for k, p in enumerate(parts):
        torch.manual_seed(1000 * seed + k)
        m = timm.create_model(arch, pretrained=False, num_classes=10, in_chans=1)
        models.append(train_classifier(m, x[tr][p], y[tr][p], BASE_TRAINING.replace(epochs=epochs, seed=seed + k)))
    first = parts[0][torch.randperm(len(parts[0]), generator=torch.Generator().manual_seed(seed))[:400]]
    return models, (x[tr][first], y[tr][first]), (x[te], y[te])


def _run(rows, models, fusion, test, seed):
    out = {}
    for label, method, opts in rows:
        t0 = time.perf_counter()
        fused = fxfuse.fuse(models, fusion, method=method, progress=False, seed=seed, **opts)
        out[label] = (accuracy(fused, *test), time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--realistic", action="store_true", help="also table 2: resnet18 at real widths")
    p.add_argument("--realistic-seeds", type=int, default=1)
    p.add_argument("--arch", default="resnet18", help="timm model of table 2 (default resnet18)")
    p.add_argument("--epochs", type=int, default=6, help="base training epochs of table 2")
    p.add_argument("--skip-small", action="store_true", help="skip table 1")
    p.add_argument("--small-arch", default="test_resnet", help="timm model of table 1 (default test_resnet)")
    p.add_argument("--small-size", type=int, default=16, help="image size of table 1 (default 16)")
    p.add_argument("--small-epochs", type=int, default=15, help="base training epochs of table 1 (default 15)")
    p.add_argument("--starts", action="store_true", help="also table 3: where the gradient methods start")
    p.add_argument("--methods", nargs="+", default=["hf-linear", "kf-linear"], choices=["hf-linear", "kf-linear"],
                   help="table 1's methods (default both)")
    p.add_argument("--blocks", nargs="+", default=["closed-form", "gradient"], choices=["closed-form", "gradient"],
                   help="table 1's block solvers (default both; e.g. --blocks closed-form to re-time only it)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    if not args.skip_small:
        rows = [(f"{m} ({b})", m, {"blocks": b}) for m in args.methods for b in args.blocks]
        res: dict[str, tuple[list[float], list[float]]] = {}
        bases: list[list[float]] = [[], []]
        for seed in range(args.seeds):
            models, fusion, test = _setting(args.small_arch, args.small_size, seed, args.small_epochs)
            for k, acc in enumerate(sorted((accuracy(m, *test) for m in models), reverse=True)):
                bases[k].append(acc)
            for label, (acc, secs) in _run(rows, models, fusion, test, seed).items():
                res.setdefault(label, ([], []))[0].append(acc)
                res[label][1].append(secs)
            print(f"  seed {seed} done", flush=True)
        print(f"\n| {args.small_arch}, {args.small_size}×{args.small_size} digits, Dirichlet 2-way | accuracy % (s) |"
              "\n|---|---|")
        for k in range(2):
            print(f"| base model {k + 1} | {_cell(bases[k])} |")
        for label, (accs, secs) in res.items():
            print(f"| {label} | {_cell(accs, secs)} |")

    if args.realistic:
        rows = [("ensemble", "ensemble", {}), ("vanilla", "vanilla", {}), ("git-rebasin", "git-rebasin", {}),
                ("kf-linear (closed-form blocks)", "kf-linear", {}),
                ("kf-linear (gradient blocks)", "kf-linear", {"blocks": "gradient"}),
                ("kf-gradient", "kf-gradient", {})]
        res = {}
        bases = [[], []]
        train_s = []
        for seed in range(args.realistic_seeds):
            t0 = time.perf_counter()
            models, fusion, test = _setting(args.arch, 32, seed, args.epochs)
            train_s.append(time.perf_counter() - t0)
            for k, acc in enumerate(sorted((accuracy(m, *test) for m in models), reverse=True)):
                bases[k].append(acc)
            for label, (acc, secs) in _run(rows, models, fusion, test, seed).items():
                res.setdefault(label, ([], []))[0].append(acc)
                res[label][1].append(secs)
                print(f"  seed {seed} {label}: {acc:.1f} ({secs:.1f} s)", flush=True)
        n = sum(p.numel() for p in models[0].parameters())
        print(f"\n| {args.arch} ({n / 1e6:.1f} M parameters), 32×32 digits, Dirichlet 2-way, bases trained "
              f"{args.epochs} epochs ({statistics.mean(train_s):.0f} s for both) | accuracy % (s) |\n|---|---|")
        for k in range(2):
            print(f"| base model {k + 1} | {_cell(bases[k])} |")
        for label, (accs, secs) in res.items():
            print(f"| {label} | {_cell(accs, secs)} |")

    if args.starts:
        from fxfuse._experiments import make_setting

        print("\n| start of the gradient fit | CNN (test_resnet) | MLP 64-256-256-10 |\n|---|---|---|")
        cells: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        for arch in ("cnn", "mlp256"):
            for seed in range(args.seeds):
                s = make_setting(arch, split="dirichlet", n_models=2, seed=seed)
                rows = [(f"{m}, start={st}", m, {"start": st}) for m in ("kf-gradient", "hf-gradient")
                        for st in ("first", "closed-form")]
                for label, (acc, secs) in _run(rows, s.models, s.fusion, s.test, seed).items():
                    accs, ss = cells.setdefault(label, {}).setdefault(arch, ([], []))
                    accs.append(acc)
                    ss.append(secs)
        for label, by in cells.items():
            print(f"| {label} | {_cell(*by['cnn'])} | {_cell(*by['mlp256'])} |")


if __name__ == "__main__":
    main()
