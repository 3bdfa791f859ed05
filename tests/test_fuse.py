import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxfuse
from fxfuse._importance import level_scores
from fxfuse.passes import partition_levels
from zoo import ConvBN, mlp, seeded


def permuted_mlp(model: nn.Sequential, seed: int = 1) -> nn.Sequential:
    """A functionally identical copy with every hidden layer's neurons permuted."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    linears = [m for m in out if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for a, b in zip(linears[:-1], linears[1:]):
            p = torch.randperm(a.out_features, generator=g)
            a.weight.copy_(a.weight[p])
            a.bias.copy_(a.bias[p])
            b.weight.copy_(b.weight[:, p])
    return out


def permuted_convbn(model: ConvBN, seed: int = 1) -> ConvBN:
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        p = torch.randperm(out.conv1.out_channels, generator=g)
        for t in (out.conv1.weight, out.conv1.bias, out.bn1.weight, out.bn1.bias, out.bn1.running_mean, out.bn1.running_var):
            t.copy_(t[p])
        out.conv2.weight.copy_(out.conv2.weight[:, p])
        q = torch.randperm(out.conv2.out_channels, generator=g)
        for t in (out.conv2.weight, out.bn2.weight, out.bn2.bias, out.bn2.running_mean, out.bn2.running_var):
            t.copy_(t[q])
        out.fc.weight.copy_(out.fc.weight[:, q])
    return out


def _data(shape, n=256, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["hf-linear", "kf-linear"])
@pytest.mark.parametrize("kind", ["mlp", "convbn"])
def test_fusing_a_model_with_itself_or_a_permuted_copy_reproduces_it(method, kind):
    if kind == "mlp":
        a = mlp(hidden=(12, 10))
        b = permuted_mlp(a)
        x, test = _data((16,)), _data((16,), 64, seed=9)
    else:
        a = seeded(ConvBN)
        b = permuted_convbn(a)
        # enough samples that every ReLU pattern of the test inputs lies in the fitted span
        x, test = _data((3, 8, 8), 512), _data((3, 8, 8), 32, seed=9)
    torch.testing.assert_close(b(test), a(test), rtol=1e-4, atol=1e-5)  # the copy is the same function
    assert not torch.allclose(b[1].weight if kind == "mlp" else b.conv1.weight, a[1].weight if kind == "mlp" else a.conv1.weight)
    for other in (a, b):
        fused = fxfuse.fuse([a, other], x, method=method, progress=False)
        torch.testing.assert_close(fused(x), a(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(test), a(test), rtol=1e-4, atol=1e-4)
        assert all(r["approx_error"] < 1e-10 for r in fused.meta["fxfuse"]["levels"])


def test_the_reference_implementations_choices_recover_a_permuted_copy_and_are_reported():
    # regularisation="pinv" and hf_cost="distance" (the reference implementation's pseudo-inverse and unsquared
    # pair cost): a permuted copy is still found and the model reproduced; the report names the solve
    a = mlp(hidden=(12, 10))
    b = permuted_mlp(a)
    x, test = _data((16,)), _data((16,), 64, seed=9)
    fused = fxfuse.fuse([a, b], x, method="hf-linear", regularisation="pinv", hf_cost="distance", progress=False)
    torch.testing.assert_close(fused(test), a(test), rtol=1e-4, atol=1e-4)
    levels = fused.meta["fxfuse"]["levels"]
    assert [r["approximation"] for r in levels] == ["closed form (pinv)"] * 3
    assert all(r["ridge"] is None for r in levels)


def test_distance_cost_and_pinv_change_the_fusion_of_different_models():
    # on two different models each option changes the result (neither is silently ignored)
    a, b = mlp(hidden=(12, 10)), mlp(seed=3, hidden=(12, 10))
    x = _data((16,))
    base = fxfuse.fuse([a, b], x, method="hf-linear", progress=False)
    costed = fxfuse.fuse([a, b], x, method="hf-linear", hf_cost="distance", progress=False)
    pinv = fxfuse.fuse([a, b], x, method="hf-linear", regularisation="pinv", progress=False)
    assert not torch.allclose(base(x), costed(x))
    assert not torch.allclose(base(x), pinv(x))


def test_kf_gradient_of_a_model_with_itself_stays_close():
    a = mlp(hidden=(12, 10))
    x, test = _data((16,), 512), _data((16,), 64, seed=9)
    fused = fxfuse.fuse([a, permuted_mlp(a)], x, method="kf-gradient", epochs=20, progress=False)
    err = (fused(test) - a(test)).abs().max() / a(test).abs().max()
    assert err < 0.05


def test_three_models_and_unequal_widths_with_kmeans():
    models = [mlp(seed=0, hidden=(12, 10)), mlp(seed=1, hidden=(16, 8)), mlp(seed=2, hidden=(9, 10))]
    fused = fxfuse.fuse(models, _data((16,)), method="kf-linear", progress=False)
    widths = [lv.width for lv in partition_levels(fxfuse.trace(fused, _data((16,), 2)))]
    assert widths == [12, 10, 3]  # the first model's widths
    report = fused.meta["fxfuse"]
    assert report["n_models"] == 3 and [r["grouping"] for r in report["levels"]] == ["k-means", "k-means", "mean of logits"]


def test_target_architecture_sets_the_fused_widths():
    models = [mlp(seed=0, hidden=(12, 10)), mlp(seed=1, hidden=(12, 10))]
    wide = mlp(seed=5, hidden=(20, 10))
    fused = fxfuse.fuse(models, _data((16,)), method="kf-linear", target=wide, progress=False)
    assert fused.get_submodule("1").out_features == 20
    assert wide[1].weight.shape == (20, 16)  # the target itself is not modified


def test_result_is_a_plain_graphmodule_with_a_report(capsys):
    a, b = mlp(seed=0), mlp(seed=1)
    fused = fxfuse.fuse([a, b], _data((16,)), method="kf-linear", progress=True)
    assert isinstance(fused, torch.fx.GraphModule) and not fused.training
    levels = fused.meta["fxfuse"]["levels"]
    assert [r["approximation"] for r in levels] == ["closed form"] * 3
    assert set(levels[0]) == {"level", "name", "kind", "grouping", "approximation", "grouping_cost", "approx_error", "seconds",
                              "rows", "columns", "ridge", "ops", "identity", "merged", "held_out_error"}
    assert all(r["ridge"] is not None and 0 < r["ridge"] < 10 for r in levels)  # chosen by cross-validation
    assert "kf-linear with uniform importance" in capsys.readouterr().out


@pytest.mark.parametrize("importance", ["conductance", "deeplift"])
def test_importance_scores_show_a_progress_bar_over_models_and_batches(capsys, importance):
    a, b = mlp(seed=0), mlp(seed=1)
    x = _data((16,), 300)
    y = a(x).argmax(1)
    fxfuse.fuse([a, b], (x, y), method="kf-linear", importance=importance, progress=True)
    err = capsys.readouterr().err
    # 300 samples in batches of 128: 3 per model, 2 models
    assert f"importance ({importance})" in err and "6/6" in err
    fused = fxfuse.fuse([a, b], (x, y), method="kf-linear", importance=importance, progress=False)
    assert "importance (" not in capsys.readouterr().err
    meta = fused.meta["fxfuse"]  # the scores' share of the time is reported
    assert 0 < meta["score_seconds"] < meta["seconds"]
    assert fxfuse.fuse([a, b], (x, y), method="kf-linear", progress=False).meta["fxfuse"]["score_seconds"] < 0.05


def test_the_scoring_progress_bar_counts_the_passes_cut_to_the_memory_budget(capsys, monkeypatch):
    import fxfuse._importance as imp_mod

    a, b = mlp(seed=0), mlp(seed=1)
    x = _data((16,), 300)
    y = a(x).argmax(1)
    per_sample = imp_mod.sample_bytes(fxfuse.trace(a, x[:2]))
    monkeypatch.setattr(imp_mod, "SCORE_PASS_BYTES", 50 * 11 * per_sample)  # 50 samples per conductance pass
    fused = fxfuse.fuse([a, b], (x, y), method="kf-linear", importance="conductance", progress=True)
    err = capsys.readouterr().err
    assert "importance (conductance)" in err and "12/12" in err  # 6 passes per model, 2 models
    monkeypatch.undo()
    same = fxfuse.fuse([a, b], (x, y), method="kf-linear", importance="conductance", progress=False)
    torch.testing.assert_close(fused(x), same(x), rtol=1e-5, atol=1e-6)


def test_linear_methods_solve_blocks_op_by_op_or_fall_back_to_gradient():
    from zoo import ResNetTiny

    a, b = seeded(ResNetTiny, 0), seeded(ResNetTiny, 1)
    fused = fxfuse.fuse([a, b], _data((3, 8, 8), 64), method="kf-linear", progress=False)
    levels = fused.meta["fxfuse"]["levels"]
    assert [r["approximation"] for r in levels] == ["closed form", "closed form (block: 2 ops)",
                                                    "closed form (block: 2 ops)", "closed form"]
    assert [op["role"] for op in levels[1]["ops"]] == ["inner", "sum"]
    assert [op["op"] for op in levels[1]["ops"]] == ["blocks.0.conv1", "blocks.0.conv2"]
    fused = fxfuse.fuse([a, b], _data((3, 8, 8), 64), method="kf-linear", blocks="gradient", epochs=2, progress=False)
    approx = [r["approximation"] for r in fused.meta["fxfuse"]["levels"]]
    assert approx == ["closed form", "gradient (fallback: not affine)", "gradient (fallback: not affine)", "closed form"]


def test_input_models_are_not_modified():
    a, b = seeded(ConvBN, 0).train(), seeded(ConvBN, 1)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    fxfuse.fuse([a, b], _data((3, 8, 8), 64), method="kf-gradient", epochs=2, progress=False)
    assert a.training and not b.training
    for m, sd in zip((a, b), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: x,
        lambda x, y: (x, y),
        lambda x, y: [x[:30], x[30:]],
        lambda x, y: [(x[:30], y[:30]), (x[30:], y[30:])],
        lambda x, y: DataLoader(TensorDataset(x, y), batch_size=16),
    ],
    ids=["tensor", "tuple", "tensors", "pairs", "dataloader"],
)
def test_data_forms(make):
    a, b = mlp(seed=0), mlp(seed=1)
    x, y = _data((16,), 64), torch.randint(0, 3, (64,))
    ref = fxfuse.fuse([a, b], x, method="kf-linear", progress=False)
    fused = fxfuse.fuse([a, b], make(x, y), method="kf-linear", progress=False)
    torch.testing.assert_close(fused(x), ref(x))


@pytest.mark.parametrize("importance", ["conductance", "deeplift"])
def test_importance_scores_run_end_to_end(importance):
    a, b = seeded(ConvBN, 0), seeded(ConvBN, 1)
    x, y = _data((3, 8, 8), 48), torch.randint(0, 4, (48,))
    plan = partition_levels(fxfuse.trace(a, x[:2]))
    scores = level_scores(plan, (x, y), importance)
    assert [s.shape[0] for s in scores] == [lv.width for lv in plan]
    assert all(bool((s > 0).all()) for s in scores)
    assert not torch.allclose(scores[0], scores[0].mean().expand_as(scores[0]))  # not uniform
    fused = fxfuse.fuse([a, b], (x, y), method="kf-linear", importance=importance, progress=False)
    uniform = fxfuse.fuse([a, b], (x, y), method="kf-linear", progress=False)
    assert not torch.allclose(fused(x), uniform(x))  # the scores change the result
    # without labels too (each model's own prediction is the attribution target by default)
    fxfuse.fuse([a, b], x, method="kf-linear", importance=importance, progress=False)


@pytest.mark.parametrize("importance", ["conductance", "deeplift"])
def test_importance_target_chooses_the_attributed_logit(importance):
    """importance_target: "own" (each model's own prediction, the default), "labels" (each sample's label) and
    "ensemble" (the base models' ensemble prediction); only "labels" reads the data's labels."""
    a, b = seeded(ConvBN, 0), seeded(ConvBN, 1)
    x, y = _data((3, 8, 8), 48), torch.randint(0, 4, (48,))
    wrong = (y + 1) % 4

    def fused(data, **opts):
        return fxfuse.fuse([a, b], data, method="kf-linear", importance=importance, progress=False, **opts)(x)

    own = fused((x, y))
    torch.testing.assert_close(own, fused(x))  # the default needs no labels
    torch.testing.assert_close(own, fused((x, wrong), importance_target="own"))  # and reads none
    labels = fused((x, y), importance_target="labels")
    assert not torch.allclose(labels, fused((x, wrong), importance_target="labels"))  # these do read them
    ensemble = fused((x, y), importance_target="ensemble")
    torch.testing.assert_close(ensemble, fused(x, importance_target="ensemble"))
    torch.testing.assert_close(ensemble, fused((x, wrong), importance_target="ensemble"))
    for p, q in ((own, labels), (own, ensemble), (labels, ensemble)):  # three targets, three fusions
        assert not torch.allclose(p, q)
    with pytest.raises(ValueError, match="importance_target='labels'.*has none.*'ensemble' or 'own'"):
        fused(x, importance_target="labels")
    with pytest.raises(ValueError, match="importance_target must be one of 'labels', 'ensemble', 'own'"):
        fused((x, y), importance_target="predicted")
    with pytest.raises(ValueError, match="importance='uniform' attributes nothing"):
        fxfuse.fuse([a, b], (x, y), method="kf-linear", importance_target="own", progress=False)
    with pytest.raises(ValueError, match="objective='ce' learns on"):
        fxfuse.fuse([a, b], (x, y), method="np-merge", importance=importance, importance_target="ensemble",
                    objective="ce", progress=False)


# --- bad input -------------------------------------------------------------------------------


def test_unknown_method_and_importance_list_valid_names():
    a, b = mlp(seed=0), mlp(seed=1)
    with pytest.raises(ValueError, match="valid methods: hf-linear, kf-linear, kf-gradient"):
        fxfuse.fuse([a, b], _data((16,)), method="kmeans")
    with pytest.raises(ValueError, match="valid importance scores: uniform, conductance, deeplift"):
        fxfuse.fuse([a, b], _data((16,)), importance="saliency")
    with pytest.raises(TypeError, match="unknown option.*epoch.*valid options"):
        fxfuse.fuse([a, b], _data((16,)), epoch=3)


def test_single_model_is_refused():
    with pytest.raises(ValueError, match="at least two models, got 1"):
        fxfuse.fuse([mlp()], _data((16,)))
    with pytest.raises(TypeError, match=r"models\[1\] is a str"):
        fxfuse.fuse([mlp(), "mlp"], _data((16,)))


def test_different_depths_with_different_stages_name_the_pinned_levels():
    # 16-12-10-3 and 16-12-3: the width change 12 -> 10 is a stage the shallower model lacks
    with pytest.raises(fxfuse.AlignmentError, match=r"models\[1\] has 2 pinned levels .* target models\[0\] has 3"):
        fxfuse.fuse([mlp(hidden=(12, 10)), mlp(hidden=(12,))], _data((16,)))


def test_hf_with_unequal_widths_suggests_kf():
    with pytest.raises(ValueError, match=r"level 0 \(`1`\): models have widths 12 and 9.*method='kf-linear'"):
        fxfuse.fuse([mlp(hidden=(12, 10)), mlp(hidden=(9, 10))], _data((16,)), method="hf-linear")
    with pytest.raises(ValueError, match="exactly 2 models"):
        fxfuse.fuse([mlp(), mlp(), mlp()], _data((16,)), method="hf-linear")


def test_empty_and_non_finite_data():
    a, b = mlp(seed=0), mlp(seed=1)
    with pytest.raises(ValueError, match="empty"):
        fxfuse.fuse([a, b], [])
    with pytest.raises(ValueError, match="empty"):
        fxfuse.fuse([a, b], torch.zeros(0, 16))
    bad = _data((16,))
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fxfuse.fuse([a, b], bad)


def test_non_finite_weights_name_the_parameter():
    a, b = mlp(seed=0), mlp(seed=1)
    with torch.no_grad():
        b[3].weight[0, 0] = float("nan")
    for method in ("vanilla", "kf-linear"):  # vanilla once wrote a NaN model without a word
        with pytest.raises(ValueError, match=r"models\[1\]: `3.weight` holds 1 NaN or Inf"):
            fxfuse.fuse([a, b], _data((16,)), method=method, progress=False)


def test_non_finite_activations_name_the_level():
    a, b = mlp(seed=0), mlp(seed=1)
    with torch.no_grad():
        b[3].weight.fill_(3e38)  # finite weights whose outputs overflow
    with pytest.raises(fxfuse.FxFuseError, match=r"level 1 \(`3`\) of models\[1\]: .*non-finite"):
        fxfuse.fuse([a, b], _data((16,)), method="kf-linear", progress=False)


def test_input_shape_the_models_do_not_accept():
    with pytest.raises(fxfuse.TraceError, match="example_inputs have the shape"):
        fxfuse.fuse([mlp(), mlp(seed=1)], _data((7,)))


def test_hf_gradient_matches_then_fits_by_gradient():
    a = mlp(hidden=(12, 10))
    x, test = _data((16,), 512), _data((16,), 64, seed=9)
    fused = fxfuse.fuse([a, permuted_mlp(a)], x, method="hf-gradient", epochs=20, start="first", progress=False)
    levels = fused.meta["fxfuse"]["levels"]
    assert [(r["grouping"], r["approximation"]) for r in levels] == [
        ("hungarian", "gradient"), ("hungarian", "gradient"), ("mean of logits", "gradient")
    ]
    # the matching recovers the permutation, so the targets are the model's own outputs
    assert all(r["grouping_cost"] < 1e-8 for r in levels)
    assert float((fused(test) - a(test)).abs().max() / a(test).abs().max()) < 0.05


@pytest.mark.parametrize("opt,val,msg", [
    ("epochs", -1, "epochs must be an int >= 0"),
    ("lr", 0.0, "lr must be a positive number"),
    ("val_split", 1.0, r"val_split must be in \[0, 1\)"),
    ("max_rows", 0, "max_rows must be an int >= 1"),
    ("target", "wide", "target must be an nn.Module"),
])
def test_bad_option_values(opt, val, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        fxfuse.fuse([mlp(seed=0), mlp(seed=1)], _data((16,)), **{opt: val})
