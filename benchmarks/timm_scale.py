"""Seconds and peak memory of fusing timm models at their real widths.

    python benchmarks/timm_scale.py [--models resnet26d resnet50 vit_small_patch16_224 convnext_atto poolformer_s12]
                                    [--methods kf-linear hf-linear] [--samples 400] [--size 32] [--device cpu]

For each model, two fusions per method: self-fusion (``fuse([A, A])``) and two
models of different seeds (``fuse([A, B])``); ``pretrained=False``, 10 classes,
``img_size`` set for ViTs and MLP-Mixers (a head timm starts at zero gets weights of std 0.02).
Inputs are the embedded digits upsampled to 3×size×size.
Each row runs in a fresh process (``--timeout`` seconds at most) and reports the
wall time of ``fxfuse.fuse``, its peak resident memory (the kernel's high-water
mark, reset after the models and data are built), the level count and how many
levels were solved in closed form, and for self-fusion the largest output
difference between the fused model and A relative to A's output scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import _status_mb  # the one /proc reader of the benchmarks

MODELS = ("resnet26d", "resnet50", "vit_small_patch16_224", "convnext_atto", "poolformer_s12")


def _model(name: str, seed: int, size: int):
    import timm
    import torch

    torch.manual_seed(seed)
    kw = {"img_size": size} if name.startswith(("vit", "deit", "mixer", "resmlp", "gmixer")) else {}
    m = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    head = m.get_classifier()
    if isinstance(head, torch.nn.Linear) and not head.weight.any():
        with torch.no_grad():  # timm starts some heads at zero (Mixers): give them a trained-looking scale
            head.weight.normal_(0, 0.02)
    return m


def child(name: str, pair: bool, method: str, samples: int, size: int, device: str) -> None:
    import torch

    import fxfuse
    from fxfuse.data import load_digits

    x, y = load_digits(size=size, channels=3)
    reps = -(-samples // x.shape[0])
    x, y = x.repeat(reps, 1, 1, 1)[:samples].contiguous(), y.repeat(reps)[:samples]
    a = _model(name, 0, size)
    models = [a, _model(name, 1, size)] if pair else [a, a]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    fused = fxfuse.fuse(models, (x, y), method=method, progress=False, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    levels = fused.meta["fxfuse"]["levels"]
    out = {"seconds": secs, "peak_mb": _status_mb("VmHWM"), "levels": len(levels),
           "closed": sum(r["approximation"].startswith("closed form") for r in levels)}
    if device.startswith("cuda"):
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if not pair:
        with torch.no_grad():
            t = x[:64].to(device)
            ref = a.to(device)(t)
            out["self_err"] = float((fused(t) - ref).abs().max() / ref.abs().max())
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=["kf-linear", "hf-linear"])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, pair, method, samples, size, device = args.child
        child(name, pair == "pair", method, int(samples), int(size), device)
        return
    import torch

    print(f"timm models at {args.size}x{args.size}, {args.samples} samples, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | fusion | method | levels (closed form) | s | peak RSS MB | self-fusion error |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for pair in ("self", "pair"):
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", name, pair, method, str(args.samples), str(args.size),
                       args.device]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
                    res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
                    err = "" if res else (r.stderr.strip().splitlines() or ["failed"])[-1][:80]
                except subprocess.TimeoutExpired:
                    res, err = None, f"not finished in {args.timeout} s"
                fusion = "A + A" if pair == "self" else "A + B"
                if res is None:
                    print(f"| {name} | {fusion} | {method} | | {err} | | |", flush=True)
                    continue
                se = f"{res['self_err']:.1e}" if "self_err" in res else ""
                print(f"| {name} | {fusion} | {method} | {res['levels']} ({res['closed']}) | {res['seconds']:.1f} | "
                      f"{res['peak_mb']:,.0f} | {se} |", flush=True)


if __name__ == "__main__":
    main()
