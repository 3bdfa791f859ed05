"""Small vocabulary of op categories shared by the graph passes."""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

LINEAR_FUNCS = (F.linear,)
CONV_FUNCS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
CONV_T_FUNCS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
MATMUL_FUNCS = (torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.einsum, torch.addmm, torch.baddbmm)
MATMUL_METHODS = ("matmul", "mm", "bmm", "__matmul__")
CHANNEL_NORM_FUNCS = (F.batch_norm, F.group_norm, F.instance_norm, torch.batch_norm, torch.group_norm)
LAST_NORM_FUNCS = (F.layer_norm, torch.layer_norm) + ((F.rms_norm,) if hasattr(F, "rms_norm") else ())
SHAPE_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda")
SHAPE_METHODS = ("size", "dim", "numel", "ndimension", "type_as_shape")


@functools.cache
def plain_layer_subclasses() -> tuple[type, ...]:
    """Subclasses of torch.nn layers that override ``forward`` with the same computation (outside TorchScript):
    timm's ``Linear`` (F.linear(x, weight, bias); the classifier of MobileNetV3, GhostNet and others). ``fxfuse.trace``
    keeps them as leaf modules and the closed form treats them as their base class."""
    try:
        from timm.layers import Linear
    except ImportError:  # timm is optional for the passes
        return ()
    return (Linear,)


def computes_like(m: nn.Module, base: type) -> bool:
    """``m`` is a ``base`` whose forward is ``base.forward`` or a :func:`plain_layer_subclasses` one."""
    return isinstance(m, base) and (type(m).forward is base.forward or type(m) in plain_layer_subclasses())


def target_name(node: Node) -> str:
    """A short readable name for a node's target (``conv2d``, ``add``, ``flatten``...)."""
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def module_of(gm: GraphModule, node: Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def is_norm_module(m: nn.Module) -> bool:
    bases = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    return isinstance(m, bases) or "norm" in type(m).__name__.lower()


def is_foldable_norm_module(m: nn.Module) -> bool:
    """An eval-mode BatchNorm with running statistics and no activation fused in."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    if not m.track_running_stats or m.running_mean is None:
        return False
    for attr in ("act", "drop", "aa"):
        sub = getattr(m, attr, None)
        if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
            return False
    return True


# elementwise activation modules a norm may apply after itself (timm's BatchNormAct2d)
_NORM_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Mish,
              nn.Hardsigmoid)


def norm_activation(m: nn.Module) -> nn.Module | None:
    """The activation of an eval-mode BatchNorm that applies one after itself (timm's ``BatchNormAct2d``:
    batch norm, then ``drop``, then ``act``), or None when ``m`` is not such a norm.

    Example:
        >>> from timm.layers import BatchNormAct2d
        >>> type(norm_activation(BatchNormAct2d(4, act_layer="silu").eval())).__name__
        'SiLU'
    """
    if type(m).__name__ != "BatchNormAct2d" or not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return None
    if not m.track_running_stats or m.running_mean is None:
        return None
    if not isinstance(getattr(m, "drop", None), (nn.Identity, nn.modules.dropout._DropoutNd)):
        return None
    act = getattr(m, "act", None)
    return act if isinstance(act, _NORM_ACTS) else None


def norm_pre_activation(m: nn.Module, x):
    """The output of a :func:`norm_activation` norm before its activation (eval mode)."""
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def is_transparent(gm: GraphModule, n: Node) -> bool:
    """Ops that are the identity in eval mode on the neuron values (Identity, Dropout, contiguous)."""
    if n.op == "call_module":
        return isinstance(module_of(gm, n), (nn.Identity, nn.modules.dropout._DropoutNd))
    if n.op == "call_method":
        return n.target in ("contiguous", "clone")
    if n.op == "call_function" and n.target is F.dropout:
        return call_arg(n, 2, "training", True) is False
    return False


def call_arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, Node):
        return None
    return node.meta.get("fxfuse", {}).get("shape")
