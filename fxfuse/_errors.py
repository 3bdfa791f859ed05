"""Exception hierarchy of fxfuse.

Every error fxfuse raises on purpose is an :class:`FxFuseError` (or a plain
``ValueError``/``TypeError`` for bad arguments). Messages say what went wrong,
where (node, module path, level), what was received, and how to fix it.
"""

from __future__ import annotations

__all__ = ["FxFuseError", "TraceError", "PartitionError", "AlignmentError", "DumpError", "LabelSkewWarning"]


class FxFuseError(RuntimeError):
    """Base class of all fxfuse errors."""


class TraceError(FxFuseError):
    """A model could not be traced with torch.fx or run on its example inputs."""


class PartitionError(FxFuseError):
    """A traced graph could not be cut into levels."""


class AlignmentError(FxFuseError):
    """Models could not be aligned level by level (depth or width mismatch)."""


class DumpError(FxFuseError):
    """A level plan could not be rendered in the requested format."""


class LabelSkewWarning(UserWarning):
    """The fusion labels miss classes of the models' output or are far from uniform.

    Methods that learn from labels then learn the sample's class prior; the
    message names the missing classes and the label-free choice.
    """


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` that points at the first caller outside fxfuse (its
    package and its ``fxfuse.passes`` subpackage), however deep inside fxfuse the warning is raised."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    roots = [here]
    passes = sys.modules.get("fxfuse.passes")
    if passes is not None and getattr(passes, "__file__", None):
        roots.append(os.path.dirname(os.path.abspath(passes.__file__)))
    level, frame = 1, sys._getframe(1)
    while frame is not None and any(os.path.abspath(frame.f_code.co_filename).startswith(r + os.sep) for r in roots):
        frame = frame.f_back
        level += 1
    return level
