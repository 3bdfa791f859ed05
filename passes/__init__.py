"""torch.fx graph passes of fxfuse.

Analysis passes return frozen plans and only annotate ``node.meta["fxfuse"]``;
rewriting passes return new GraphModules and never mutate their input.
"""

from ._partition import Level, LevelPlan, partition_levels
from ._spaces import NeuronSpace, NeuronSpaces, check_neuron_spaces, neuron_spaces, permute

__all__ = [
    "Level",
    "LevelPlan",
    "NeuronSpace",
    "NeuronSpaces",
    "check_neuron_spaces",
    "neuron_spaces",
    "partition_levels",
    "permute",
]
