"""ViT half-blocks in closed form (attention and MLP halves op by op) against the gradient fit.

    python benchmarks/vit_blocks.py [--seeds 3] [--model test_vit|mixer|resmlp|gmixer]

Two timm ``test_vit`` (img_size 32, patch 8, in_chans 1, 10 classes) trained 15 epochs on a
2-way Dirichlet split of the digits upsampled to 32×32, fused with kf-linear and hf-linear on
400 samples of the first part: ``blocks="closed-form"`` (the default: MLP halves with their
LayerNorm and LayerScale folded, and attention halves with qkv grouped within matched heads,
op by op in closed form; the first attention half, which holds the class token and position
embedding, by gradient) and ``blocks="gradient"`` (every block level by Adam). Prints test
accuracy mean ± std over seeds and seconds per fusion.

``--model mixer``: the same with a small timm ``MlpMixer`` (img_size 32, patch 8, in_chans 1, embed_dim 64,
4 blocks; 16 tokens): its token-mixing halves (the token MLP on channels as rows, fc2 through the transpose back)
and channel halves in closed form against the gradient fit. ``--model resmlp``: the same block layout as ResMLP
(timm's ``ResBlock`` with ``Affine`` norms and LayerScales; 64 wide, 4 blocks, MLP ratio 4). ``--model gmixer``:
gMixer's layout (``GluMlp`` in both halves, SiLU; 64 wide, 4 blocks, MLP ratios (1, 4)).
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

ROWS = (("kf-linear, halves in closed form (default)", "kf-linear", {}),
        ("kf-linear, halves by gradient", "kf-linear", {"blocks": "gradient"}),
        ("hf-linear, halves in closed form (default)", "hf-linear", {}),
        ("hf-linear, halves by gradient", "hf-linear", {"blocks": "gradient"}))


def _model(name: str):
    if name == "mixer":
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=10, img_size=32, in_chans=1, patch_size=8, embed_dim=64, num_blocks=4)
    if name == "gmixer":
        from timm.layers import GluMlp
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=10, img_size=32, in_chans=1, patch_size=8, embed_dim=64, num_blocks=4,
                        mlp_ratio=(1.0, 4.0), mlp_layer=GluMlp, act_layer=torch.nn.SiLU)
    if name == "resmlp":
        from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

        return MlpMixer(num_classes=10, img_size=32, in_chans=1, patch_size=8, embed_dim=64, num_blocks=4,
                        mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)
    return timm.create_model("test_vit", pretrained=False, num_classes=10, in_chans=1, img_size=32, patch_size=8)


def run(seed: int, model: str = "test_vit") -> dict[str, tuple[float, float]]:
    x, y = load_digits(size=32)
    tr, te = train_test_split(len(y), 0.25, seed=seed)
    parts = dirichlet_split(y[tr], 2, min_max_ratio=0.2, seed=seed)
    models = []
    for k, p in enumerate(parts):
        torch.manual_seed(1000 * seed + k)
        m = _model(model)
        models.append(train_classifier(m, x[tr][p], y[tr][p], BASE_TRAINING.replace(epochs=15, seed=seed + k)))
    first = parts[0][torch.randperm(len(parts[0]), generator=torch.Generator().manual_seed(seed))[:400]]
    out = {f"base model {k + 1}": (accuracy(m, x[te], y[te]), 0.0) for k, m in enumerate(models)}
    for label, method, opts in ROWS:
        t0 = time.perf_counter()
        fused = fxfuse.fuse(models, x[tr][first], method=method, progress=False, seed=seed, **opts)
        out[label] = (accuracy(fused, x[te], y[te]), time.perf_counter() - t0)
    print(f"# seed {seed}: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--model", default="test_vit", choices=["test_vit", "mixer", "resmlp", "gmixer"])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    runs = [run(s, args.model) for s in range(args.seeds)]
    name = {"test_vit": "test_vit", "mixer": "MlpMixer (64 wide, 4 blocks)",
            "resmlp": "ResMLP layout (64 wide, 4 blocks)", "gmixer": "gMixer layout (64 wide, 4 blocks)"}[args.model]
    print(f"\n| {name}, 32×32 digits, Dirichlet 2-way | accuracy % | s per fusion |\n|---|---|---|")
    for label in runs[0]:
        acc = [r[label][0] for r in runs]
        secs = [r[label][1] for r in runs]
        spread = statistics.pstdev(acc) if len(acc) > 1 else 0.0
        print(f"| {label} | {statistics.mean(acc):.1f} ± {spread:.1f} | "
              + (f"{statistics.mean(secs):.1f} |" if any(secs) else " |"))


if __name__ == "__main__":
    main()
