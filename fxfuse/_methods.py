"""The registry of fusion methods: each names its grouping strategy and its solver, or is a whole-model baseline.

Adding a method is one entry in :data:`METHODS`. The CLI and the benchmarks
build their choices from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Method", "METHODS", "get_method", "LEVELWISE", "BASELINES"]


@dataclass(frozen=True)
class Method:
    """One fusion method.

    Attributes:
        name: The name users pass as ``method=``.
        grouping: For level-wise methods, the grouping strategy
            (:data:`fxfuse._engine.GROUPINGS`: ``"hf"``, ``"kf"``, ``"aligned"``); None
            for whole-model baselines.
        solver: For level-wise methods, the solver (:data:`fxfuse._engine.SOLVERS`:
            ``"linear"``, ``"gradient"``, ``"np"``); for baselines, the function name
            in :mod:`fxfuse._baselines` that builds the model.
        summary: One line for ``--help`` and the docs.
        defaults: Options whose defaults differ for this method (from its paper).
        uses_importance: Whether importance scores change the result.
        n_models: Exactly this many models (None: two or more).
        equal_widths: The models must have equal widths in every level (or space).
        same_parameters: The models must have identical parameter shapes.
        takes_target: Whether ``target=`` (another fused architecture) is allowed.
        one_model: Whether the result is one model of the base architecture (the
            ensemble is not: the CLI cannot save it as a checkpoint).
        pairwise: More than two models are merged in successive pairs.
        uses_objective: Takes the ``objective`` option (NP Merge's loss; ``"ce"`` needs labels).
        uses_match: Aligns neurons by activation matching (takes the ``match`` option).
    """

    name: str
    grouping: str | None
    solver: str
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    uses_importance: bool = True
    n_models: int | None = None
    equal_widths: bool = False
    same_parameters: bool = False
    takes_target: bool = False
    one_model: bool = True
    pairwise: bool = False
    uses_objective: bool = False
    uses_match: bool = False

    @property
    def levelwise(self) -> bool:
        return self.grouping is not None


_ALL = [
    Method("hf-linear", "hf", "linear", "Hungarian matching, closed-form levels (gradient where none exists)",
           n_models=2, equal_widths=True, takes_target=True),
    Method("kf-linear", "kf", "linear", "importance-weighted k-means, closed-form levels (gradient where none exists)",
           takes_target=True),
    Method("kf-gradient", "kf", "gradient", "importance-weighted k-means, every level fitted with Adam",
           takes_target=True),
    Method("hf-gradient", "hf", "gradient", "Hungarian matching, every level fitted with Adam",
           n_models=2, equal_widths=True, takes_target=True),
    Method("vanilla", None, "vanilla", "plain parameter averaging", uses_importance=False, same_parameters=True),
    Method("ensemble", None, "ensemble", "one module averaging the models' logits (n× the cost)",
           uses_importance=False, one_model=False),
    Method("last-layer-kd", None, "last_layer_kd", "models[0] with its head distilled from the mean softmax",
           uses_importance=False),
    Method("git-rebasin", None, "git_rebasin", "activation matching per neuron space, then averaging",
           same_parameters=True, equal_widths=True, uses_match=True),
    Method("otfusion", None, "otfusion", "exact optimal transport per neuron space, then averaging",
           uses_match=True),
    Method("np-merge", None, "np_merge_models",
           "align, then learn per-parameter α (default: distil the ensemble, no labels; objective='ce': labels)",
           defaults={"lr": 1e-2, "epochs": 10, "weight_decay": 0.0, "val_split": 0.0},
           same_parameters=True, equal_widths=True, pairwise=True, uses_objective=True, uses_match=True),
    Method("np-merge-levelwise", "aligned", "np", "label-free NP Merge: α fitted level by level to the level targets",
           defaults={"lr": 1e-2}, equal_widths=True, pairwise=True, uses_match=True),
]

METHODS: dict[str, Method] = {m.name: m for m in _ALL}
LEVELWISE = tuple(m.name for m in _ALL if m.levelwise)
BASELINES = tuple(m.name for m in _ALL if not m.levelwise)


def get_method(name: Any) -> Method:
    """The registered method called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.

    Example:
        >>> from fxfuse._methods import get_method
        >>> get_method("kf-linear").grouping, get_method("kf-linear").solver
        ('kf', 'linear')
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]
