"""One validated configuration for a fusion, and the training settings shared by every fit.

Python keyword arguments (:func:`fxfuse.fuse`) and the command line are views of
:class:`FuseConfig`; it is validated once, before any work, and every error
names the argument.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._importance import CONDUCTANCE_STEPS

__all__ = ["TrainConfig", "FuseConfig", "make_config", "OPTION_DEFAULTS", "OBJECTIVES", "MATCHES"]

OBJECTIVES = ("distill", "ce")
MATCHES = ("correlation", "inner")
# which logit of each sample conductance and DeepLift attribute (option importance_target)
IMPORTANCE_TARGETS = ("labels", "ensemble", "own")
BLOCK_SOLVERS = ("closed-form", "gradient")
STARTS = ("first", "closed-form")
REGULARISATIONS = ("gcv", "pinv")
HF_COSTS = ("squared", "distance")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a gradient fit (Adam), shared by level fits, distillation and NP Merge.

    Defaults follow "Model Fusion via Neuron Interpolation", Table 5, Setting 1.

    Attributes:
        epochs: Passes over the training samples (0 keeps the start).
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        batch_size: Training batch.
        val_split: Fraction of samples held out for early stopping; 0 trains on all
            and keeps the final parameters.
        patience: Epochs without a better validation loss before stopping.
        noise: Relative perturbation of the start parameters (× each tensor's std).
        seed: Seed of the split, the batch order and the noise.

    Example:
        >>> from fxfuse._config import TrainConfig
        >>> TrainConfig(epochs=5).replace(lr=0.01).lr
        0.01
    """

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    val_split: float = 0.1
    patience: int = 10
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("epochs", 0), ("batch_size", 1), ("patience", 1)):
            _check_int(name, getattr(self, name), lo)
        _check_int("seed", self.seed, None)
        for name in ("lr", "weight_decay", "noise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                kind = "positive" if name == "lr" else "non-negative"
                raise ValueError(f"option {name} must be a {kind} number, got {v!r}")
        if isinstance(self.val_split, bool) or not isinstance(self.val_split, (int, float)) or not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"option val_split must be in [0, 1), got {self.val_split!r}")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_int(name: str, v: Any, lo: int | None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"option {name} must be an int, got {type(v).__name__} {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"option {name} must be an int >= {lo}, got {v!r}")


_TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("batch_size", "seed"))

# every keyword option of fxfuse.fuse and its default; `train_batch_size` maps to TrainConfig.batch_size
OPTION_DEFAULTS: dict[str, Any] = {
    "reset_bn": False,  # vanilla / git-rebasin / otfusion: recompute BatchNorm statistics on the fusion data
    "class_weights": None,  # ensemble: per-class weights of each model, (n_models, n_classes)
    "target": None,  # nn.Module with the fused architecture; default: models[0]
    "max_rows": 50_000,  # rows (samples × positions) per activation that alignment costs are summed over
    "batch_size": 256,  # inference batch
    "memory_budget": 256 << 20,  # bytes of level outputs cached between levels; beyond it they are recomputed
    "n_init": 5,  # k-means restarts (greedy k-means++ seeding, kernel form)
    "importance_steps": CONDUCTANCE_STEPS,  # conductance integration steps (the reference implementation's)
    "importance_target": "own",  # attributed logit: each model's own prediction, the "labels", or the "ensemble"'s
    "objective": "distill",  # np-merge: "distill" (KL to the ensemble's mean softmax, no labels) or "ce" (labels)
    "temperature": 1.0,  # np-merge distill: softmax temperature of teacher and student
    "match": "correlation",  # activation matching cost: "correlation" (standardised) or "inner" (raw L2)
    "blocks": "closed-form",  # *-linear: block levels op by op in closed form, or "gradient" (the whole level by Adam)
    "start": "closed-form",  # *-gradient: Adam starts from the closed form where one exists, or models[0]'s ("first")
    "cla_samples": 256,  # models of different depth: samples whose level outputs cross-layer alignment compares
    "regularisation": "gcv",  # closed-form levels: ridge by generalised cross-validation, or "pinv" (the reference's)
    "hf_cost": "squared",  # hf-*: the paper's squared pair cost (Eq. 7), or "distance" (the reference's unsquared one)
    "held_out": 0.0,  # fraction of the fusion samples kept out of every fit, on which per-op and level errors are measured
    "train_batch_size": 32,
    **{name: getattr(TrainConfig(), name) for name in _TRAIN_FIELDS},
}


@dataclass(frozen=True, eq=False)
class FuseConfig:
    """Every setting of one fusion, validated (see :func:`make_config`).

    Attributes:
        method: A name in :data:`fxfuse._methods.METHODS`.
        importance: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.
        device: Where to compute.
        seed: Seed of every random choice.
        progress: Show progress bars and print the report.
        target: A model whose architecture the fused model takes, or None (``models[0]``).
        reset_bn: Recompute BatchNorm statistics after vanilla, git-rebasin or otfusion.
        class_weights: Per-class weights of the ensemble, or None.
        max_rows: Rows per activation that permutation alignment sums its costs over.
        batch_size: Inference batch.
        memory_budget: Bytes of level outputs the collector may cache.
        n_init: k-means restarts.
        importance_steps: Integration steps of conductance (default 10, as the reference implementation).
        importance_target: Which logit of each fusion sample conductance and DeepLift attribute: ``"own"`` (the
            class each scored model itself predicts; the default, needs no labels), ``"labels"`` (its label, as
            the reference implementation) or ``"ensemble"`` (the class the base models' ensemble predicts).
        objective: NP Merge's loss: ``"distill"`` or ``"ce"``.
        temperature: Softmax temperature of the ``"distill"`` objective.
        match: Activation-matching cost of the permutation methods: ``"correlation"`` or ``"inner"``.
        blocks: How the ``*-linear`` methods solve levels that are blocks of Linear/Conv2d (+ BatchNorm)
            ops: ``"closed-form"`` (op by op, :mod:`fxfuse._blocks`) or ``"gradient"`` (the whole level).
        start: Where the ``*-gradient`` methods start a level's fit: ``"first"`` (models[0]'s or the
            target's weights) or ``"closed-form"`` (the ``*-linear`` solution, where one exists).
        cla_samples: Models of different depth: how many fusion samples the cross-layer alignment's
            linear CKA compares level outputs on (CLAFusion uses 200).
        regularisation: How every op solved in closed form is regularised (a level solved as one op, and each op
            of a block level, channel by channel for per-channel ones): ``"gcv"`` (a ridge towards the start
            weights, chosen by generalised cross-validation) or ``"pinv"`` (no ridge: the minimum-norm
            pseudo-inverse solution at the default rank cut-off, and grouping on its projection, as the
            reference implementation computes it).
        hf_cost: The pair cost of Hungarian grouping: ``"squared"`` (the paper's Eq. 7) or ``"distance"``
            (unsquared, the reference implementation's).
        held_out: Fraction of the fusion samples (0 ≤ f < 0.5) that no fit sees: every level and every op of a
            block level is fitted on the rest, and its relative error against its grouped targets is also
            measured on these samples (``held_out_error`` in the report). 0 (default): every sample fits.
        train: Settings of gradient fits.
    """

    method: str
    importance: str
    device: torch.device
    seed: int
    progress: bool
    target: nn.Module | None
    reset_bn: bool
    class_weights: Any
    max_rows: int
    batch_size: int
    memory_budget: int
    n_init: int
    importance_steps: int
    objective: str
    temperature: float
    match: str
    blocks: str
    start: str
    cla_samples: int
    held_out: float
    train: TrainConfig
    regularisation: str = "gcv"
    hf_cost: str = "squared"
    importance_target: str = "own"

    @property
    def score_target(self) -> str:
        """What :func:`fxfuse._importance.node_scores` attributes in this fusion: ``"own"``, or ``"labels"`` (also
        for ``"ensemble"``, whose predictions ``prepare`` puts in the data's labels)."""
        return "own" if self.importance_target == "own" else "labels"

    @property
    def uses_labels(self) -> bool:
        """Whether this fusion reads the data's labels (NP Merge's ``"ce"`` objective, non-uniform importance)."""
        from ._methods import get_method

        spec = get_method(self.method)
        return (spec.uses_objective and self.objective == "ce") or (
            self.importance != "uniform" and self.importance_target == "labels")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def make_config(
    method: str,
    importance: str = "uniform",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> FuseConfig:
    """Validate fusion arguments into one :class:`FuseConfig`, before any work is done.

    Method-specific defaults (e.g. NP Merge's lr 0.01 for 10 epochs) apply
    under the user's options.

    Raises:
        ValueError: unknown method or importance, or an option out of range.
        TypeError: unknown option, or an option of the wrong type.

    Example:
        >>> from fxfuse._config import make_config
        >>> make_config("np-merge", device="cpu").train.lr
        0.01
    """
    from ._importance import IMPORTANCES
    from ._methods import METHODS, get_method

    spec = get_method(method)
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; valid importance scores: {', '.join(IMPORTANCES)}")
    unknown = [k for k in options if k not in OPTION_DEFAULTS]
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTION_DEFAULTS)}")
    _check_int("seed", seed, None)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    opts = {**OPTION_DEFAULTS, **spec.defaults, **options}
    for name, lo in (("max_rows", 1), ("batch_size", 1), ("n_init", 1), ("importance_steps", 2), ("memory_budget", 0),
                     ("cla_samples", 2)):
        _check_int(name, opts[name], lo)
    if opts["target"] is not None and not isinstance(opts["target"], nn.Module):
        raise TypeError(f"option target must be an nn.Module, got {type(opts['target']).__name__}")
    for name, valid in (("objective", OBJECTIVES), ("match", MATCHES)):
        if opts[name] not in valid:
            raise ValueError(f"option {name} must be one of {', '.join(map(repr, valid))}, got {opts[name]!r}")
        if name in options and not getattr(spec, f"uses_{name}"):
            users = ", ".join(m.name for m in METHODS.values() if getattr(m, f"uses_{name}"))
            raise ValueError(f"{method} has no {name} option (it applies to {users}); remove it")
    if opts["blocks"] not in BLOCK_SOLVERS:
        raise ValueError(f"option blocks must be one of {', '.join(map(repr, BLOCK_SOLVERS))}, got {opts['blocks']!r}")
    if "blocks" in options and spec.solver != "linear":
        users = ", ".join(m.name for m in METHODS.values() if m.solver == "linear")
        raise ValueError(f"{method} has no blocks option (it applies to {users}); remove it")
    if opts["start"] not in STARTS:
        raise ValueError(f"option start must be one of {', '.join(map(repr, STARTS))}, got {opts['start']!r}")
    if "start" in options and spec.solver != "gradient":
        users = ", ".join(m.name for m in METHODS.values() if m.solver == "gradient")
        raise ValueError(f"{method} has no start option (it applies to {users}); remove it")
    for name, valid, applies, users_of in (
        ("regularisation", REGULARISATIONS, spec.levelwise and spec.solver in ("linear", "gradient"),
         lambda m: m.levelwise and m.solver in ("linear", "gradient")),
        ("hf_cost", HF_COSTS, spec.grouping == "hf", lambda m: m.grouping == "hf"),
    ):
        if opts[name] not in valid:
            raise ValueError(f"option {name} must be one of {', '.join(map(repr, valid))}, got {opts[name]!r}")
        if name in options and not applies:
            users = ", ".join(m.name for m in METHODS.values() if users_of(m))
            raise ValueError(f"{method} has no {name} option (it applies to {users}); remove it")
    it = opts["importance_target"]
    if it not in IMPORTANCE_TARGETS:
        raise ValueError(f"option importance_target must be one of {', '.join(map(repr, IMPORTANCE_TARGETS))}, "
                         f"got {it!r}")
    if "importance_target" in options and importance == "uniform":
        raise ValueError(f"option importance_target={it!r} chooses what conductance and DeepLift attribute; "
                         "importance='uniform' attributes nothing: pass importance='conductance' or 'deeplift', "
                         "or remove the option")
    t = opts["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"option temperature must be a positive number, got {t!r}")
    h = opts["held_out"]
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 0.5:
        raise ValueError(f"option held_out must be a fraction of the fusion samples in [0, 0.5), got {h!r}")
    if h and not (spec.levelwise and spec.solver in ("linear", "gradient")):
        users = ", ".join(m.name for m in METHODS.values() if m.levelwise and m.solver in ("linear", "gradient"))
        raise ValueError(f"{method} has no held_out option (it applies to {users}); remove it")
    if not isinstance(opts["reset_bn"], bool):
        raise TypeError(f"option reset_bn must be True or False, got {opts['reset_bn']!r}")
    train = TrainConfig(batch_size=opts["train_batch_size"], seed=seed, **{k: opts[k] for k in _TRAIN_FIELDS})
    return FuseConfig(
        method=method, importance=importance, device=resolve_device(device), seed=seed, progress=progress,
        target=opts["target"], reset_bn=opts["reset_bn"], class_weights=opts["class_weights"],
        max_rows=opts["max_rows"], batch_size=opts["batch_size"], memory_budget=opts["memory_budget"],
        n_init=opts["n_init"], importance_steps=opts["importance_steps"], objective=opts["objective"],
        temperature=float(t), match=opts["match"], blocks=opts["blocks"], start=opts["start"],
        cla_samples=opts["cla_samples"], held_out=float(h), train=train, regularisation=opts["regularisation"],
        hf_cost=opts["hf_cost"], importance_target=it,
    )
