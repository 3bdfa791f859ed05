"""One process against several: fxfuse.fuse inside a torch.distributed process group (gloo on CPU).

    python benchmarks/distributed.py [--procs 1 2] [--samples 512] [--arch resnet18] [--method kf-linear]

Each configuration is launched the way users launch it, ``python -m torch.distributed.run
--nproc_per_node=N`` (torchrun), on this machine's CPU cores: every rank builds the same two
timm models (seeds 0 and 1, ``pretrained=False``), takes its contiguous shard of the same
random 3×32×32 inputs, and fuses; rank 0 prints the seconds of the statistics pass of the
first closed-form level and of the whole fusion. Threads per rank: cores / N, so every
configuration uses the whole machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

WORKER = r"""
import os, sys, time, torch, timm
import fxfuse
from fxfuse import _dist
arch, method, samples = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(os.environ["FXFUSE_BENCH_THREADS"]))
_dist.init_from_env("cpu")
rank, size = _dist.world()
models = []
for k in range(2):
    torch.manual_seed(k)
    models.append(timm.create_model(arch, pretrained=False, num_classes=10).eval())
x = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
shard = x.chunk(size)[rank]
import fxfuse._engine as E
orig = E.collect
first = []
def timed(*a, **k):
    t = time.perf_counter(); out = orig(*a, **k); first.append(time.perf_counter() - t); return out
E.collect = timed
t0 = time.perf_counter()
fused = fxfuse.fuse(models, shard, method=method, progress=False, device="cpu", n_init=1)
secs = time.perf_counter() - t0
if rank == 0:
    print(f"RESULT {size} {secs:.2f} {(first[0] if first else float('nan')):.2f}", flush=True)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--method", default="kf-linear")
    args = ap.parse_args()
    import tempfile

    cores = os.cpu_count() or 1
    rows = []
    script = os.path.join(tempfile.mkdtemp(prefix="fxfuse-dist-bench-"), "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    for n in args.procs:
        env = {**os.environ, "FXFUSE_BENCH_THREADS": str(max(1, cores // n)), "OMP_NUM_THREADS": str(max(1, cores // n))}
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                              f"--master_port={_port()}", script, args.arch, args.method, str(args.samples)],
                             env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")), None)
        if res.returncode != 0 or line is None:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{n} process(es) failed")
        _, size, secs, first = line.split()
        rows.append((n, float(secs), float(first), wall))
        print(f"# {n} process(es): fuse {secs} s, first level's statistics pass {first} s, launch to exit {wall:.1f} s",
              flush=True)
    print(f"\n{args.arch}, two models, {args.samples} inputs of 3x32x32, {args.method}, {cores} CPU cores, gloo\n")
    print("| processes | threads each | first level's statistics pass s | whole fusion s | launch to exit s |")
    print("|---|---|---|---|---|")
    for n, secs, first, wall in rows:
        print(f"| {n} | {max(1, cores // n)} | {first:.2f} | {secs:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
