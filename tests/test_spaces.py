import warnings

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.passes import check_neuron_spaces, neuron_spaces, permute
from zoo import TIMM_ZOO, ConvBN, ResNetTiny, mlp, seeded


def test_mlp_spaces():
    spaces = neuron_spaces(fxfuse.trace(mlp(hidden=(12, 10)), torch.randn(2, 16)))
    assert [(s.size, s.tensors) for s in spaces.free] == [
        (12, (("1.bias", 0), ("1.weight", 0), ("3.weight", 1))),
        (10, (("3.bias", 0), ("3.weight", 0), ("5.weight", 1))),
    ]
    fixed = {s.reason for s in spaces if s.fixed}
    assert fixed == {"model input `input_1`", "model output"}
    assert spaces.coverage == "2/4"


def test_residual_stream_is_one_space():
    model = seeded(ResNetTiny)
    spaces = neuron_spaces(fxfuse.trace(model, torch.randn(2, 3, 8, 8)))
    stream = spaces.space_of("stem.weight", 0)
    assert not stream.fixed
    names = {t for t, _ in stream.tensors}
    assert {"blocks.0.conv2.weight", "blocks.0.bn2.running_var", "blocks.1.conv1.weight", "head.weight"} <= names
    assert ("head.weight", 1) in stream.tensors and ("blocks.1.conv1.weight", 1) in stream.tensors


@pytest.mark.parametrize("make,x", [
    (lambda: mlp(), torch.randn(4, 16)),
    (lambda: seeded(ConvBN), torch.randn(4, 3, 8, 8)),
    (lambda: seeded(ResNetTiny), torch.randn(4, 3, 8, 8)),
], ids=["mlp", "convbn", "resnet"])
def test_permute_preserves_function_and_copies(make, x):
    model = make().double()
    x = x.double()
    gm = fxfuse.trace(model, x)
    spaces = neuron_spaces(gm)
    gen = torch.Generator().manual_seed(3)
    perms = {s.index: torch.randperm(s.size, generator=gen) for s in spaces.free}
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    out = permute(gm, spaces, perms)
    assert out is not gm
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k])  # the input is not mutated
    assert any(not torch.equal(out.state_dict()[k], before[k]) for k in before)  # something moved
    torch.testing.assert_close(out(x), gm(x), rtol=1e-10, atol=1e-10)


def test_permute_rejects_fixed_spaces_and_bad_perms():
    gm = fxfuse.trace(mlp(), torch.randn(2, 16))
    spaces = neuron_spaces(gm)
    fixed = next(s for s in spaces if s.fixed)
    with pytest.raises(ValueError, match=f"space {fixed.index} is fixed \\(model"):
        permute(gm, spaces, {fixed.index: torch.arange(fixed.size)})
    free = spaces.free[0]
    with pytest.raises(ValueError, match="must be a permutation"):
        permute(gm, spaces, {free.index: torch.zeros(free.size, dtype=torch.long)})


def test_unknown_ops_fix_their_spaces_and_warn():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(torch.cumsum(self.fc1(x), dim=-1))  # cumsum mixes neurons

    gm = fxfuse.trace(Weird(), torch.randn(2, 4))
    with pytest.warns(UserWarning, match="no handler for cumsum"):
        spaces = neuron_spaces(gm)
    assert spaces.unknown_ops == ("cumsum",)
    assert spaces.space_of("fc1.weight", 0).fixed and "cumsum" in spaces.space_of("fc1.weight", 0).reason
    check_neuron_spaces(gm, torch.randn(3, 4))


def test_module_subclass_with_extra_tensors_is_not_permuted():
    class GainConv(nn.Conv2d):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

        def forward(self, x):
            return nn.functional.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding)

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), GainConv(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    net(x)
    gm = fxfuse.trace(net, x, leaf_modules=(GainConv,))
    with pytest.warns(UserWarning, match="GainConv"):
        spaces = check_neuron_spaces(gm, x)
    assert not any(t == "2.weight" or t == "2.gain" for s in spaces.free for t, _ in s.tensors)
    assert spaces.space_of("0.weight", 0).fixed  # its output feeds the unknown module


# free / all neuron spaces at the zoo's sizes (a snapshot: fewer free spaces is a regression).
# Fixed spaces come from timm's fused qkv/heads reshapes, concatenations (DenseNet, GhostNet),
# grouped convs (RegNet), opaque leaves (VGG's ConvMlp, MobileViT blocks) and Swin's windows.
COVERAGE = {
    "resnet18": "12/14", "resnet34": "20/22", "resnet50": "37/39", "resnet10t": "10/12", "vgg11": "7/11",
    "vgg16": "12/16", "vit_tiny_patch16_224": "13/40", "deit_tiny_patch16_224": "13/40", "convnext_atto": "16/18",
    "efficientnet_b0": "40/42", "mobilenetv3_small_100": "27/29", "regnetx_002": "5/33", "densenet121": "58/184",
    "mixer_s16_224": "17/20", "poolformer_s12": "16/18", "ghostnet_100": "9/65", "levit_128s": "17/62",
    "mobilevit_xxs": "10/18", "swin_tiny_patch4_window7_224": "12/104",
}


@pytest.mark.parametrize("name", list(TIMM_ZOO))
def test_self_check_on_timm_zoo(name, record_property):
    size = TIMM_ZOO[name]
    torch.manual_seed(0)
    model, _ = fxfuse.build_model(name, input_size=(3, size, size), num_classes=10)
    model = model.double()
    for m in model.modules():  # non-trivial BatchNorm statistics, so a wrong permutation shows
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    gm = fxfuse.trace(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown-op warnings are expected on some architectures
        spaces = check_neuron_spaces(gm, x, rtol=1e-9, atol=1e-9)
    record_property("coverage", spaces.coverage)
    print(f"{name}: {spaces.coverage} free; unknown ops: {list(spaces.unknown_ops)}")
    assert spaces.coverage == COVERAGE[name]

