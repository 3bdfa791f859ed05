"""NP Merge and the permutation baselines when the fusion data is one party's skewed sample.

    python benchmarks/skewed_merge.py [--arch mlp256 mlp cnn] [--seeds 3] [--alpha-min 0.1] [--samples 400]

Two base models are trained on a Dirichlet non-IID split of the digits (appendix
D.1) whose smallest concentration is ``--alpha-min`` (0.1: the parts miss whole
classes); fusion uses ``--samples`` samples of the *first* model's part only, so
the fusion labels are skewed as well. Rows: the bases, the ensemble, vanilla
averaging, git-rebasin with correlation and inner-product matching, and np-merge
with the label-free distillation objective (default) and the paper's
cross-entropy, each with both matching costs; then hf-linear and kf-linear with uniform scores and with
conductance attributed to each model's own prediction (``importance_target="own"``, the default) and to the
skewed labels (``"labels"``). Cells are test accuracy (%) mean ±
std over seeds; the last column is the test accuracy on the classes absent from
the fusion labels (bases: each model's own).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch

import fxfuse
from fxfuse._experiments import make_setting
from fxfuse._train import accuracy

ROWS = (
    ("ensemble", "ensemble", {}),
    ("vanilla", "vanilla", {}),
    ("git-rebasin (correlation)", "git-rebasin", {"match": "correlation"}),
    ("git-rebasin (inner)", "git-rebasin", {"match": "inner"}),
    ("np-merge distill (correlation; default)", "np-merge", {"objective": "distill", "match": "correlation"}),
    ("np-merge distill (inner)", "np-merge", {"objective": "distill", "match": "inner"}),
    ("np-merge ce (correlation)", "np-merge", {"objective": "ce", "match": "correlation"}),
    ("np-merge ce (inner; the paper, before this change)", "np-merge", {"objective": "ce", "match": "inner"}),
    *((f"{m} ({label})", m, opts) for m in ("hf-linear", "kf-linear") for label, opts in (
        ("uniform", {}),
        ("conductance, own prediction; default target", {"importance": "conductance"}),
        ("conductance, labels", {"importance": "conductance", "importance_target": "labels"}))),
)


def _acc(model, x, y, classes=None) -> float:
    """Test accuracy %, on the samples of ``classes`` only when given (nan if there are none)."""
    keep = torch.ones_like(y, dtype=torch.bool) if classes is None else torch.isin(y, classes)
    return accuracy(model, x[keep], y[keep]) if bool(keep.any()) else float("nan")


def _fmt(vals: list[float]) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return "n/a"
    return f"{statistics.mean(vals):.1f} ± {statistics.pstdev(vals) if len(vals) > 1 else 0.0:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["mlp256"], choices=["mlp", "mlp256", "cnn"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--alpha-min", type=float, default=0.1)
    ap.add_argument("--samples", type=int, default=400)
    args = ap.parse_args()
    for arch in args.arch:
        cells: dict[str, list[tuple[float, float]]] = {}
        secs: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            s = make_setting(arch, split="dirichlet", n_models=2, seed=seed, n_fusion=args.samples,
                             alpha_min=args.alpha_min)
            (xf, yf), (xt, yt) = s.fusion, s.test
            counts = torch.bincount(yf, minlength=10)
            absent = torch.nonzero(counts == 0).flatten()
            print(f"{arch} seed {seed}: fusion label counts {counts.tolist()} (absent {absent.tolist()}), "
                  f"parts {s.split_sizes}")
            for k, m in enumerate(s.models):
                cells.setdefault(f"base model {k + 1}", []).append((_acc(m, xt, yt), _acc(m, xt, yt, absent)))
            for label, method, opts in ROWS:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fused = fxfuse.fuse(s.models, (xf, yf), method=method, progress=False, seed=seed, **opts)
                secs.setdefault(label, []).append(time.perf_counter() - t0)
                cells.setdefault(label, []).append((_acc(fused, xt, yt), _acc(fused, xt, yt, absent)))
        print(f"\n{arch.upper()}, 2-way Dirichlet split (alpha_min {args.alpha_min}), {args.samples} fusion samples "
              f"from the first part, {args.seeds} seed(s)\n")
        print("| | test accuracy % | on classes absent from the fusion labels % | s |")
        print("|---|---|---|---|")
        for label, vals in cells.items():
            t = f"{statistics.mean(secs[label]):.1f}" if label in secs else ""
            print(f"| {label} | {_fmt([a for a, _ in vals])} | {_fmt([b for _, b in vals])} | {t} |")
        print()


if __name__ == "__main__":
    main()
