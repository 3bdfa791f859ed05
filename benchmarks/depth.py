"""Models of different depth: cross-layer alignment (CLA) + identity levels, zero-shot and after a short fine-tune.

    python benchmarks/depth.py [--seeds 3] [--arch mlp resnet] [--ft-epochs 5]

Setting: the digits' training part split 2-way non-IID (Dirichlet, appendix D.1,
min_max_ratio 0.2), as in the Table 1 layout. The deeper model A trains on part 1,
the shallower model B on part 2. Fusion uses 400 samples of part 1, without labels.

* ``mlp``: 64-64-64-64-64-10 (4 hidden layers) and 64-64-64-10 (2), 8×8 digits.
* ``resnet``: timm ResNet with BasicBlocks, layers [2, 2, 2, 2] and [1, 1, 1, 1],
  channels (16, 32, 32, 64), stem width 16, 16×16 gray digits.

Rows: the bases; their logit-averaging ensemble (2× the cost); B with identity levels
at the CLA positions (a plain depth-aligned baseline: zero-shot it is B); CLA +
kf-linear and CLA + hf-linear (``fxfuse.fuse`` aligns depth itself); a naive uniform
mapping + kf-linear (B's levels spread evenly between the pins,
``align_depth(cost="uniform")``); and CLA + kf-linear into B's (shallower) architecture,
``target=b``, where A's unmatched levels are merged into the matched level after them. Columns: test accuracy zero-shot, and after the same
short fine-tune of every row (``fxfuse.finetune``: ``--ft-epochs`` epochs of Adam,
lr 1e-3, cross-entropy on the whole training part); for the ensemble, the ensemble
of the fine-tuned bases. Cells: mean ± std over seeds (seconds of fusion).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import fxfuse
from fxfuse._config import make_config
from fxfuse._engine import align_depth as engine_align_depth
from fxfuse._engine import prepare
from fxfuse._train import BASE_TRAINING, accuracy, train_classifier
from fxfuse._trace import out_of_place
from fxfuse.data import dirichlet_split, load_digits, train_test_split
from fxfuse.passes import align_depth, insert_identity, partition_levels


def _mlp(depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, 64)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Linear(64, 64)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(64, 10))


def _resnet(layers: list[int]) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, layers, num_classes=10, in_chans=1, channels=(16, 32, 32, 64), stem_width=16)


def _build(arch: str, deep: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "mlp":
        return _mlp(4 if deep else 2)
    return _resnet([2, 2, 2, 2] if deep else [1, 1, 1, 1])


class _Ensemble(nn.Module):
    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x):
        return torch.stack([m(x) for m in self.models]).mean(0)


def _uniform_aligned(a: nn.Module, b: nn.Module, example: torch.Tensor) -> nn.Module:
    """B with identity levels where a uniform (evenly spread) mapping leaves A's levels unmatched."""
    gms = [out_of_place(fxfuse.trace(m, example)) for m in (a, b)]
    plans = [partition_levels(g) for g in gms]
    al = align_depth(plans, None, target=0, cost="uniform")
    return insert_identity(gms[1], plans[1], al.insertions[1], example=example)[0]


def run(arch: str, seed: int, ft_epochs: int) -> dict[str, tuple[float, float, float]]:
    size = 16 if arch == "resnet" else 8
    x, y = load_digits(size=size)
    tr, te = train_test_split(len(y), 0.25, seed=seed)
    parts = dirichlet_split(y[tr], 2, min_max_ratio=0.2, seed=seed)
    epochs = 15 if arch == "resnet" else 60
    models = []
    for k, p in enumerate(parts):
        m = _build(arch, deep=(k == 0), seed=1000 * seed + k)
        models.append(train_classifier(m, x[tr][p], y[tr][p], BASE_TRAINING.replace(epochs=epochs, seed=seed + k)))
    a, b = models
    first = parts[0][torch.randperm(len(parts[0]), generator=torch.Generator().manual_seed(seed))[:400]]
    fusion = x[tr][first]
    test = (x[te], y[te])
    ft_data = (x[tr], y[tr])

    def ft(m):
        return fxfuse.finetune(m, ft_data, epochs=ft_epochs, lr=1e-3, seed=seed, progress=False)

    out: dict[str, tuple[float, float, float]] = {}
    ft_a, ft_b = ft(a), ft(b)
    out["base A (deeper)"] = (accuracy(a, *test), accuracy(ft_a, *test), 0.0)
    out["base B (shallower)"] = (accuracy(b, *test), accuracy(ft_b, *test), 0.0)
    out["ensemble (2× cost)"] = (accuracy(_Ensemble([a, b]), *test), accuracy(_Ensemble([ft_a, ft_b]), *test), 0.0)
    # B made as deep as A by CLA, with identity levels (the same function as B): fuse's own first stages
    cfg = make_config("kf-linear", device="cpu", progress=False, seed=seed)
    aligned = engine_align_depth(prepare([a, b], fusion, cfg), cfg)
    b_id = aligned.models[1]
    al = aligned.alignment.alignments[1]
    out["B + identities (depth-aligned)"] = (accuracy(b_id, *test), accuracy(ft(b_id), *test), 0.0)
    for label, method, aligned in (("CLA + kf-linear", "kf-linear", None), ("CLA + hf-linear", "hf-linear", None),
                                   ("uniform mapping + kf-linear", "kf-linear", "uniform"),
                                   ("CLA + kf-linear into B's architecture (A's extra levels merged)", "kf-linear",
                                    "shallow")):
        t0 = time.perf_counter()
        if aligned is None:
            fused = fxfuse.fuse([a, b], fusion, method=method, progress=False, seed=seed)
        elif aligned == "shallow":
            fused = fxfuse.fuse([a, b], fusion, method=method, progress=False, seed=seed, target=b)
        else:
            fused = fxfuse.fuse([a, _uniform_aligned(a, b, fusion[:2])], fusion, method=method, progress=False,
                                seed=seed)
        secs = time.perf_counter() - t0
        out[label] = (accuracy(fused, *test), accuracy(ft(fused), *test), secs)
    print(f"# {arch} seed {seed}: CLA inserts after B's levels {[p for p, _ in al.insertions[1]]}", flush=True)
    return out


def _cell(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.1f} ± {(statistics.pstdev(vals) if len(vals) > 1 else 0.0):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arch", nargs="+", default=["mlp", "resnet"], choices=["mlp", "resnet"])
    ap.add_argument("--ft-epochs", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for arch in args.arch:
        t0 = time.perf_counter()
        runs = [run(arch, s, args.ft_epochs) for s in range(args.seeds)]
        print(f"\n{arch}: 2-way Dirichlet digits, 400 unlabelled fusion samples from A's part, {args.seeds} seeds, "
              f"fine-tune {args.ft_epochs} epochs ({time.perf_counter() - t0:.0f} s in all)\n")
        print("| model | zero-shot % | fine-tuned % | fusion s |")
        print("|---|---|---|---|")
        for label in runs[0]:
            zs = [r[label][0] for r in runs]
            fts = [r[label][1] for r in runs]
            secs = [r[label][2] for r in runs]
            print(f"| {label} | {_cell(zs)} | {_cell(fts)} | {statistics.mean(secs):.1f} |" if any(secs)
                  else f"| {label} | {_cell(zs)} | {_cell(fts)} | |")


if __name__ == "__main__":
    main()
