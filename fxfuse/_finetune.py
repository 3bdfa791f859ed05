"""A short fine-tune after fusion (CLAFusion, section 4 and Table 7; "Model Fusion via Neuron Interpolation", Table 3)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["finetune", "restandardise_batchnorm"]

OBJECTIVES = ("ce", "distill")


def _tensors(data: Any) -> tuple[Tensor, Tensor | None] | None:
    from ._collect import _split_item

    if isinstance(data, (Tensor, dict)) or (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor)):
        return _split_item(data, "data")
    return None


@torch.no_grad()
def restandardise_batchnorm(model: nn.Module, batches) -> int:
    """Set every affine BatchNorm's running statistics to those of its inputs on ``batches`` and rescale its
    weight and bias so that the eval-mode function is unchanged; returns how many were set.

    Fused levels fold BatchNorm into the conv (mean 0, variance 1), so in train mode, where BatchNorm
    normalises by batch statistics, a fused model would compute something else entirely. With
    γ' = γ·σ_d/σ_r and β' = β + γ·(μ_d − μ_r)/σ_r (σ = √(var + ε); r: running, d: data) the eval function
    is the same and train mode starts from it.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.affine and m.track_running_stats and m.running_mean is not None]
    if not bns:
        return 0
    sums: dict[nn.Module, list] = {}

    def hook(mod, args):
        x = args[0].detach().to(torch.float64)
        dims = [d for d in range(x.ndim) if d != 1]
        s = sums.setdefault(mod, [0.0, 0.0, 0])
        s[0] = s[0] + x.sum(dims)
        s[1] = s[1] + (x * x).sum(dims)
        s[2] += x.numel() // x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    from ._dist import all_reduce_, all_reduce_number, is_distributed

    if is_distributed():  # every rank's shard: sum the per-channel sums (same BatchNorms, same order everywhere)
        for m in bns:
            s = sums.setdefault(m, [torch.zeros(m.num_features, dtype=torch.float64),
                                    torch.zeros(m.num_features, dtype=torch.float64), 0])
            s[0] = all_reduce_(torch.as_tensor(s[0], dtype=torch.float64).clone())
            s[1] = all_reduce_(torch.as_tensor(s[1], dtype=torch.float64).clone())
            s[2] = all_reduce_number(int(s[2]))
    for m in bns:
        if m not in sums or sums[m][2] < 2:
            continue
        s, sq, n = sums[m]
        mu = s / n
        var = (sq / n - mu * mu).clamp_min(0) * n / (n - 1)  # unbiased, as BatchNorm keeps it
        sig_r = (m.running_var.double() + m.eps).sqrt()
        sig_d = (var + m.eps).sqrt()
        w = m.weight.double()
        m.bias.copy_(m.bias.double() + w * (mu - m.running_mean.double()) / sig_r)
        m.weight.copy_(w * sig_d / sig_r)
        m.running_mean.copy_(mu)
        m.running_var.copy_(var)
    return len(sums)


def finetune(
    model: nn.Module,
    data: Any,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    objective: str | None = None,
    teachers: Sequence[nn.Module] | None = None,
    temperature: float = 1.0,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune a copy of ``model`` for a few epochs with Adam: any fused model, or any other.

    Fused models are usually fine-tuned briefly before use (CLAFusion fine-tunes its
    depth-aligned fusions; the neuron-interpolation paper's Table 3 does too). Two
    objectives:

    * ``"ce"``: cross-entropy on the labels of ``data`` (the default when no
      ``teachers`` are given);
    * ``"distill"``: KL divergence to the mean softmax of ``teachers`` (e.g. the base
      models) at ``temperature``; needs no labels, so it holds on a skewed sample that
      misses classes (the default when ``teachers`` are given).

    BatchNorm layers train on batch statistics, as in ordinary training; first their
    running statistics are set to those of ``data`` with weights rescaled so that the
    function is unchanged (:func:`restandardise_batchnorm`: a fused model's BatchNorms
    are folded to mean 0, variance 1, and would otherwise start training from another
    function). The input model is never modified; the result is in eval mode, on the input's device and
    dtype, with its ``requires_grad`` flags.

    Args:
        model: The model to fine-tune.
        data: A Tensor of inputs (with ``teachers``), an ``(inputs, labels)`` tuple or
            ``{"inputs", "labels"}`` dict (shuffled every epoch with ``seed``), or an
            iterable of such batches (a DataLoader, which may shuffle), read once per epoch.
        epochs: Passes over ``data``.
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        batch_size: Batch size for Tensor data.
        objective: ``"ce"`` or ``"distill"``; default: ``"distill"`` with teachers, else ``"ce"``.
        teachers: Models whose mean softmax the ``"distill"`` objective follows.
        temperature: Softmax temperature of ``"distill"``.
        device: Where to train; default: the model's device.
        seed: Seed of the shuffling.
        progress: Show a progress bar with the running loss.

    Returns:
        The fine-tuned copy; ``copy.meta["fxfuse"]["finetune"]`` (GraphModules) records
        the settings and the mean loss of each epoch.

    Raises:
        ValueError / TypeError: a bad argument (the message names it).

    Example:
        >>> import torch, fxfuse
        >>> _ = torch.manual_seed(0)
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> x = torch.randn(128, 4); y = (x[:, 0] > 0).long()
        >>> tuned = fxfuse.finetune(m, (x, y), epochs=20, lr=1e-2, progress=False)
        >>> bool((tuned(x).argmax(-1) == y).float().mean() > 0.9)
        True
    """
    from ._config import _check_int, resolve_device

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_int("epochs", epochs, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, None)
    for name, v, pos in (("lr", lr, True), ("weight_decay", weight_decay, False), ("temperature", temperature, True)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (pos and v == 0):
            raise ValueError(f"{name} must be a {'positive' if pos else 'non-negative'} number, got {v!r}")
    teachers = list(teachers) if teachers is not None else []
    for k, t in enumerate(teachers):
        if not isinstance(t, nn.Module):
            raise TypeError(f"teachers[{k}] is a {type(t).__name__}, not a torch.nn.Module")
    if objective is None:
        objective = "distill" if teachers else "ce"
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
    if objective == "distill" and not teachers:
        raise ValueError("objective='distill' follows the mean softmax of teachers=[...] (e.g. the base models); "
                         "pass them, or use objective='ce' with labelled data")
    p0 = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p0 is None:
        raise ValueError("model has no floating-point parameters to fine-tune")
    dev = resolve_device(device) if device is not None else p0.device
    tensors = _tensors(data)
    if tensors is not None:
        x_all, y_all = tensors
        if objective == "ce" and y_all is None:
            raise ValueError("objective='ce' needs labels: pass data as (inputs, labels), or pass teachers=[...] to "
                             "distil their mean softmax (no labels needed)")
        n = x_all.shape[0]
        if n < 2:
            raise ValueError(f"data has {n} sample(s); fine-tuning needs at least 2")
    elif isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a Tensor, an (inputs, labels) tuple, a dict or an iterable of batches; "
                        f"got {type(data).__name__}")

    tuned = copy.deepcopy(model).to(dev, torch.float32)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in tuned.parameters():
        p.requires_grad_(p.is_floating_point())
    teach = [copy.deepcopy(t).to(dev).float().eval() for t in teachers]
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    from ._dist import all_reduce_number, is_distributed

    # in a torch.distributed process group, data is this rank's shard and the gradients are averaged by DDP
    spread = is_distributed()
    net = tuned
    if spread:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(tuned, find_unused_parameters=True)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        if tensors is not None:
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, batch_size):
                b = perm[s : s + batch_size]
                yield x_all[b], (None if y_all is None else y_all[b])
        else:
            from ._collect import _split_item

            for i, item in enumerate(data):
                yield _split_item(item, f"data: batch {i}")

    def loss_of(x: Tensor, y: Tensor | None) -> Tensor:
        out = net(x)
        if objective == "ce":
            if y is None:
                raise ValueError("objective='ce' needs labels, but a batch of data has none")
            return F.cross_entropy(out, y.long())
        with torch.no_grad():
            target = torch.stack([t(x).float().div(temperature).softmax(-1) for t in teach]).mean(0)
        return F.kl_div(F.log_softmax(out / temperature, -1), target, reduction="batchmean") * temperature**2

    from ._engine import progress_bar

    restandardise_batchnorm(tuned, (x.to(dev, torch.float32) if x.is_floating_point() else x.to(dev)
                                    for x, _ in batches()))
    bar = progress_bar(epochs, "fine-tuning", progress)
    history = []
    tuned.train()
    try:
        for _ in range(epochs):
            total, count = 0.0, 0
            with net.join() if spread else contextlib.nullcontext():
                for x, y in batches():
                    if x.shape[0] < 2:
                        continue  # BatchNorm needs two samples
                    x = x.to(dev, torch.float32) if x.is_floating_point() else x.to(dev)
                    y = None if y is None else y.to(dev)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_of(x, y)
                    loss.backward()
                    opt.step()
                    total += float(loss) * x.shape[0]
                    count += x.shape[0]
            if spread:
                total, count = all_reduce_number(float(total)), all_reduce_number(int(count))
            history.append(total / max(count, 1))
            if bar is not None:
                bar.set_postfix(loss=f"{history[-1]:.4f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    tuned = tuned.to(p0.device, p0.dtype).eval()
    for name, p in tuned.named_parameters():
        p.requires_grad_(flags.get(name, True))
    meta = getattr(tuned, "meta", None)
    if isinstance(meta, dict):  # a new dict: the input model's meta stays as it was
        tuned.meta = {**meta, "fxfuse": {**meta.get("fxfuse", {}), "finetune": {
            "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "objective": objective,
            "batch_size": batch_size, "seed": seed, "loss": history}}}
    return tuned
