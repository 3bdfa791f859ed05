"""One rank of a distributed fusion, launched by tests/test_distributed.py the way torchrun launches it
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

    python tests/dist_worker.py CASE METHOD OUT [--fail] [--other-models] [--other-shape] [--finetune]

Rank r fuses the r-th contiguous shard of the case's data; rank 0 saves the fused state dict and report to OUT.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxfuse  # noqa: E402
from fxfuse import _dist  # noqa: E402


def case(name: str, seed_offset: int = 0):
    """The models and the whole data of a case (deterministic)."""
    if name == "mlp":
        from zoo import mlp

        models = [mlp(seed=0 + seed_offset), mlp(seed=1)]
        x = torch.randn(240, 16, generator=torch.Generator().manual_seed(7))
    elif name == "mixer":  # token-mixing halves: rows over the fused channels, a term through a transpose
        from timm.models.mlp_mixer import MlpMixer

        models = []
        for k in range(2):
            torch.manual_seed(k + seed_offset)
            models.append(MlpMixer(num_classes=4, img_size=16, patch_size=4, embed_dim=16, num_blocks=2).eval())
        x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    else:
        import timm

        models = []
        for k in range(2):
            torch.manual_seed(k + seed_offset)
            models.append(timm.create_model("test_resnet", pretrained=False, num_classes=4).eval())
        x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return models, x


METHOD_OPTIONS = {"kf-gradient": {"epochs": 30, "val_split": 0.0}, "hf-gradient": {"epochs": 30, "val_split": 0.0}}


def main() -> int:
    name, method, out = sys.argv[1:4]
    torch.set_num_threads(1)
    assert _dist.init_from_env("cpu")
    rank, size = _dist.world()
    models, x = case(name, seed_offset=1 if ("--other-models" in sys.argv and rank == 1) else 0)
    shard = x.chunk(size)[rank].clone()
    if "--fail" in sys.argv and rank == 1:
        shard[0, 0] = float("nan")
    if "--other-shape" in sys.argv and rank == 1:
        shard = shard[:, :-1]
    fused = fxfuse.fuse(models, shard, method=method, progress=False, device="cpu",
                        **METHOD_OPTIONS.get(method, {}))
    if "--finetune" in sys.argv:  # then a short fine-tune on the shard, labelled by models[0]
        with torch.no_grad():
            labels = models[0](shard).argmax(-1)
        fused = fxfuse.finetune(fused, (shard, labels), epochs=5, lr=1e-3, progress=False)
    if rank == 0:
        torch.save({"state": fused.state_dict(), "levels": fused.meta["fxfuse"].get("levels", []),
                    "finetune": fused.meta["fxfuse"].get("finetune")}, out)
    _dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
