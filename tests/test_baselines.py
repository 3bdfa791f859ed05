import copy

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse._experiments import make_setting
from test_fuse import _data, permuted_convbn, permuted_mlp
from zoo import ConvBN, ResNetTiny, mlp, seeded


def _permuted_copy(model, x, seed=4):
    from fxfuse.passes import neuron_spaces, permute

    gm = fxfuse.trace(model, x[:2])
    spaces = neuron_spaces(gm)
    g = torch.Generator().manual_seed(seed)
    return permute(gm, spaces, {s.index: torch.randperm(s.size, generator=g) for s in spaces.free})


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


@pytest.mark.parametrize("importance,match", [("uniform", "correlation"), ("uniform", "inner"),
                                              ("conductance", "correlation")])
@pytest.mark.parametrize("method", ["git-rebasin", "otfusion"])
@pytest.mark.parametrize("kind", ["mlp", "convbn", "resnet"])
def test_alignment_methods_recover_a_permuted_copy(kind, method, importance, match):
    if kind == "mlp":
        a = mlp(hidden=(12, 10))
        b, x = permuted_mlp(a), _data((16,), 256)
    elif kind == "convbn":
        a = seeded(ConvBN)
        b, x = permuted_convbn(a), _data((3, 8, 8), 128)
    else:
        a = seeded(ResNetTiny)
        x = _data((3, 8, 8), 128)
        b = _permuted_copy(a, x)
    vanilla = fxfuse.fuse([a, b], x, method="vanilla", progress=False)
    # conductance needs targets: the data's labels (here the model's own predictions)
    data = (x, a(x).argmax(-1)) if importance != "uniform" else x
    fused = fxfuse.fuse([a, b], data, method=method, importance=importance, match=match, progress=False)
    test = x[:16] + 0.1
    assert not torch.allclose(vanilla(test), a(test), atol=1e-3)  # the permutation matters
    # otfusion with importance marginals goes through the exact transport plan, not Hungarian
    torch.testing.assert_close(fused(test), a(test), rtol=1e-5, atol=1e-5)


def test_correlation_costs_are_distances_of_standardised_activations():
    from fxfuse._align import _distances

    g = torch.Generator().manual_seed(0)
    n = 500
    a = torch.randn(n, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.1, 2.0, 1.0]) + 4.0
    b = torch.randn(n, 4, generator=g, dtype=torch.float64) * 5.0 - 1.0
    b[:, 1] = 2.0 * a[:, 1] + 7.0  # perfectly correlated, other scale and offset: cost 0
    a[:, 4] = 3.0  # a constant neuron: the zero vector after standardising
    b[:, 3] = 0.0
    sums = (a.pow(2).sum(0), b.pow(2).sum(0), a.T @ b, a.sum(0), b.sum(0))

    def standardise(v):
        std = v.std(0, unbiased=False)
        return torch.where(std > 0, (v - v.mean(0)) / std.clamp_min(1e-300), torch.zeros_like(v))

    za, zb = standardise(a), standardise(b)
    explicit = ((za[:, :, None] - zb[:, None, :]) ** 2).mean(0)
    got = _distances(*sums, n, "correlation")
    torch.testing.assert_close(got, explicit)
    assert float(got[1, 1]) < 1e-9 and float(got[4, 3]) == 0.0 and abs(float(got[4, 0]) - 1.0) < 1e-12
    torch.testing.assert_close(_distances(*sums, n, "inner"), ((a[:, :, None] - b[:, None, :]) ** 2).sum(0))
    # the two costs rank pairs differently: raw L2 prefers the neuron of similar scale
    assert int(_distances(*sums, n, "inner")[1].argmin()) != 1


def test_otfusion_equals_git_rebasin_for_equal_widths_and_uniform_scores():
    # the paper's footnote: Git Re-Basin reduces to OTFusion with exact OT and uniform scores
    a, b = mlp(seed=0, hidden=(12, 10)), mlp(seed=1, hidden=(12, 10))
    x = _data((16,), 256)
    reb = fxfuse.fuse([a, b], x, method="git-rebasin", progress=False)
    ot = fxfuse.fuse([a, b], x, method="otfusion", progress=False)
    for (name, p), q in zip(reb.named_parameters(), ot.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert not torch.allclose(reb[1].weight if isinstance(reb, nn.Sequential) else reb.get_parameter("1.weight"),
                              fxfuse.fuse([a, b], x, method="vanilla", progress=False).get_parameter("1.weight"))


def test_transport_plan_matches_a_linear_program():
    from scipy.optimize import linprog

    from fxfuse._baselines import _transport_plan

    g = torch.Generator().manual_seed(0)
    cost = torch.rand(5, 7, generator=g, dtype=torch.float64)
    mu, nu = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    plan = _transport_plan(cost, mu, nu)
    torch.testing.assert_close(plan.sum(1), mu / mu.sum())
    torch.testing.assert_close(plan.sum(0), nu / nu.sum())
    assert bool((plan >= -1e-12).all())
    # the same problem as a linear program over the 35 plan entries
    rows = [[1.0 if j // 7 == i else 0.0 for j in range(35)] for i in range(5)]
    cols = [[1.0 if j % 7 == k else 0.0 for j in range(35)] for k in range(7)]
    lp = linprog(cost.flatten().numpy(), A_eq=rows + cols, b_eq=[*(mu / mu.sum()).tolist(), *(nu / nu.sum()).tolist()],
                 bounds=(0, None), method="highs")
    assert lp.status == 0
    assert abs(float((plan * cost).sum()) - lp.fun) < 1e-9


def test_otfusion_transports_a_wider_model_onto_the_first_models_widths():
    # b is a with one extra hidden neuron that feeds nothing, then permuted: it computes the
    # same function with width 13; its conductance is ~0, so the plan moves (almost) all mass
    # one to one and the transported b is a again
    a = mlp(hidden=(12, 10))
    b = mlp(seed=5, hidden=(13, 10))
    with torch.no_grad():
        b[1].weight[:12] = a[1].weight
        b[1].bias[:12] = a[1].bias
        b[3].weight.zero_()
        b[3].weight[:, :12] = a[3].weight
        for i in (3, 5):
            b[i].bias.copy_(a[i].bias)
        b[5].weight.copy_(a[5].weight)
    x = _data((16,), 256)
    torch.testing.assert_close(b(x), a(x))
    b = _permuted_copy(b, x)
    y = a(x).argmax(-1)
    fused = fxfuse.fuse([a, b], (x, y), method="otfusion", importance="conductance", progress=False)
    assert [tuple(p.shape) for p in fused.parameters()] == [tuple(p.shape) for p in a.parameters()]
    torch.testing.assert_close(fused(x), a(x), rtol=1e-4, atol=1e-5)
    # uniform marginals: the 13 -> 12 space is transported (mass is split), the equal-width
    # second space is a permutation, and it must still be applied (the head's input columns)
    fused = fxfuse.fuse([a, b], x, method="otfusion", progress=False)
    torch.testing.assert_close(fused.get_parameter("5.weight"), a[5].weight)
    assert not torch.allclose(fused.get_parameter("1.weight"), a[1].weight)
    with pytest.raises(fxfuse.AlignmentError, match="identical architectures.*otfusion"):
        fxfuse.fuse([a, b], x, method="git-rebasin", progress=False)


def test_git_rebasin_weights_each_neuron_by_its_score():
    from fxfuse._align import align
    from fxfuse._baselines import average

    a, b = mlp(seed=0, hidden=(12, 10)), mlp(seed=1, hidden=(12, 10))
    x = _data((16,), 128)
    gms = [fxfuse.trace(m, x[:2]) for m in (a, b)]
    al = align(gms, x)
    first = al.spaces.space_of("1.weight", 0).index
    second = al.spaces.space_of("3.weight", 0).index
    g = torch.Generator().manual_seed(0)
    scores = [{i: torch.rand(s.size, generator=g, dtype=torch.float64) + 0.1 for i, s in
               ((first, al.spaces[first]), (second, al.spaces[second]))} for _ in range(2)]
    merged = average(al.models, al.spaces, scores)
    wa, wb = scores[0][first][:, None], scores[1][first][:, None]
    pa, pb = al.models[0].get_parameter("1.weight"), al.models[1].get_parameter("1.weight")
    torch.testing.assert_close(merged.get_parameter("1.weight"), ((wa * pa + wb * pb) / (wa + wb)).float())
    # the head's rows are classes (a fixed space): averaged uniformly
    ha, hb = al.models[0].get_parameter("5.weight"), al.models[1].get_parameter("5.weight")
    torch.testing.assert_close(merged.get_parameter("5.weight"), (ha + hb) / 2)
    # uniform scores give the plain mean
    ones = [{i: torch.ones(al.spaces[i].size, dtype=torch.float64) for i in (first, second)}] * 2
    torch.testing.assert_close(average(al.models, al.spaces, ones).get_parameter("3.weight"),
                               average(al.models).get_parameter("3.weight"))




def test_git_rebasin_with_all_spaces_fixed_names_the_cause():
    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    for method in ("git-rebasin", "otfusion", "np-merge"):
        data = (_data((4,)), torch.zeros(256, dtype=torch.long))
        with pytest.raises(fxfuse.AlignmentError, match="all 2 are fixed.*model input.*model output"):
            fxfuse.fuse([OneLayer(), OneLayer()], data, method=method, progress=False)


class _Cumsum(nn.Module):
    """An MLP whose hidden neurons pass through an op with no neuron-space handler."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), dim=-1))


@pytest.mark.parametrize("method", ["git-rebasin", "otfusion"])
def test_alignment_names_the_unknown_op_that_fixed_every_space(method):
    torch.manual_seed(0)
    with pytest.raises(fxfuse.AlignmentError, match=f"{method}: .*all 4 are fixed.*unknown op cumsum.*kf-linear"):
        fxfuse.fuse([_Cumsum(), _Cumsum()], _data((4,)), method=method, progress=False)


def test_np_merge_runs_on_inputs_alone_and_its_ce_objective_asks_for_labels():
    a, b = mlp(seed=0), mlp(seed=1)
    x = _data((16,))
    fused = fxfuse.fuse([a, b], x, method="np-merge", epochs=2, progress=False)  # default: distil the ensemble
    assert fused(x).shape == a(x).shape
    with pytest.raises(ValueError, match="np-merge with objective='ce' learns on the labels.*objective='distill'"):
        fxfuse.fuse([a, b], x, method="np-merge", objective="ce", progress=False)
    with pytest.raises(ValueError, match="option objective must be one of 'distill', 'ce', got 'kl'"):
        fxfuse.fuse([a, b], x, method="np-merge", objective="kl", progress=False)
    with pytest.raises(ValueError, match="kf-linear has no objective option \\(it applies to np-merge\\)"):
        fxfuse.fuse([a, b], x, method="kf-linear", objective="ce", progress=False)
    with pytest.raises(ValueError, match="kf-linear has no match option .*git-rebasin"):
        fxfuse.fuse([a, b], x, method="kf-linear", match="inner", progress=False)
    with pytest.raises(ValueError, match="option match must be one of 'correlation', 'inner', got 'l2'"):
        fxfuse.fuse([a, b], x, method="git-rebasin", match="l2", progress=False)
    with pytest.raises(ValueError, match="option temperature must be a positive number, got 0"):
        fxfuse.fuse([a, b], x, method="np-merge", temperature=0, progress=False)
    from fxfuse._npmerge import np_merge

    with pytest.raises(ValueError, match="np_merge: objective must be 'ce' or 'distill', got 'kl'"):
        np_merge(a, b, x, a(x).argmax(-1), objective="kl")


@pytest.mark.parametrize("method", ["np-merge", "np-merge-levelwise"])
@pytest.mark.parametrize("kind", ["mlp", "convbn"])
def test_np_merge_of_a_model_and_its_permuted_copy_returns_the_model(method, kind):
    if kind == "mlp":
        a = mlp(hidden=(12, 10))
        b, x = permuted_mlp(a), _data((16,), 256)
    else:
        x = _data((3, 8, 8), 128)
        # statistics of the fusion data: the merge resets BatchNorm on it, which then changes nothing
        a = fxfuse._align.reset_batchnorm(seeded(ConvBN), x).eval()
        b = permuted_convbn(a)
    y = a(x).argmax(-1)
    before = copy.deepcopy(a.state_dict())
    fused = fxfuse.fuse([a, b], (x, y), method=method, epochs=3, progress=False)
    assert isinstance(fused, torch.fx.GraphModule)
    # a plain model: the same tensors as the first model, no α left inside
    assert list(fused.state_dict()) == list(a.state_dict())
    test = x[:16] + 0.1
    # np-merge resets BatchNorm in one train-mode pass, as `a` was; the level-wise variant resets
    # each level on the eval-mode output of the level before (which normalises with the unbiased
    # running variance), so its statistics differ from `a`'s by O(1/n_samples)
    tol = {"rtol": 2e-3, "atol": 2e-4} if (kind, method) == ("convbn", "np-merge-levelwise") else {}
    torch.testing.assert_close(fused(test), a(test), **({"rtol": 1e-4, "atol": 1e-5} | tol))
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the user's model changed"


def test_np_merge_learns_interpolation_weights_that_lower_the_task_loss():
    import torch.nn.functional as F

    from fxfuse._align import align
    from fxfuse._config import TrainConfig
    from fxfuse._npmerge import Interpolation, np_merge

    s = make_setting("mlp", split="dirichlet", n_models=2, seed=0)
    x, y = s.fusion
    gms = align([fxfuse.trace(m, x[:2]) for m in s.models], x).models
    averaged = Interpolation(copy.deepcopy(gms[0]), gms[1]).apply()  # α = 0.5 everywhere
    merged = np_merge(gms[0], gms[1], x, y, TrainConfig(epochs=10, lr=1e-2, weight_decay=0.0, val_split=0.0))
    with torch.no_grad():
        assert float(F.cross_entropy(merged(x), y)) < 0.8 * float(F.cross_entropy(averaged(x), y))
        # every merged parameter lies between the two models' (α ∈ (0, 1))
        for (n, p), pa, pb in zip(merged.named_parameters(), gms[0].parameters(), gms[1].parameters()):
            lo, hi = torch.minimum(pa, pb), torch.maximum(pa, pb)
            assert bool(((p >= lo - 1e-6) & (p <= hi + 1e-6)).all()), n


def test_skewed_fusion_labels_warn_once_naming_the_missing_classes():
    import warnings

    a, b = mlp(seed=0, d_out=4), mlp(seed=1, d_out=4)
    x = _data((16,), 120)
    skewed = torch.tensor([0, 1, 3]).repeat(40)  # class 2 of the models' 4 is absent
    balanced = torch.arange(120) % 4
    with pytest.warns(fxfuse.LabelSkewWarning, match="miss class\\(es\\) 2 of the models' 4.*objective='distill'") as rec:
        fxfuse.fuse([a, b], (x, skewed), method="np-merge", objective="ce", epochs=1, progress=False)
    assert len([w for w in rec if issubclass(w.category, fxfuse.LabelSkewWarning)]) == 1
    with pytest.warns(fxfuse.LabelSkewWarning,
                      match="importance='conductance'.*importance_target='own'.*importance='uniform'"):
        fxfuse.fuse([a, b], (x, skewed), method="kf-linear", importance="conductance", importance_target="labels",
                    progress=False)
    far = torch.cat([torch.zeros(100, dtype=torch.long), torch.arange(20) % 4])  # no class absent, 85% one class
    with pytest.warns(fxfuse.LabelSkewWarning, match="far from uniform"):
        fxfuse.fuse([a, b], (x, far), method="np-merge", objective="ce", epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxfuse.LabelSkewWarning)
        fxfuse.fuse([a, b], (x, balanced), method="np-merge", objective="ce", epochs=1, progress=False)
        # labels that nothing reads are not checked: the default objective distils the ensemble, and importance
        # scores attribute each model's own prediction by default
        fxfuse.fuse([a, b], (x, skewed), method="np-merge", epochs=1, progress=False)
        fxfuse.fuse([a, b], (x, skewed), method="kf-linear", importance="conductance", progress=False)


def test_pairwise_merges_in_rounds():
    from fxfuse._npmerge import pairwise

    assert pairwise(list("abcde"), lambda p, q: f"({p}{q})") == "(((ab)(cd))e)"
    assert pairwise(["a"], lambda p, q: p + q) == "a"


@pytest.mark.parametrize("method", ["np-merge", "np-merge-levelwise"])
def test_np_merge_merges_more_than_two_models(method):
    models = [mlp(seed=k, hidden=(12, 10)) for k in range(3)]
    x = _data((16,), 128)
    y = models[0](x).argmax(-1)
    fused = fxfuse.fuse(models, (x, y), method=method, epochs=2, progress=False)
    assert isinstance(fused, torch.fx.GraphModule)
    assert [tuple(p.shape) for p in fused.parameters()] == [tuple(p.shape) for p in models[0].parameters()]
    assert bool(torch.isfinite(fused(x)).all())


def test_last_layer_kd_retrains_only_the_head_towards_the_mean_softmax():
    import torch.nn.functional as F

    a, b = mlp(seed=0, hidden=(12, 10)), mlp(seed=1, hidden=(12, 10))
    x = _data((16,), 256)
    fused = fxfuse.fuse([a, b], x, method="last-layer-kd", progress=False)
    for name, p in fused.named_parameters():
        if name.startswith("5."):
            assert not torch.equal(p, a.get_parameter(name)), name
        else:
            assert torch.equal(p, a.get_parameter(name)), name
    with torch.no_grad():
        target = (a(x).softmax(-1) + b(x).softmax(-1)) / 2

        def kl(m):
            return float(F.kl_div(m(x).log_softmax(-1), target, reduction="batchmean"))

        assert kl(fused) < 0.5 * kl(a)
    with pytest.raises(ValueError, match="last-layer-kd uses no importance"):
        fxfuse.fuse([a, b], x, method="last-layer-kd", importance="conductance", progress=False)


def test_baselines_refuse_different_architectures():
    with pytest.raises(fxfuse.AlignmentError, match="identical architectures.*kf-linear"):
        fxfuse.fuse([mlp(hidden=(12, 10)), mlp(hidden=(9, 10))], _data((16,)), method="vanilla", progress=False)


def test_new_methods_reject_bad_input_with_clear_errors():
    a, b = mlp(seed=0, hidden=(12, 10)), mlp(seed=1, hidden=(12, 10))
    x = _data((16,), 64)
    y = a(x).argmax(-1)
    with pytest.raises(ValueError, match="np-merge-levelwise .*no target="):
        fxfuse.fuse([a, b], (x, y), method="np-merge-levelwise", target=a, progress=False)
    with pytest.raises(fxfuse.AlignmentError, match="models\\[1\\] differs .*`1.bias` dim 0\\) has width 9 vs 12; "
                       "np-merge-levelwise needs the same architecture and widths.*kf-linear"):
        fxfuse.fuse([a, mlp(hidden=(9, 10))], (x, y), method="np-merge-levelwise", progress=False)
    with pytest.raises(fxfuse.AlignmentError, match="identical architectures.*otfusion"):
        fxfuse.fuse([a, mlp(hidden=(9, 10))], (x, y), method="np-merge", progress=False)
    # otfusion lets free widths differ, not structure: one more hidden layer is refused
    with pytest.raises(fxfuse.AlignmentError, match="models\\[1\\] has 4 levels and models\\[0\\] 3: otfusion .*same depth"):
        fxfuse.fuse([a, mlp(hidden=(12, 10, 8))], x, method="otfusion", progress=False)
    for method in ("ensemble", "last-layer-kd"):
        with pytest.raises(fxfuse.AlignmentError, match=f"{method}: the models' outputs have different shapes"):
            fxfuse.fuse([a, mlp(d_out=4)], x, method=method, progress=False)
    with pytest.raises(ValueError, match="vanilla uses no importance"):
        fxfuse.fuse([a, b], (x, y), method="vanilla", importance="deeplift", progress=False)


def test_node_scores_names_a_missing_node():
    from fxfuse._importance import node_scores

    gm = fxfuse.trace(mlp(), _data((16,), 2))
    with pytest.raises(ValueError, match="no node named 'nope'"):
        node_scores(gm, [("nope", 1)], (_data((16,), 8), torch.zeros(8, dtype=torch.long)), "conductance")
    with pytest.raises(ValueError, match="needs labels"):
        node_scores(gm, [("_2", 1)], _data((16,), 8), "conductance")


@pytest.mark.parametrize("method", ["git-rebasin", "kf-linear"])
def test_in_place_activations_do_not_change_the_fusion(method):
    """timm's ReLU(inplace=True) must not overwrite the pre-activation values fusion reads (alignment
    statistics at BatchNorm outputs, level outputs): the result equals that of out-of-place copies."""
    import timm

    def build(seed, inplace):
        torch.manual_seed(seed)
        m = timm.create_model("test_resnet", pretrained=False, num_classes=4)
        for mod in m.modules():
            if hasattr(mod, "inplace"):
                mod.inplace = inplace
        return m.eval()

    x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a_in, b_in = build(0, True), build(1, True)
    assert any(getattr(mod, "inplace", False) for mod in a_in.modules())
    fused_in = fxfuse.fuse([a_in, b_in], x, method=method, progress=False)
    fused_out = fxfuse.fuse([build(0, False), build(1, False)], x, method=method, progress=False)
    torch.testing.assert_close(fused_in(x), fused_out(x), rtol=1e-5, atol=1e-5)
    assert any(getattr(mod, "inplace", False) for mod in a_in.modules())  # the user's model is untouched
