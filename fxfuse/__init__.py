"""fxfuse: fuse trained neural networks into one model, level by level.

The public API is small; everything else lives in private modules.

Example:
    >>> import torch, fxfuse
    >>> from fxfuse.passes import partition_levels
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> plan = partition_levels(fxfuse.trace(mlp, torch.randn(2, 4)))
    >>> len(plan)
    2
"""

from ._export import export
from ._finetune import finetune
from ._fuse import fuse
from ._errors import AlignmentError, DumpError, FxFuseError, LabelSkewWarning, PartitionError, TraceError
from ._models import build_model, load_checkpoint, save_checkpoint
from ._trace import trace

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "DumpError",
    "FxFuseError",
    "LabelSkewWarning",
    "PartitionError",
    "TraceError",
    "__version__",
    "build_model",
    "export",
    "finetune",
    "fuse",
    "load_checkpoint",
    "save_checkpoint",
    "trace",
]
