"""Peak memory of a fusion as the number of fusion samples grows, and for a Tensor vs a DataLoader.

Usage:
    python benchmarks/memory.py [--samples 20000] [--methods kf-linear git-rebasin] [--budget BYTES]

Each row runs in a fresh process and reports its peak resident set size (RSS,
from the kernel's high-water mark, reset once the data is built), the RSS at
that point (the Python process with torch loaded and the data: 20,000 inputs of
3×32×32 are 234 MB), and the wall time. The
model is a small conv net (3 conv-BatchNorm-ReLU blocks of 32, 64, 64 channels,
pooling, a Linear head) at 32×32, or a timm model at its own widths (``--model resnet18``,
``pretrained=False``, 10 classes); the inputs are the embedded digits upsampled
to 3×32×32 and repeated with noise up to ``--samples``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time


def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _net(seed: int, model: str = "small"):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if model != "small":
        import timm

        return timm.create_model(model, pretrained=False, num_classes=10).eval()

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def child(method: str, form: str, n: int, budget: int | None, model: str) -> None:
    import torch

    import fxfuse
    from fxfuse.data import load_digits

    torch.set_num_threads(2)
    x, y = load_digits(size=32, channels=3)
    reps = -(-n // x.shape[0])
    g = torch.Generator().manual_seed(0)
    x = (x.repeat(reps, 1, 1, 1)[:n] + 0.05 * torch.randn(n, 3, 32, 32, generator=g)).contiguous()
    y = y.repeat(reps)[:n]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS: building the data's temporaries is not the fusion's memory
    base_rss = _status_mb("VmRSS")
    models = [_net(0, model), _net(1, model)]
    if form == "tensor":
        data = (x, y)
    else:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    opts = {} if budget is None else {"memory_budget": budget}
    t0 = time.perf_counter()
    fxfuse.fuse(models, data, method=method, progress=False, device="cpu", **opts)
    secs = time.perf_counter() - t0
    print(json.dumps({"peak_mb": _status_mb("VmHWM"), "data_mb": base_rss, "seconds": secs}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[20_000])
    p.add_argument("--methods", nargs="+", default=["kf-linear", "git-rebasin"])
    p.add_argument("--forms", nargs="+", default=["tensor", "dataloader"], choices=["tensor", "dataloader"])
    p.add_argument("--budget", type=int, default=None, help="memory_budget option in bytes (default: fxfuse's)")
    p.add_argument("--model", default="small", help="'small' (the conv net above) or a timm model name, e.g. resnet18")
    p.add_argument("--child", nargs=3, metavar=("METHOD", "FORM", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.budget, args.model)
        return
    print("| method | data | samples | peak RSS MB | RSS before fusing MB | s |")
    print("|---|---|---|---|---|---|")
    for n in args.samples:
        for method in args.methods:
            for form in args.forms:
                cmd = [sys.executable, __file__, "--child", method, form, str(n), "--model", args.model]
                if args.budget is not None:
                    cmd += ["--budget", str(args.budget)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"| {method} | {form} | {n} | failed: {res.stderr.strip().splitlines()[-1]} | | |")
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"| {method} | {form} | {n} | {r['peak_mb']:.0f} | {r['data_mb']:.0f} | {r['seconds']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
