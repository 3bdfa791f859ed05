"""Saving a (fused) GraphModule as TorchScript or a torch.export ExportedProgram."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._errors import FxFuseError
from ._trace import as_input_tuple

__all__ = ["export", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("torchscript", "export")


def export(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | Sequence[Tensor],
    format: str = "torchscript",
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> str:
    """Save a model in eval mode, reload it, and check that the reloaded model gives the same outputs.

    The model is exported in eval mode and gets its own mode back afterwards.

    ``format="torchscript"`` scripts the model with ``torch.jit.script`` (TorchScript
    is deprecated upstream but still works; load it with ``torch.jit.load``).
    ``format="export"`` uses ``torch.export.export`` with a dynamic batch dimension
    when the model allows it, and ``torch.export.save`` (load with
    ``torch.export.load(path).module()``).

    Args:
        model: The model, e.g. the GraphModule returned by :func:`fxfuse.fuse`.
        path: File to write (``.pt`` for TorchScript, ``.pt2`` for torch.export by convention).
        example_inputs: A Tensor or tuple of Tensors for export and the round-trip check.
        format: ``"torchscript"`` or ``"export"``.

    Returns:
        The path written.

    Raises:
        ValueError: unknown format.
        FxFuseError: the model cannot be exported, or the reloaded model's outputs differ.

    Example:
        >>> import torch, fxfuse, tempfile, os
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
        >>> p = fxfuse.export(fxfuse.trace(m, torch.randn(2, 4)), os.path.join(tempfile.mkdtemp(), "m.pt"), torch.randn(2, 4))
        >>> torch.jit.load(p)(torch.ones(1, 4)).shape
        torch.Size([1, 3])
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    path = os.fspath(path)
    was_training = model.training
    model.eval()
    try:
        return _export(model, path, inputs, format, rtol, atol)
    finally:
        model.train(was_training)  # the caller's model keeps its mode


def _export(model: nn.Module, path: str, inputs: tuple[Tensor, ...], format: str, rtol: float, atol: float) -> str:
    with torch.no_grad():
        expected = model(*inputs)
    try:
        if format == "torchscript":
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream (see the docstring); users ask for it anyway
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
                warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
                scripted = torch.jit.script(model)
                scripted.save(path)
                loaded = torch.jit.load(path)
        else:
            try:
                batch = torch.export.Dim("batch", min=1)
                dyn = tuple({0: batch} for _ in inputs)
                program = torch.export.export(model, inputs, dynamic_shapes=dyn)
            except Exception as e:  # some models specialise on the batch size
                warnings.warn(f"torch.export with a dynamic batch failed ({type(e).__name__}); exporting a static batch")
                program = torch.export.export(model, inputs)
            torch.export.save(program, path)
            loaded = torch.export.load(path).module()
        with torch.no_grad():
            got = loaded(*inputs)
    except Exception as e:
        raise FxFuseError(
            f"could not export {type(model).__name__} as {format} to {path}: {type(e).__name__}: {e}. "
            f"Try the other format ({'export' if format == 'torchscript' else 'torchscript'})."
        ) from e
    try:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    except AssertionError as e:
        raise FxFuseError(f"the {format} model reloaded from {path} gives different outputs: {e}") from e
    return path
