"""Building models from timm names and loading fxfuse checkpoints.

Checkpoint format
-----------------
An fxfuse checkpoint is a file written by ``torch.save`` that holds a plain dict
(so it loads with ``torch.load(..., weights_only=True)``)::

    {
        "format": "fxfuse-checkpoint/1",
        "arch": "resnet18",                 # a timm model name
        "model_kwargs": {"num_classes": 10},  # passed to timm.create_model
        "input_size": [3, 32, 32],          # optional: (C, H, W) the model was trained on
        "state_dict": {...},                # model.state_dict()
    }

``{"arch": ..., "num_classes": ..., "state_dict": ...}`` is accepted too.
:func:`save_checkpoint` writes the format and :func:`load_checkpoint` reads it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["build_model", "load_checkpoint", "read_checkpoint", "save_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "fxfuse-checkpoint/1"


def _timm():
    import timm

    return timm


def _check_input_size(input_size: Sequence[int] | None) -> tuple[int, int, int] | None:
    if input_size is None:
        return None
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or any(s <= 0 for s in size):
        raise ValueError(f"input_size must be three positive ints (C, H, W), got {tuple(input_size)}")
    return size  # type: ignore[return-value]


def _create_timm(arch: str, input_size: tuple[int, int, int] | None, model_kwargs: dict[str, Any]) -> nn.Module:
    timm = _timm()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown model {arch!r}: not a timm model name nor an existing checkpoint path{hint}")
    kwargs = dict(model_kwargs)
    kwargs["pretrained"] = False  # nothing is downloaded at run time
    if input_size is not None:
        kwargs.setdefault("in_chans", input_size[0])
        if input_size[1] == input_size[2]:
            kwargs.setdefault("img_size", input_size[1])
        else:
            kwargs.setdefault("img_size", tuple(input_size[1:]))
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e) or "img_size" in model_kwargs:
            raise
    kwargs.pop("img_size")  # convolutional models take any size and have no img_size argument
    return timm.create_model(arch, **kwargs)


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) input size a timm model was configured for, else (3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    arch: str,
    *,
    input_size: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> None:
    """Save a timm model in the fxfuse checkpoint format (see the module docstring).

    Args:
        model: The trained model; only its ``state_dict`` is stored.
        path: File to write.
        arch: The timm model name that rebuilds the architecture.
        input_size: Optional (C, H, W) the model expects.
        **model_kwargs: Arguments for ``timm.create_model`` (e.g. ``num_classes=10``).

    Example:
        >>> import fxfuse, tempfile, os
        >>> m, _ = fxfuse.build_model("resnet10t", num_classes=3)
        >>> p = os.path.join(tempfile.mkdtemp(), "a.pt")
        >>> fxfuse.save_checkpoint(m, p, "resnet10t", num_classes=3, input_size=(3, 32, 32))
        >>> fxfuse.load_checkpoint(p)[1]
        (3, 32, 32)
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": str(arch),
        "model_kwargs": dict(model_kwargs),
        "input_size": list(_check_input_size(input_size)) if input_size is not None else None,
        "state_dict": model.state_dict(),
    }
    torch.save(payload, os.fspath(path))


def load_plain(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, dicts, lists and numbers, never pickled code.

    Raises:
        ValueError: the file does not exist, or is not a plain file of tensors (the
            message says so, and does not suggest unpickling it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{what} {path!r} is not a plain PyTorch file of tensors ({type(e).__name__} in a weights-only load): "
            "fxfuse never unpickles code. Save plain data, e.g. torch.save(model.state_dict(), path), or an "
            "fxfuse checkpoint with fxfuse.save_checkpoint"
        ) from e


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, tuple[int, int, int]]:
    """Load a model saved in the fxfuse checkpoint format.

    Returns:
        The model in eval mode, and its (C, H, W) input size (from the checkpoint,
        else the timm default).

    Raises:
        ValueError: the file is not an fxfuse checkpoint, or its weights do not
            fit the architecture.
    """
    model, size, _, _ = read_checkpoint(path)
    return model, size


def read_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, tuple[int, int, int], str, dict[str, Any]]:
    """Like :func:`load_checkpoint`, also returning the timm arch name and its model kwargs."""
    path = os.fspath(path)
    payload = load_plain(path, "checkpoint")
    if not isinstance(payload, dict) or "arch" not in payload or "state_dict" not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path!r} is not an fxfuse checkpoint: expected a dict with 'arch' and 'state_dict', got {keys}; "
            "write checkpoints with fxfuse.save_checkpoint(model, path, arch, num_classes=...)"
        )
    kwargs = dict(payload.get("model_kwargs") or {})
    if payload.get("num_classes") is not None:
        kwargs.setdefault("num_classes", int(payload["num_classes"]))
    input_size = _check_input_size(payload.get("input_size"))
    arch = str(payload["arch"])
    model = _create_timm(arch, input_size, kwargs)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {path!r}: its state_dict does not fit timm's {arch!r} "
            f"with {kwargs}: {e}. Store the model_kwargs the model was built with."
        ) from e
    model.eval()
    return model, input_size or default_input_size(model), arch, kwargs


def build_model(
    spec: str | os.PathLike,
    *,
    input_size: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build a model from a timm name (``pretrained=False``) or an fxfuse checkpoint path.

    Args:
        spec: A timm model name such as ``"resnet18"``, or a checkpoint path.
        input_size: (C, H, W). Models with a fixed input size (ViT, Swin, Mixer)
            are built for it; other models accept any size.
        num_classes: Number of classes of a timm model built by name.

    Returns:
        The model in eval mode and its (C, H, W) input size.

    Raises:
        ValueError: unknown model name (close timm names are suggested) or a bad checkpoint.

    Example:
        >>> import fxfuse
        >>> model, size = fxfuse.build_model("vit_tiny_patch16_224", input_size=(3, 32, 32))
        >>> size
        (3, 32, 32)
    """
    size = _check_input_size(input_size)
    if os.path.exists(os.fspath(spec)):
        model, ckpt_size = load_checkpoint(spec)
        return model, size or ckpt_size
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    model = _create_timm(str(spec), size, kwargs)
    model.eval()
    return model, size or default_input_size(model)
