"""torch.fx graph passes of fxfuse.

Analysis passes return frozen plans and only annotate ``node.meta["fxfuse"]``;
rewriting passes return new GraphModules and never mutate their input.
"""

from ._partition import Level, LevelPlan, partition_levels

__all__ = ["Level", "LevelPlan", "partition_levels"]
