import pytest
import torch
from torch import nn

import fxfuse
from fxfuse._experiments import make_setting
from fxfuse._train import accuracy
from test_fuse import _data, permuted_convbn, permuted_mlp
from zoo import ConvBN, ResNetTiny, mlp, seeded


def test_vanilla_is_the_parameter_mean():
    a, b = mlp(seed=0), mlp(seed=1)
    fused = fxfuse.fuse([a, b], _data((16,)), method="vanilla", progress=False)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p, (a.get_parameter(name) + b.get_parameter(name)) / 2)


def test_vanilla_reset_bn_recomputes_statistics():
    a, b = seeded(ConvBN, 0), seeded(ConvBN, 1)
    x = _data((3, 8, 8), 64)
    fused = fxfuse.fuse([a, b], x, method="vanilla", reset_bn=True, progress=False)
    feats = fused.get_submodule("conv1")(x)
    torch.testing.assert_close(fused.get_submodule("bn1").running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_ensemble_averages_logits_and_weights_classes():
    a, b = mlp(seed=0), mlp(seed=1)
    x = _data((16,), 8)
    fused = fxfuse.fuse([a, b], x, method="ensemble", progress=False)
    assert isinstance(fused, torch.fx.GraphModule)
    torch.testing.assert_close(fused(x), (a(x) + b(x)) / 2)
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    fused = fxfuse.fuse([a, b], x, method="ensemble", class_weights=w, progress=False)
    ref = torch.stack([a(x)[:, 0], b(x)[:, 1], (a(x)[:, 2] + b(x)[:, 2]) / 2], 1)
    torch.testing.assert_close(fused(x), ref)
    with pytest.raises(ValueError, match="class_weights must be non-negative"):
        fxfuse.fuse([a, b], x, method="ensemble", class_weights=-w, progress=False)


@pytest.mark.parametrize("kind", ["mlp", "convbn", "resnet"])
def test_git_rebasin_recovers_a_permuted_copy(kind):
    if kind == "mlp":
        a = mlp(hidden=(12, 10))
        b, x = permuted_mlp(a), _data((16,), 256)
    elif kind == "convbn":
        a = seeded(ConvBN)
        b, x = permuted_convbn(a), _data((3, 8, 8), 128)
    else:
        a = seeded(ResNetTiny)
        gm = fxfuse.trace(a, _data((3, 8, 8), 2))
        from fxfuse.passes import neuron_spaces, permute

        spaces = neuron_spaces(gm)
        g = torch.Generator().manual_seed(4)
        b = permute(gm, spaces, {s.index: torch.randperm(s.size, generator=g) for s in spaces.free})
        x = _data((3, 8, 8), 128)
    vanilla = fxfuse.fuse([a, b], x, method="vanilla", progress=False)
    fused = fxfuse.fuse([a, b], x, method="git-rebasin", progress=False)
    test = x[:16] + 0.1
    assert not torch.allclose(vanilla(test), a(test), atol=1e-3)  # the permutation matters
    torch.testing.assert_close(fused(test), a(test), rtol=1e-5, atol=1e-5)


def test_git_rebasin_beats_vanilla_on_digits():
    s = make_setting("mlp", split="dirichlet", n_models=2, seed=0)
    xt, yt = s.test
    van = accuracy(fxfuse.fuse(s.models, s.fusion, method="vanilla", progress=False), xt, yt)
    reb = accuracy(fxfuse.fuse(s.models, s.fusion, method="git-rebasin", progress=False), xt, yt)
    print("vanilla", van, "git-rebasin", reb)
    assert reb > van


def test_git_rebasin_with_all_spaces_fixed_names_the_cause():
    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(fxfuse.AlignmentError, match="all 2 are fixed.*model input.*model output"):
        fxfuse.fuse([OneLayer(), OneLayer()], _data((4,)), method="git-rebasin", progress=False)


def test_baselines_refuse_different_architectures():
    with pytest.raises(fxfuse.AlignmentError, match="identical architectures.*kf-linear"):
        fxfuse.fuse([mlp(hidden=(12, 10)), mlp(hidden=(9, 10))], _data((16,)), method="vanilla", progress=False)
