"""Every timm architecture of the zoo traces, partitions, and its levels chain back to the model."""

import pytest
import torch

import fxfuse
from fxfuse.passes import partition_levels
from zoo import TIMM_ZOO

N_CLASSES = 10

# Level counts at the zoo's input sizes. Transformer blocks whose graph can be
# cut between attention and MLP (ViT, DeiT, Mixer, LeViT) give two levels per
# block; Swin reads H and W at the block's start, so its blocks stay whole.
EXPECTED_LEVELS = {
    "resnet18": 10, "resnet34": 18, "resnet50": 18, "resnet10t": 8, "vgg11": 10, "vgg16": 15,
    "vit_tiny_patch16_224": 26, "deit_tiny_patch16_224": 26, "convnext_atto": 17,
    "efficientnet_b0": 39, "mobilenetv3_small_100": 28, "regnetx_002": 15, "densenet121": 9,
    "mixer_s16_224": 18, "poolformer_s12": 17, "ghostnet_100": 20, "levit_128s": 27,
    "mobilevit_xxs": 21, "swin_tiny_patch4_window7_224": 17,
}


@pytest.mark.parametrize("name", list(TIMM_ZOO))
def test_timm_model_traces_partitions_and_chains(name):
    size = TIMM_ZOO[name]
    torch.manual_seed(0)
    model, _ = fxfuse.build_model(name, input_size=(3, size, size), num_classes=N_CLASSES)
    model = model.double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)

    gm = fxfuse.trace(model, x)
    plan = partition_levels(gm)
    assert len(plan) == EXPECTED_LEVELS[name]

    y = x
    for lv, level_module in zip(plan, plan.split()):
        y = level_module(y)
        assert tuple(y.shape) == lv.output_shape, lv
        # neurons sit channels-first or channels-last, never on the batch dim
        assert lv.neuron_axis in (1, y.ndim - 1), lv
        assert y.shape[lv.neuron_axis] == lv.width, lv
    torch.testing.assert_close(y, model(x), rtol=1e-10, atol=1e-10)

    head = plan[-1]
    assert head.is_head and head.width == N_CLASSES and head.output_shape == (2, N_CLASSES)
    assert not any(lv.is_head for lv in plan[:-1])
    owned = [p for lv in plan for p in lv.params]
    assert len(owned) == len(set(owned))
    assert all(lv.params for lv in plan), "every level owns parameters"
