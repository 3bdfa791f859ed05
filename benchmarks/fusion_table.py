"""Reproduce the paper's Table 1 layout on the embedded digits and print a markdown table.

    python benchmarks/fusion_table.py [--arch mlp|cnn] [--seeds 3] [--settings dirichlet-2 dirichlet-4 shard-2]
                                      [--blocks closed-form gradient] [--targets own labels ensemble]

Settings: non-IID Dirichlet splits (appendix D.1, min_max_ratio 0.2) into 2 and 4
models, and a sharded split (D.2) into 2 models. Rows: the base models (sorted
by accuracy per seed, then averaged, as in the paper), then every method of
``fxfuse.fuse`` from its registry (``--methods``): the baselines (vanilla
averaging, the ensemble, last-layer KD, git-rebasin and otfusion with uniform and
conductance scores, np-merge and its level-wise variant) and hf-linear,
kf-linear, kf-gradient with uniform, conductance and deeplift importance. Cells are test accuracy (%) mean ± std
over seeds, and the mean seconds per fusion. Fusion uses 400 samples of the
first model's split (with their labels; only np-merge and the importance
scores use them). ``--blocks closed-form gradient`` runs each ``*-linear`` row
with both block solvers, side by side in one run ("(blocks by gradient)" rows:
the whole block level fitted by Adam), and a last table sets each closed-form cell against
its gradient twin: accuracy difference and speed-up. One fusion runs before the table so that the
first row's seconds do not include imports and tracing set-up. ``--targets`` runs every scored row once per
``importance_target`` (the attributed logit: each model's own prediction, the default, the labels, or the
ensemble's prediction), labelled "(conductance, labels)" and so on; the default is the default target only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxfuse
from fxfuse._experiments import make_setting
from fxfuse._methods import METHODS
from fxfuse._train import accuracy

# rows come from the registry of methods: each method with uniform scores, and the methods that use
# importance scores also with the others. hf-gradient is left out by default (hf-linear's grouping,
# kf-gradient's fitting).
IMPORTANCES = ("uniform", "conductance", "deeplift")
DEFAULT_METHODS = [m for m in METHODS if m != "hf-gradient"]
# the paper's table scores its baselines with uniform and conductance scores only
_BASELINE_IMPORTANCES = ("uniform", "conductance")


def _rows(methods: list[str], importances: list[str], n_models: int,
          blocks: tuple[str, ...] = ("closed-form",),
          targets: tuple[str, ...] = ("own",)) -> list[tuple[str, str, str, dict]]:
    out = []
    # baselines first, then the fusions, as in the paper's tables
    for name in sorted(methods, key=lambda n: METHODS[n].levelwise and METHODS[n].grouping != "aligned"):
        m = METHODS[name]
        if m.n_models is not None and m.n_models != n_models:
            continue
        imps = [i for i in importances if m.uses_importance and (m.levelwise or i in _BASELINE_IMPORTANCES)]
        if m.pairwise or not m.uses_importance:
            imps = ["uniform"]
        for imp in imps or ["uniform"]:
            for t in targets if imp != "uniform" else ("own",):
                label = name if len(imps) <= 1 and not (m.levelwise and m.grouping != "aligned") else f"{name} ({imp})"
                opts = {} if t == "own" else {"importance_target": t}  # "own": fuse's default
                if opts:
                    label = label[:-1] + f", {t})" if label.endswith(")") else f"{label} ({t})"
                for b in blocks if m.solver == "linear" else ("closed-form",):
                    if b == "closed-form":
                        out.append((label, name, imp, opts))
                    else:
                        out.append((f"{label} (blocks by gradient)", name, imp, {**opts, "blocks": b}))
    return out


def _fmt(vals: list[float], secs: list[float] | None = None) -> str:
    if not vals:
        return "n/a"
    mean = statistics.mean(vals)
    std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    cell = f"{mean:.1f} ± {std:.1f}"
    if secs:
        cell += f" ({statistics.mean(secs):.1f} s)"
    return cell


def _versus(closed: tuple[list[float], list[float]] | None, gradient: tuple[list[float], list[float]] | None) -> str:
    """"+0.2, 13.5×": the closed form's mean accuracy minus the gradient fit's, and how many times faster it ran."""
    if not closed or not gradient or not closed[0] or not gradient[0]:
        return "n/a"
    diff = statistics.mean(closed[0]) - statistics.mean(gradient[0])
    return f"{diff:+.1f}, {statistics.mean(gradient[1]) / max(statistics.mean(closed[1]), 1e-9):.1f}×"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=["dirichlet-2", "dirichlet-4", "shard-2"])
    p.add_argument("--importances", nargs="+", default=list(IMPORTANCES))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--rows", nargs="+", default=None, help="only these row labels (and the base models)")
    p.add_argument("--targets", nargs="+", default=["own"], choices=["own", "labels", "ensemble"],
                   help="importance_target of the scored rows (each a row of its own)")
    p.add_argument("--blocks", nargs="+", default=["closed-form"], choices=["closed-form", "gradient"],
                   help="block solvers of the *-linear rows (default closed-form; both: a side-by-side column)")
    args = p.parse_args()

    results: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    after_scores: dict[str, dict[str, list[float]]] = {}  # seconds per fusion without the importance scores

    def add(row: str, setting: str, acc: float, secs: float | None = None) -> None:
        accs, ss = results.setdefault(row, {}).setdefault(setting, ([], []))
        accs.append(acc)
        if secs is not None:
            ss.append(secs)

    t_all = time.perf_counter()
    warm = make_setting(args.arch, split="dirichlet", n_models=2, seed=0)
    fxfuse.fuse(warm.models, warm.fusion, method="hf-linear", progress=False)  # imports, registries: not timed
    for setting in args.settings:
        split, n = setting.rsplit("-", 1)
        n_models = int(n)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            s = make_setting(args.arch, split=split, n_models=n_models, seed=seed)
            xt, yt = s.test
            for rank, acc in enumerate(sorted((accuracy(m, xt, yt) for m in s.models), reverse=True)):
                add(f"base model {rank + 1}", setting, acc)
            for row, method, imp, opts in _rows(args.methods, args.importances, n_models, tuple(args.blocks),
                                                tuple(args.targets)):
                if args.rows is not None and row not in args.rows:
                    continue
                t0 = time.perf_counter()
                fused = fxfuse.fuse(s.models, s.fusion, method=method, importance=imp, seed=seed, progress=False,
                                    **opts)
                secs = time.perf_counter() - t0
                add(row, setting, accuracy(fused, xt, yt), secs)
                if imp != "uniform" and isinstance(fused, torch.fx.GraphModule) and "fxfuse" in fused.meta:
                    after_scores.setdefault(row, {}).setdefault(setting, []).append(
                        secs - fused.meta["fxfuse"].get("score_seconds", 0.0))
            print(f"# done {setting} seed {seed} ({time.perf_counter() - t_all:.0f} s)", flush=True)

    print(f"\n{args.arch.upper()} on digits, test accuracy % (mean ± std over {args.seeds} seeds; seconds per fusion)\n")
    print("| method | " + " | ".join(args.settings) + " |")
    print("|---|" + "---|" * len(args.settings))
    rows = sorted((r for r in results if r.startswith("base model")), key=lambda r: int(r.split()[-1]))
    rows += [r for r in results if not r.startswith("base model")]
    for row in rows:
        by_setting = results[row]
        cells = [_fmt(*by_setting.get(st, ([], []))) for st in args.settings]
        print(f"| {row} | " + " | ".join(cells) + " |")
    if after_scores:  # the same rows' seconds less their importance scores (which every such row computes alike)
        print("\nseconds per fusion after the importance scores\n")
        print("| method | " + " | ".join(args.settings) + " |")
        print("|---|" + "---|" * len(args.settings))
        for row, by_setting in after_scores.items():
            cells = [f"{statistics.mean(by_setting[st]):.1f} s" if by_setting.get(st) else "n/a" for st in args.settings]
            print(f"| {row} | " + " | ".join(cells) + " |")
    twins = [(r, f"{r} (blocks by gradient)") for r in results if f"{r} (blocks by gradient)" in results]
    if twins:  # issue 10's target per cell: as accurate as the gradient fit of the same blocks, and >= 10x faster
        print("\nclosed form against the gradient fit of the same blocks: accuracy difference (points, of the means), "
              "speed-up (of the mean seconds per fusion)\n")
        print("| method | " + " | ".join(args.settings) + " |")
        print("|---|" + "---|" * len(args.settings))
        for row, twin in twins:
            print(f"| {row} | " + " | ".join(_versus(results[row].get(st), results[twin].get(st))
                                             for st in args.settings) + " |")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
