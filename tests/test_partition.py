import dataclasses
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.fx
from torch import nn

import fxfuse
from fxfuse.passes import Level, LevelPlan, partition_levels
from zoo import ConvBN, ResNetTiny, TupleOutput, TwoInputs, mlp, seeded

GOLDEN = Path(__file__).parent / "golden"


def _plan(model, x):
    return partition_levels(fxfuse.trace(model, x))


def _chain(plan, x):
    for m in plan.split():
        x = m(x)
    return x


def test_mlp_has_one_affine_level_per_linear():
    plan = _plan(mlp(hidden=(12, 10)), torch.randn(4, 16))
    assert [lv.name for lv in plan] == ["1", "3", "5"]
    assert [lv.kind for lv in plan] == ["affine"] * 3
    assert [lv.width for lv in plan] == [12, 10, 3]
    assert [lv.neuron_axis for lv in plan] == [1, 1, 1]
    assert [lv.is_head for lv in plan] == [False, False, True]
    assert plan[1].params == ("3.weight", "3.bias")
    # the ReLU begins the next level: level outputs are pre-activations
    relu = next(n for n in plan.gm.graph.nodes if n.op == "call_module" and n.target == "2")
    assert relu.name in plan[1].nodes and plan[0].output == plan[1].input


def test_batchnorm_folds_into_its_conv_level():
    plan = _plan(seeded(ConvBN), torch.randn(2, 3, 8, 8))
    assert [(lv.name, lv.kind, lv.width) for lv in plan] == [
        ("conv1", "affine", 8),
        ("conv2", "affine", 16),
        ("fc", "affine", 4),
    ]
    assert set(plan[0].params) == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"}
    assert plan[0].output_shape == (2, 8, 8, 8) and plan[0].neuron_axis == 1


def test_residual_blocks_are_single_levels():
    plan = _plan(seeded(ResNetTiny), torch.randn(2, 3, 8, 8))
    assert [(lv.name, lv.kind) for lv in plan] == [
        ("stem", "affine"),
        ("blocks.0", "residual"),
        ("blocks.1", "residual"),
        ("head", "affine"),
    ]


@pytest.mark.parametrize(
    "model,x",
    [
        (mlp(), torch.randn(3, 16)),
        (seeded(ConvBN), torch.randn(2, 3, 8, 8)),
        (seeded(ResNetTiny), torch.randn(2, 3, 8, 8)),
    ],
    ids=["mlp", "convbn", "resnet"],
)
def test_chain_of_levels_reproduces_model_in_float64(model, x):
    model, x = model.double(), x.double()
    plan = _plan(model, x)
    torch.testing.assert_close(_chain(plan, x), model(x), rtol=1e-12, atol=1e-12)
    # each level module returns a tensor of the recorded shape
    y = x
    for lv, m in zip(plan, plan.split()):
        y = m(y)
        assert tuple(y.shape) == lv.output_shape
        assert y.shape[lv.neuron_axis] == lv.width


def test_every_parameter_is_owned_by_exactly_one_level():
    model = seeded(ResNetTiny)
    plan = _plan(model, torch.randn(2, 3, 8, 8))
    owned = [p for lv in plan for p in lv.params]
    assert len(owned) == len(set(owned))
    assert set(owned) == {name for name, _ in model.named_parameters()}
    assert sum(plan.param_count(lv) for lv in plan) == sum(p.numel() for p in model.parameters())


def test_plan_is_frozen_sequence_and_annotates_meta():
    model = mlp()
    gm = fxfuse.trace(model, torch.randn(2, 16))
    code_before = gm.code
    plan = partition_levels(gm)
    assert gm.code == code_before  # analysis only
    assert isinstance(plan, LevelPlan) and len(plan) == 3
    assert isinstance(plan[0], Level) and plan[-1].is_head
    assert [lv.index for lv in plan] == [0, 1, 2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan[0].width = 5
    for lv in plan:
        for name in lv.nodes:
            node = next(n for n in gm.graph.nodes if n.name == name)
            assert node.meta["fxfuse"]["level"] == lv.index


def _snapshot(plan) -> str:
    return "\n".join(f"{lv.index} {lv.name} {lv.kind} {lv.width}" for lv in plan) + "\n"


@pytest.mark.parametrize("name", ["mlp", "resnet18", "vgg11"])
def test_golden_level_snapshots(name):
    if name == "mlp":
        model, x = mlp(), torch.randn(2, 16)
    else:
        model, x = timm.create_model(name, pretrained=False, num_classes=10), torch.randn(2, 3, 32, 32)
    got = _snapshot(_plan(model, x))
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("FXFUSE_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text()


def test_partition_rejects_non_graphmodules():
    with pytest.raises(TypeError, match="fxfuse.trace"):
        partition_levels(mlp())


def test_partition_needs_shape_metadata():
    gm = torch.fx.symbolic_trace(mlp())
    with pytest.raises(fxfuse.PartitionError, match="no shape metadata.*fxfuse.trace"):
        partition_levels(gm)


def test_several_inputs_are_refused_clearly():
    gm = fxfuse.trace(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 5)))
    with pytest.raises(fxfuse.PartitionError, match=r"2 inputs \(x, y\).*exactly one tensor input"):
        partition_levels(gm)


def test_tuple_outputs_are_refused_clearly():
    gm = fxfuse.trace(TupleOutput(), torch.randn(2, 4))
    with pytest.raises(fxfuse.PartitionError, match="returns tuple.*single tensor output"):
        partition_levels(gm)


def test_output_without_neuron_axis_is_refused():
    class Scramble(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(x).reshape(3, 4)  # mixes the batch and neuron dims

    with pytest.raises(fxfuse.PartitionError, match="has no neuron axis.*reshape"):
        _plan(Scramble(), torch.randn(2, 4))


def test_output_independent_of_input_is_refused():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.w * 2

    with pytest.raises(fxfuse.PartitionError, match="does not depend on the input"):
        _plan(Const(), torch.randn(2, 4))
