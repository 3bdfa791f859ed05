"""Time fxfuse.trace and partition_levels over the timm zoo and print a table.

Usage:
    python benchmarks/partition_speed.py [--size 224] [--repeats 3] [MODEL ...]

Each row is the median over ``--repeats`` runs, on CPU, with a batch of 1:
model build time is excluded; "trace" includes the deep copy and the shape
propagation forward pass; "partition" is partition_levels alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fxfuse
from fxfuse.passes import partition_levels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import TIMM_ZOO  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=list(TIMM_ZOO))
    p.add_argument("--size", type=int, default=224, help="input H = W (default 224)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input 1x3x{args.size}x{args.size}")
    print(f"{'model':30s} {'nodes':>6s} {'levels':>6s} {'trace s':>8s} {'partition s':>12s}")
    for name in args.models:
        size = max(args.size, 64) if name.startswith("mobilevit") else args.size
        model, _ = fxfuse.build_model(name, input_size=(3, size, size), num_classes=1000)
        x = torch.randn(1, 3, size, size)
        t_trace, t_part = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            gm = fxfuse.trace(model, x)
            t1 = time.perf_counter()
            plan = partition_levels(gm)
            t2 = time.perf_counter()
            t_trace.append(t1 - t0)
            t_part.append(t2 - t1)
        n_nodes = len(gm.graph.nodes)
        print(f"{name:30s} {n_nodes:6d} {len(plan):6d} {statistics.median(t_trace):8.2f} {statistics.median(t_part):12.3f}")


if __name__ == "__main__":
    main()
