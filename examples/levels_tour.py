"""Trace a few timm architectures, print their levels and write one HTML page each.

    python examples/levels_tour.py [OUT_DIR]

No per-architecture code: the same two calls handle CNNs, ViTs and MLP-Mixers.
"""

import sys
from pathlib import Path

import torch

import fxfuse
from fxfuse.passes import partition_levels

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "levels")
out_dir.mkdir(parents=True, exist_ok=True)

for name in ["resnet18", "vit_tiny_patch16_224", "mixer_s16_224", "densenet121"]:
    model, size = fxfuse.build_model(name, input_size=(3, 32, 32), num_classes=10)
    plan = partition_levels(fxfuse.trace(model, torch.randn(1, *size)))
    print(f"\n{name}: {len(plan)} levels")
    print(plan.dump())
    # each level as its own GraphModule; chained, they reproduce the model
    x = torch.randn(2, *size)
    y = x
    for level_module in plan.split():
        y = level_module(y)
    torch.testing.assert_close(y, model(x))
    print("wrote", plan.save(out_dir / f"{name}.html"))
