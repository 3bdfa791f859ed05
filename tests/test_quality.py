"""Fusion quality on a seeded non-IID 2-way digits split (paper Table 1 layout).

Thresholds are the issue's: kf-linear ≥ best base; kf-linear and hf-linear ≥
vanilla averaging + 10 points; kf-gradient ≥ best base − 2 points. On this
setting the measured margins are far larger (see the README's benchmark table).
"""

import pytest
import torch

import fxfuse
from fxfuse._experiments import make_setting
from fxfuse._train import accuracy, average_weights, ensemble_accuracy


@pytest.fixture(scope="module", params=["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def setting(request):
    torch.manual_seed(0)
    return request.param, make_setting(request.param, split="dirichlet", n_models=2, seed=0)


def test_fusion_beats_bases_and_vanilla(setting):
    arch, s = setting
    xt, yt = s.test
    bases = [accuracy(m, xt, yt) for m in s.models]
    vanilla = accuracy(average_weights(s.models), xt, yt)
    acc = {
        method: accuracy(fxfuse.fuse(s.models, s.fusion, method=method, progress=False), xt, yt)
        for method in ("hf-linear", "kf-linear", "kf-gradient")
    }
    print(arch, "bases", bases, "vanilla", vanilla, "ensemble", ensemble_accuracy(s.models, xt, yt), acc)
    assert acc["kf-linear"] >= max(bases)
    assert acc["kf-linear"] >= vanilla + 10
    assert acc["hf-linear"] >= vanilla + 10
    assert acc["kf-gradient"] >= max(bases) - 2
