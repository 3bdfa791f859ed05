"""torch.fx graph passes of fxfuse.

Analysis passes return frozen plans and only annotate ``node.meta["fxfuse"]``;
rewriting passes return new GraphModules and never mutate their input.
"""

from ._affine import AffineSpec, Attention, BlockSpec, BlockUnit, affine_spec, attention_heads, block_spec, move_index
from ._depth import DepthAlignment, align_depth, cla_dp, insert_identity, linear_cka, pinned_levels
from ._partition import Level, LevelPlan, partition_levels
from ._rewrite import rewrite_params
from ._spaces import NeuronSpace, NeuronSpaces, check_neuron_spaces, neuron_spaces, permute

__all__ = [
    "AffineSpec",
    "affine_spec",
    "Attention",
    "attention_heads",
    "BlockSpec",
    "BlockUnit",
    "block_spec",
    "move_index",
    "DepthAlignment",
    "align_depth",
    "cla_dp",
    "insert_identity",
    "linear_cka",
    "pinned_levels",
    "Level",
    "LevelPlan",
    "NeuronSpace",
    "NeuronSpaces",
    "check_neuron_spaces",
    "neuron_spaces",
    "partition_levels",
    "permute",
    "rewrite_params",
]
