"""Tracing models into shape-annotated torch.fx GraphModules."""

from __future__ import annotations

import copy
import inspect
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node, Tracer
from torch.fx.passes.shape_prop import ShapeProp

from ._errors import TraceError

__all__ = ["trace", "as_input_tuple", "module_path", "out_of_place"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXFUSE_DIR = os.path.dirname(os.path.abspath(__file__))


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's registries of modules and functions that torch.fx cannot trace through."""
    try:
        import timm  # noqa: F401  (registers every model's notrace entries)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency
        return (), ()
    modules = tuple(m for m in get_notrace_modules() if isinstance(m, type))
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return modules, functions


class _Tracer(Tracer):
    """A Tracer with extra leaf modules that remembers the innermost failing module."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str], autowrap_functions):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.record_stack_traces = True
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        from fxfuse.passes._ops import plain_layer_subclasses  # (fxfuse.passes imports this module)

        self._plain = plain_layer_subclasses()
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types) or type(m) in self._plain:
            return True  # a plain subclass (timm's Linear) stays one module call, as its base class would
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # innermost module wins: it is recorded first
                self.failed_module = (self.path_of_module(m), type(m).__name__)
            raise


class _ShapeProp(ShapeProp):
    """ShapeProp that also writes ``node.meta["fxfuse"]`` and raises TraceError naming the node."""

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            where = module_path(n) or "<root>"
            line = _last_line(n.meta.get("stack_trace"))
            raise TraceError(
                f"running the traced model on example_inputs failed at node `{n.name}` "
                f"(module `{where}`{', ' + line if line else ''}): {type(cause).__name__}: {cause}. "
                "Check that example_inputs have the shape and dtype the model expects "
                "(e.g. image size, channel count)."
            ) from cause
        meta = n.meta.setdefault("fxfuse", {})
        if isinstance(result, torch.Tensor):
            meta["shape"] = tuple(result.shape)
            meta["dtype"] = result.dtype
        return result


def module_path(node: Node) -> str:
    """The dotted qualname of the module a node belongs to ("" for the root)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    return ""


def _last_line(stack_trace: str | None) -> str:
    if not stack_trace:
        return ""
    lines = [ln.strip() for ln in stack_trace.strip().splitlines() if ln.strip()]
    files = [ln for ln in lines if ln.startswith("File ")]
    return files[-1] if files else ""


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and fxfuse, as 'file:line: code'."""
    frames = traceback.extract_tb(exc.__traceback__)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause.__traceback__ is not None:
        frames = frames + traceback.extract_tb(cause.__traceback__)
    for fr in reversed(frames):
        fn = os.path.abspath(fr.filename)
        if not fn.startswith(_TORCH_DIR) and not fn.startswith(_FXFUSE_DIR):
            code = (fr.line or "").strip()
            return f"{fr.filename}:{fr.lineno}: {code}"
    return ""


def _concrete_args(root: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Defaults of forward() parameters beyond the example inputs, frozen into the trace."""
    try:
        sig = inspect.signature(root.forward)
    except (TypeError, ValueError):
        return {}
    params = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return {}
    if n_inputs > len(params):
        raise TypeError(
            f"{type(root).__name__}.forward takes {len(params)} inputs ({', '.join(p.name for p in params)}), "
            f"but {n_inputs} example inputs were given"
        )
    missing = [p.name for p in params[n_inputs:] if p.default is inspect.Parameter.empty]
    if missing:
        raise TypeError(
            f"{type(root).__name__}.forward also needs {', '.join(missing)} without defaults; "
            f"pass all inputs as a tuple: example_inputs=({', '.join(p.name for p in params)})"
        )
    return {p.name: p.default for p in params[n_inputs:]}


def _drop_specialized_placeholders(graph: torch.fx.Graph, n_inputs: int) -> None:
    """Remove placeholders of defaulted forward() arguments that only feed torch.fx's guards.

    torch.fx keeps a placeholder (and ``_assert`` guards) for every concrete
    argument; when nothing else reads it, the traced module takes exactly the
    example inputs.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[n_inputs:]:
        closure: dict[Node, None] = {}
        stack = [ph]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u not in closure:
                    closure[u] = None
                    stack.append(u)
        if any(u.op == "output" or any(v not in closure for v in u.users) for u in closure):
            continue  # the argument is used by the computation itself
        for n in sorted(closure, key=lambda n: -list(graph.nodes).index(n)):
            graph.erase_node(n)
        graph.erase_node(ph)


def as_input_tuple(example_inputs: Any, what: str = "example_inputs") -> tuple[torch.Tensor, ...]:
    """Normalise a Tensor or a sequence of Tensors into a tuple of Tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise TypeError(
        f"{what} must be a Tensor or a non-empty tuple of Tensors, got {type(example_inputs).__name__}; "
        "pass e.g. torch.randn(2, 3, 32, 32)"
    )


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> GraphModule:
    """Trace a model into a shape-annotated ``torch.fx.GraphModule``.

    The model is deep-copied, put in eval mode and traced with a tracer that
    treats timm's registered "notrace" modules as leaves and wraps timm's notrace
    functions, so that timm models that plain ``symbolic_trace`` rejects (e.g.
    ``vgg11``, ``mobilevit_xxs``) trace too. Node targets keep the model's
    dotted qualnames. The graph is then run once on ``example_inputs`` so that
    every tensor-valued node carries ``node.meta["tensor_meta"]`` (torch.fx's
    ShapeProp) and ``node.meta["fxfuse"]["shape"]`` / ``["dtype"]``.

    The input model is never modified: its parameters, buffers and ``training``
    flag are left as they were. The returned GraphModule is in eval mode and
    owns copies of the model's parameters.

    Args:
        model: The model to trace.
        example_inputs: A Tensor, or a tuple of Tensors for models with several
            inputs, used for shape propagation (a batch of 1–2 small inputs is enough).
        leaf_modules: Extra module classes, or module qualnames, to keep as
            opaque ``call_module`` nodes instead of tracing through them.
        autowrap_functions: Extra free functions to record as single
            ``call_function`` nodes instead of tracing through them.

    Returns:
        The traced GraphModule, in eval mode.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` are not Tensors.
        TraceError: torch.fx cannot trace the model (the message names the module
            and source line and suggests ``leaf_modules=``), or the traced model
            fails on ``example_inputs``.

    Example:
        >>> import torch, fxfuse
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> gm = fxfuse.trace(mlp, torch.randn(2, 4))
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ['0', '1', '2']
        >>> gm.graph.find_nodes(op="call_module", target="2")[0].meta["fxfuse"]["shape"]
        (2, 2)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; "
            "build the model first (e.g. timm.create_model(name, pretrained=False))"
        )
    inputs = as_input_tuple(example_inputs)
    leaf_types, leaf_names = [], []
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            leaf_names.append(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            leaf_types.append(leaf)
        else:
            raise TypeError(
                f"leaf_modules entries must be nn.Module subclasses or module qualnames, got {leaf!r}"
            )
    autowrap = list(autowrap_functions)
    for fn in autowrap:
        if not callable(fn):
            raise TypeError(f"autowrap_functions entries must be callables, got {fn!r}")
    timm_modules, timm_functions = _timm_notrace()

    try:
        root = copy.deepcopy(model)
    except Exception as e:
        raise TraceError(
            f"could not deep-copy {type(model).__name__} before tracing ({type(e).__name__}: {e}); "
            "fxfuse never traces the user's own model object. Remove non-copyable attributes "
            "(open files, hooks holding locks) before tracing."
        ) from e
    root.eval()
    concrete_args = _concrete_args(root, len(inputs))
    tracer = _Tracer(tuple(timm_modules) + tuple(leaf_types), frozenset(leaf_names), timm_functions + tuple(autowrap))
    try:
        graph = tracer.trace(root, concrete_args=concrete_args or None)
    except Exception as e:
        path, cls = tracer.failed_module or ("", type(model).__name__)
        where = f"module `{path}` ({cls})" if path else f"the root module ({cls})"
        line = _user_frame(e)
        hint = (
            f"mark it as a leaf: fxfuse.trace(model, x, leaf_modules=({cls},))"
            if path
            else "rewrite the data-dependent part into a submodule and pass it as leaf_modules="
        )
        raise TraceError(
            f"torch.fx could not trace {where}"
            f"{' at ' + line if line else ''}: {type(e).__name__}: {e}. "
            f"This is usually Python control flow that depends on tensor values; {hint}"
        ) from e
    _drop_specialized_placeholders(graph, len(inputs))
    for node in graph.nodes:
        if isinstance(node.type, str):
            # a postponed annotation (`from __future__ import annotations`) reaches the graph as a string,
            # which the generated code cannot name and TorchScript rejects: resolve Tensor, drop the rest
            node.type = torch.Tensor if node.type.split(".")[-1] == "Tensor" else None
    gm = GraphModule(root, graph, class_name=type(model).__name__)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    with torch.no_grad():
        _ShapeProp(gm).propagate(*inputs)
    return gm


# in-place tensor methods and functions, and their out-of-place twins
_INPLACE_METHODS = {m: m[:-1] for m in ("relu_", "add_", "sub_", "mul_", "div_", "clamp_", "clamp_min_",
                                         "sigmoid_", "tanh_", "neg_", "hardtanh_", "leaky_relu_")}
_INPLACE_FUNCS = {torch.relu_: torch.relu, torch.nn.functional.relu_: torch.nn.functional.relu,
                  torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}


def out_of_place(gm: GraphModule) -> GraphModule:
    """Make every op of ``gm`` write a new tensor (``ReLU(inplace=True)`` → ``ReLU()``, ``x.relu_()`` →
    ``x.relu()``), in place on ``gm``, which is returned.

    fxfuse reads intermediate values after later ops have run (pre-activation level outputs, the values
    at a block's inner ops, captured alignment statistics); an in-place activation would overwrite them.
    The function of the model is unchanged. Only fxfuse's own traced copies are rewritten.

    Example:
        >>> import torch, fxfuse
        >>> from fxfuse._trace import out_of_place
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(inplace=True))
        >>> out_of_place(fxfuse.trace(m, torch.randn(1, 2))).get_submodule("1").inplace
        False
    """
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if getattr(mod, "inplace", False) is True:
                mod.inplace = False
        elif node.op == "call_method" and node.target in _INPLACE_METHODS:
            node.target = _INPLACE_METHODS[node.target]
            changed = True
        elif node.op == "call_function":
            if node.target in _INPLACE_FUNCS:
                node.target = _INPLACE_FUNCS[node.target]
                changed = True
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
                changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
