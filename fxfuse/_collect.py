"""Fusion data as a stream of batches, and the one collector of level activations.

Every method reads the fusion data through :class:`FusionData` and every level
activation through :class:`Collector`, so memory is bounded by the batch size
and an explicit cache budget, never by the number of samples (DESIGN.md,
"One collector").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter

__all__ = ["FusionData", "Collector", "Capture", "LABEL_RULES"]

LABEL_RULES = """\
Data forms: a Tensor of inputs (n_samples, ...); a tuple (inputs, labels) of two
Tensors; a dict {"inputs": ..., "labels": ...}; or an iterable (a list, a
DataLoader) whose items are Tensors, (inputs, labels) pairs or such dicts. A
tuple of two Tensors is always (inputs, labels); a list is always a sequence of
batches. A batch from an iterable may also be (inputs,) or (inputs, labels,
extras...), as DataLoaders over datasets yield; extras are ignored. Labels are class indices: an integer Tensor of shape (n_samples,)
(int32 and other integer types are converted to int64), each in
[0, n_classes)."""


def _check_labels(y: Any, n: int, where: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"{where}: labels must be a Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        hint = " (one-hot labels? pass labels.argmax(1))" if y.ndim == 2 else ""
        raise ValueError(
            f"{where}: labels must be integer class indices, got dtype {y.dtype} with shape {tuple(y.shape)}{hint}"
        )
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must have shape (n_samples,), got {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{where}: {y.shape[0]} labels for {n} inputs; give one label per input sample")
    return y.long()


def _check_inputs(x: Any, where: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: inputs must be a Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"{where}: inputs of shape {tuple(x.shape)} have no batch dimension; inputs are (n_samples, ...), "
            "e.g. x.unsqueeze(0) for a single sample"
        )
    if x.is_floating_point():
        for s in range(0, x.shape[0], 1024):  # in slices: no mask as large as the data
            if not bool(torch.isfinite(x[s : s + 1024]).all()):
                raise ValueError(f"{where}: inputs contain NaN or Inf values (near sample {s}); clean the inputs "
                                 "before fusing")
    return x


def _split_item(item: Any, where: str) -> tuple[Tensor, Tensor | None]:
    """One batch or one whole data set as (inputs, labels or None)."""
    if isinstance(item, Tensor):
        return _check_inputs(item, where), None
    if isinstance(item, dict):
        if "inputs" not in item:
            raise ValueError(f"{where}: a dict must hold 'inputs' (and optionally 'labels'), got keys {sorted(item)}")
        unknown = sorted(set(item) - {"inputs", "labels"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a data dict holds 'inputs' and 'labels'")
        x = _check_inputs(item["inputs"], where)
        y = item.get("labels")
        return x, (None if y is None else _check_labels(y, x.shape[0], where))
    if isinstance(item, (tuple, list)) and len(item) >= 1 and isinstance(item[0], Tensor):
        x = _check_inputs(item[0], where)
        y = item[1] if len(item) > 1 else None  # (inputs,), (inputs, labels), (inputs, labels, extras...)
        return x, (None if y is None else _check_labels(y, x.shape[0], where))
    raise TypeError(
        f"{where} is a {type(item).__name__}; expected a Tensor, an (inputs, labels) pair or a dict. {LABEL_RULES}"
    )


class _Masked:
    """The samples of a re-iterable stream of batches that a seeded per-batch draw keeps (or holds out)."""

    def __init__(self, source: Iterable, fraction: float, seed: int, held: bool):
        self.source, self.fraction, self.seed, self.held = source, fraction, seed, held

    def __iter__(self):
        for b, item in enumerate(self.source):
            x, y = _split_item(item, f"batch {b}")
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            mask = torch.rand(x.shape[0], generator=g) < self.fraction
            if not self.held:
                mask = ~mask
            if bool(mask.any()):
                idx = mask.nonzero().flatten()
                yield x[idx.to(x.device)] if y is None else (x[idx.to(x.device)], y[idx.to(y.device)])


class FusionData:
    """Fusion data as a re-iterable stream of ``(inputs, labels or None)`` batches.

    A Tensor, an ``(inputs, labels)`` tuple or a dict is sliced into batches; a
    DataLoader or other re-iterable is iterated again on every pass and never
    held whole (only its first batch is read up front; the others are checked as
    they stream); a one-shot iterator (a generator) is read once and kept.

    Args:
        data: See :data:`LABEL_RULES`.
        what: Name of the argument, for error messages.

    Example:
        >>> import torch
        >>> from fxfuse._collect import FusionData
        >>> d = FusionData((torch.randn(10, 3), torch.arange(10) % 2))
        >>> [tuple(x.shape) for x, _ in d.batches(4)]
        [(4, 3), (4, 3), (2, 3)]
    """

    def __init__(self, data: Any, what: str = "data"):
        self.what = what
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._source: Iterable | None = None
        self.n_classes: int | None = None
        self.input_dtype: torch.dtype | None = None  # floating inputs are cast to it (half-precision models)
        if isinstance(data, (Tensor, dict)) or (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor)):
            self._x, self._y = _split_item(data, what)
            if self._x.shape[0] == 0:
                raise ValueError(f"{what} is empty: fusion needs at least one input sample")
            self.has_labels = self._y is not None
            self.n_samples = self._x.shape[0]
            self.example = self._x[:2]
            return
        if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
            raise TypeError(f"{what} must be a Tensor, a tuple, a dict, or an iterable of batches; got "
                            f"{type(data).__name__}. {LABEL_RULES}")
        if isinstance(getattr(data, "sampler", None), torch.utils.data.RandomSampler):
            raise ValueError(
                f"{what} is a DataLoader with shuffle=True; fusion reads the data several times and pairs the "
                "passes batch by batch, so it needs the same order each time: pass shuffle=False"
            )
        if iter(data) is data:  # one-shot iterator: read it once
            data = list(data)
        self._source = data
        # only the first batch is read here: the rest is checked as it streams
        first = next(iter(data), None)
        if first is None:
            raise ValueError(f"{what} is empty: fusion needs at least one input sample")
        x, y = _split_item(first, f"{what}: batch 0")
        self.has_labels = y is not None
        self.example = x[:2]
        dataset = getattr(data, "dataset", None)
        if isinstance(data, (list, tuple)):  # batches in memory: count them now
            self.n_samples = sum(_split_item(item, f"{what}: batch {i}")[0].shape[0] for i, item in enumerate(data))
        else:  # None: not known before a pass
            self.n_samples = len(dataset) if hasattr(dataset, "__len__") else None

    def split(self, fraction: float, seed: int = 0) -> tuple[FusionData, FusionData]:
        """Two disjoint parts: ``(fit, held_out)``, the second with about ``fraction`` of the samples, chosen at
        random (seeded). Streamed data is split batch by batch, the same way on every pass.

        Example:
            >>> import torch
            >>> from fxfuse._collect import FusionData
            >>> fit, held = FusionData(torch.randn(10, 3)).split(0.2)
            >>> fit.n_samples, held.n_samples
            (8, 2)
        """
        if self._x is not None:
            n = self.n_samples
            if n < 2:
                raise ValueError(f"held_out: {self.what} has {n} sample; it needs at least 2 to keep some out of the fit")
            n_held = min(n - 1, max(1, round(n * fraction)))
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            parts = []
            for idx in (perm[n_held:].sort().values, perm[:n_held].sort().values):
                x = self._x[idx]
                parts.append(FusionData(x if self._y is None else (x, self._y[idx]), self.what))
        else:
            parts = [FusionData(_Masked(self._source, fraction, seed, held), self.what) for held in (False, True)]
        for p in parts:
            p.n_classes, p.input_dtype = self.n_classes, self.input_dtype
        return parts[0], parts[1]

    def n_batches(self, batch_size: int = 256) -> int | None:
        """How many batches :meth:`batches` yields with ``batch_size``, or None when that is not known before a
        pass (a DataLoader keeps its own batch size: its ``len``)."""
        if self._x is not None:
            return -(-self.n_samples // batch_size)
        return len(self._source) if hasattr(self._source, "__len__") else None

    def batches(self, batch_size: int = 256, device: torch.device | str | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Yield ``(inputs, labels or None)`` on ``device``; a DataLoader keeps its own batch size."""
        if self._x is not None:
            for s in range(0, self.n_samples, batch_size):
                y = None if self._y is None else self._y[s : s + batch_size]
                yield self._to(self._x[s : s + batch_size], y, device, s)
            return
        seen = 0
        for i, item in enumerate(self._source):
            x, y = _split_item(item, f"{self.what}: batch {i}")
            if (y is not None) != self.has_labels:
                raise ValueError(f"{self.what}: some batches have labels and some do not (batch {i})")
            yield self._to(x, y, device, seen)
            seen += x.shape[0]
        if seen == 0:
            raise ValueError(f"{self.what} is empty: fusion needs at least one input sample")

    def _to(self, x: Tensor, y: Tensor | None, device, start: int) -> tuple[Tensor, Tensor | None]:
        if y is not None and self.n_classes is not None and y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.n_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{self.what}: label {bad} (near sample {start}) is out of range for models with "
                    f"{self.n_classes} classes; labels must be in [0, {self.n_classes})"
                )
        if self.input_dtype is not None and x.is_floating_point():
            x = x.to(self.input_dtype)
        if device is not None:
            x = x.to(device)
            y = None if y is None else y.to(device)
        return x, y

    def materialise(self, max_samples: int | None = None, device=None) -> tuple[Tensor, Tensor | None]:
        """The first ``max_samples`` samples as whole Tensors (for methods that need every row at once)."""
        xs, ys, n = [], [], 0
        for x, y in self.batches(256, device):
            if max_samples is not None and n + x.shape[0] > max_samples:
                x, y = x[: max_samples - n], (None if y is None else y[: max_samples - n])
            xs.append(x)
            if y is not None:
                ys.append(y)
            n += x.shape[0]
            if max_samples is not None and n >= max_samples:
                break
        return torch.cat(xs), (torch.cat(ys) if ys else None)

    def label_counts(self, n_classes: int) -> Tensor:
        """How many samples carry each label: Tensor of shape (n_classes,), int64 (one pass over the data)."""
        counts = torch.zeros(n_classes, dtype=torch.int64)
        for _, y in self.batches(256):
            if y is not None:
                counts += torch.bincount(y.reshape(-1).long().cpu(), minlength=n_classes)[:n_classes]
        return counts

    def with_labels(self, make: Callable[[Tensor], Tensor], replace: bool = False) -> FusionData:
        """A view whose unlabelled batches (with ``replace``, all batches) get ``make(inputs)`` as labels (e.g. the
        ensemble's argmax).

        The labels are computed once per batch and kept (n_samples integers).
        """
        if self.has_labels and not replace:
            return self
        view = object.__new__(FusionData)
        view.__dict__.update(self.__dict__)
        view.has_labels = True
        base = self.batches
        made: dict[tuple[int, int], Tensor] = {}

        def batches(batch_size: int = 256, device=None):
            for b, (x, _) in enumerate(base(batch_size, device)):
                if (batch_size, b) not in made:
                    with torch.no_grad():
                        made[(batch_size, b)] = make(x)
                yield x, made[(batch_size, b)]

        view.batches = batches  # type: ignore[method-assign]
        return view


class Collector:
    """Runs chains of level modules over the fusion data, batch by batch.

    Chain ``c`` is a list of level modules (``LevelPlan.split()``); the input of
    level ``i`` on batch ``b`` is the output of level ``i-1``. Outputs are cached
    per batch while the cache holds at most ``budget`` bytes; a batch that is
    not cached is recomputed from the inputs. Peak memory is therefore the
    budget plus one batch per chain, whatever the number of samples.

    Args:
        data: The fusion data.
        chains: One list of level modules per model (the fused model's last).
        batch_size: Inference batch (a DataLoader keeps its own).
        device: Where batches go.
        budget: Cache size in bytes (0: recompute every level from the inputs).

    Example:
        >>> import torch
        >>> from fxfuse._collect import Collector, FusionData
        >>> chain = [torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)]
        >>> col = Collector(FusionData(torch.randn(10, 3)), [chain], batch_size=4)
        >>> [tuple(ins[0].shape) for _, ins, _ in col.inputs(1)]
        [(4, 4), (4, 4), (2, 4)]
    """

    def __init__(self, data: FusionData, chains: Sequence[Sequence[nn.Module]], *, batch_size: int = 256,
                 device=None, budget: int = 256 << 20):
        self.data = data
        self.chains = chains
        self.batch_size = batch_size
        self.device = device
        self.budget = budget
        self._cache: list[dict[int, tuple[int, Tensor]]] = [{} for _ in chains]
        self._bytes = 0
        self.peak_bytes = 0
        self._fingerprints: dict[int, tuple] = {}
        # the fused model's grouping of each level solved so far: level i's input neurons are level i-1's
        self.groupings: dict[int, Any] = {}

    def inputs(self, i: int, which: Sequence[int] | None = None) -> Iterator[tuple[int, list[Tensor], Tensor | None]]:
        """Yield ``(batch index, [input of level i of each chain in which], labels)`` batch by batch.

        ``which`` selects chains by index (default: all).
        """
        which = range(len(self.chains)) if which is None else which
        for b, (x, y) in enumerate(self.data.batches(self.batch_size, self.device)):
            self._check_same(b, x)
            yield b, [self._input(c, i, b, x) for c in which], y

    def _check_same(self, b: int, x: Tensor) -> None:
        """Every pass must serve the same samples as batch ``b`` (cached outputs are paired by batch)."""
        xd = x.detach().to(torch.float64)
        fp = (tuple(x.shape), float(xd.sum()), float((xd * xd).sum()))
        seen = self._fingerprints.setdefault(b, fp)
        if seen[0] != fp[0] or any(abs(u - v) > 1e-6 * max(1.0, abs(u)) for u, v in zip(seen[1:], fp[1:])):
            raise ValueError(
                f"{self.data.what}: batch {b} differs from one pass to the next (shuffling or random "
                "augmentation?); fusion reads the data several times and needs the same samples in the same order "
                "each time: turn shuffling and random transforms off"
            )

    @torch.no_grad()
    def _input(self, c: int, i: int, b: int, x: Tensor) -> Tensor:
        hit = self._cache[c].get(b)
        if hit is not None and hit[0] == i - 1:
            return hit[1]
        start, h = (hit[0] + 1, hit[1]) if hit is not None and hit[0] < i else (0, x)
        for level in self.chains[c][start:i]:
            h = level(h)
        return h

    def store(self, c: int, i: int, b: int, out: Tensor) -> None:
        """Offer chain ``c``'s level-``i`` output on batch ``b`` to the cache (kept if it fits the budget)."""
        old = self._cache[c].pop(b, None)
        if old is not None:
            self._bytes -= old[1].numel() * old[1].element_size()
        size = out.numel() * out.element_size()
        if self._bytes + size <= self.budget:
            self._cache[c][b] = (i, out.detach())
            self._bytes += size
            self.peak_bytes = max(self.peak_bytes, self._bytes)


class Capture(Interpreter):
    """Runs a GraphModule and keeps the values of the named nodes (one batch at a time).

    The engine's traced copies compute out of place (:func:`fxfuse._trace.out_of_place`), so a kept
    value is not overwritten by a later in-place activation.
    """

    def __init__(self, gm: GraphModule, names, *, stop: bool = False):
        super().__init__(gm)
        self.names = {n for n in names if not n.endswith(":pre")}
        # "<node>:pre": a norm-with-activation module's output before its activation (BlockUnit.value)
        self.pre = {n[: -len(":pre")] for n in names if n.endswith(":pre")}
        self.values: dict[str, Tensor] = {}
        self._stop = stop
        self._want = len(self.names) + len(self.pre)

    def run_node(self, n):
        if n.name in self.pre:
            from fxfuse.passes._ops import norm_pre_activation

            x = self.env[n.args[0]]
            self.values[f"{n.name}:pre"] = norm_pre_activation(self.module.get_submodule(str(n.target)), x).detach()
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach()
        if self._stop and len(self.values) == self._want:
            raise _Captured  # every value is kept: the rest of the graph is not needed
        return out

    def capture(self, *args) -> bool:
        """Run on ``args``; with ``stop``, only as far as the last named node. Returns whether it ran to the end
        (then ``values`` has every named value that exists)."""
        if self._stop and self._want == 0:
            return False
        try:
            self.output = self.run(*args)
        except _Captured:
            return False
        return True


class _Captured(Exception):
    """Raised inside :meth:`Capture.run_node` once every named value is kept (``stop=True``)."""


# total variation distance from the uniform class distribution at which labels count as skewed
SKEW_TV = 0.3


def label_skew(counts: Tensor) -> tuple[list[int], float]:
    """The classes absent from ``counts`` and the total variation distance of the label distribution from uniform.

    Example:
        >>> import torch
        >>> from fxfuse._collect import label_skew
        >>> label_skew(torch.tensor([10, 10, 0, 20]))
        ([2], 0.25)
    """
    total = int(counts.sum())
    if total == 0:
        return list(range(len(counts))), 1.0
    p = counts.double() / total
    return [int(c) for c in torch.nonzero(counts == 0).flatten()], round(float((p - 1 / len(p)).abs().sum() / 2), 6)


def warn_label_skew(counts: Tensor, uses: str, fix: str) -> bool:
    """Warn once (:class:`~fxfuse.LabelSkewWarning`) when labels miss classes or are far from uniform.

    Args:
        counts: Samples per class, Tensor of shape (n_classes,).
        uses: What reads the labels, for the message (e.g. ``"np-merge with objective='ce'"``).
        fix: The label-free alternative to suggest.

    Returns:
        Whether it warned.
    """
    import warnings

    from ._errors import LabelSkewWarning, user_stacklevel

    missing, tv = label_skew(counts)
    if not missing and tv < SKEW_TV:
        return False
    shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
    what = f"miss class(es) {shown} of the models' {len(counts)}" if missing else "are far from uniform"
    warnings.warn(
        f"the fusion labels {what} (total variation from uniform {tv:.2f}; counts {counts.tolist()[:20]}"
        f"{' ...' if len(counts) > 20 else ''}); {uses} read(s) them, so the result leans towards this "
        f"sample's classes. {fix}",
        LabelSkewWarning, stacklevel=user_stacklevel(),
    )
    return True
