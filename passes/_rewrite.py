"""Writing new parameter values into a GraphModule: the rewriting step of every solver."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.fx import GraphModule

__all__ = ["rewrite_params"]


def rewrite_params(gm: GraphModule, params: Mapping[str, Tensor], *, in_place: bool = False) -> GraphModule:
    """Set parameters and buffers of ``gm`` by qualname; shapes must match.

    Level modules from ``LevelPlan.split()`` share their tensors with the plan's
    GraphModule, so writing into the plan's module updates them too.

    Args:
        gm: The GraphModule to rewrite.
        params: Qualname -> new value (cast to the existing tensor's dtype and device).
        in_place: Write into ``gm`` itself instead of a deep copy.

    Returns:
        The rewritten GraphModule (a new one unless ``in_place``).

    Raises:
        KeyError: a name that is neither a parameter nor a buffer of ``gm``.
        ValueError: a value of another shape.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse.passes import rewrite_params
        >>> gm = fxfuse.trace(torch.nn.Linear(2, 1), torch.randn(1, 2))
        >>> new = rewrite_params(gm, {"bias": torch.tensor([3.0])})
        >>> float(new.bias), float(gm.bias) == 3.0
        (3.0, False)
    """
    out = gm if in_place else copy.deepcopy(gm)
    state = dict(out.named_parameters(remove_duplicate=False))
    state.update(dict(out.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, value in params.items():
            if name not in state:
                raise KeyError(f"rewrite_params: `{name}` is not a parameter or buffer of {type(gm).__name__}")
            t = state[name]
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"rewrite_params: `{name}` has shape {tuple(t.shape)}, got {tuple(value.shape)}")
            t.copy_(value.to(device=t.device, dtype=t.dtype))
    return out
