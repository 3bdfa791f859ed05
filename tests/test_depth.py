"""Models of different depth: cross-layer alignment (CLA), identity levels, and fusion across depths."""

import copy
import itertools

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse._trace import out_of_place
from fxfuse.passes import (
    align_depth,
    cla_dp,
    insert_identity,
    linear_cka,
    partition_levels,
    pinned_levels,
)
from fxfuse.passes._depth import level_outputs
from zoo import randomise_bn


def mlp(depth: int, width: int = 16, act=nn.ReLU, seed: int = 0, d_in: int = 8, d_out: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, width)]
    for _ in range(depth - 1):
        layers += [act(), nn.Linear(width, width)]
    layers += [act(), nn.Linear(width, d_out)]
    return nn.Sequential(*layers).eval()


def vgg_bn(n_convs: int = 4, width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(n_convs - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)]
    return randomise_bn(nn.Sequential(*layers))


def resnet(layers, block="basic"):
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    torch.manual_seed(0)
    cls = BasicBlock if block == "basic" else Bottleneck
    return randomise_bn(ResNet(cls, list(layers), num_classes=4, channels=(8, 16, 16, 32), stem_width=8,
                                zero_init_last=False))


def _traced(model, x):
    gm = out_of_place(fxfuse.trace(model, x))
    return gm, partition_levels(gm)


# --- the dynamic program ---------------------------------------------------------------------


def brute_force_cla(cost: torch.Tensor, *, pin_first: bool = True, pin_last: bool = True) -> tuple[list[int], float]:
    """The CLA optimum by enumeration (small n, m): the oracle for :func:`cla_dp`."""
    n, m = cost.shape
    best, arg = float("inf"), None
    for comb in itertools.combinations(range(m), n):
        if pin_first and n and comb[0] != 0 or pin_last and n and comb[-1] != m - 1:
            continue
        c = float(sum(cost[j, i] for j, i in enumerate(comb)))
        if c < best:
            best, arg = c, list(comb)
    return arg, best



@pytest.mark.parametrize("pin_first,pin_last", list(itertools.product([True, False], repeat=2)))
def test_cla_dp_equals_brute_force(pin_first, pin_last):
    g = torch.Generator().manual_seed(int(pin_first) * 2 + int(pin_last))
    checked = 0
    for _ in range(300):
        m = int(torch.randint(1, 7, (1,), generator=g))
        n = int(torch.randint(1, m + 1, (1,), generator=g))
        if n == 1 and pin_first and pin_last and m > 1:
            continue
        cost = torch.rand(n, m, generator=g, dtype=torch.float64)
        a, total = cla_dp(cost, pin_first=pin_first, pin_last=pin_last)
        b, best = brute_force_cla(cost, pin_first=pin_first, pin_last=pin_last)
        assert total == pytest.approx(best, abs=1e-12)
        assert float(sum(cost[j, i] for j, i in enumerate(a))) == pytest.approx(best, abs=1e-12)
        assert all(x < y for x, y in zip(a, a[1:]))
        if pin_first:
            assert a[0] == 0
        if pin_last:
            assert a[-1] == m - 1
        checked += 1
    assert checked > 200


def test_cla_dp_paper_toy_example():
    """CLAFusion, Figure 2: hidden layers of 5, 4, 3, 1 and 3, 2, 1 neurons, squared difference of the counts:
    a(1) = 1, a(2) = 3, a(3) = 4 (0-based: 0, 2, 3)."""
    a_sizes, b_sizes = torch.tensor([5.0, 4, 3, 1]), torch.tensor([3.0, 2, 1])
    cost = (b_sizes[:, None] - a_sizes[None, :]) ** 2
    assert cla_dp(cost) == ([0, 2, 3], 5.0)


def test_cla_dp_rejects_bad_costs():
    with pytest.raises(ValueError, match="pass cost.T"):
        cla_dp(torch.rand(3, 2))
    with pytest.raises(ValueError, match="both the first and the last"):
        cla_dp(torch.rand(1, 3))


# --- CKA ---------------------------------------------------------------------------------------


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=g, dtype=torch.float64)
    y = torch.relu(x @ torch.randn(12, 9, generator=g, dtype=torch.float64))
    q1, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert linear_cka(x @ q1, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 0.1 * y @ q2) == pytest.approx(base, abs=1e-12)
    assert linear_cka(7.0 * x, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, x + 3.0) == pytest.approx(1.0, abs=1e-12)  # centring over samples
    # not invariant to a non-isotropic scaling of the features
    assert linear_cka(x * torch.linspace(0.1, 10, 12, dtype=torch.float64), y) != pytest.approx(base, abs=1e-3)
    # symmetric, and independent data is far from 1
    assert linear_cka(y, x) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, torch.randn(60, 12, generator=g, dtype=torch.float64)) < 0.5


# --- identity levels ------------------------------------------------------------------------------


def _zoo():
    import timm

    return {
        "vgg-bn": (vgg_bn(), 16, "affine"),
        "resnet-basic": (resnet([2, 2, 1, 1]), 32, "block"),
        "resnet-bottleneck": (resnet([2, 1, 1, 1], "bottleneck"), 32, "block"),
        "convnext": (timm.create_model("test_convnext", pretrained=False, num_classes=4).eval(), 32, "block"),
        "vit": (timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32).eval(), 32, "block"),
    }


@pytest.mark.parametrize("name", ["vgg-bn", "resnet-basic", "resnet-bottleneck", "convnext", "vit"])
def test_insert_identity_keeps_the_function_in_float64(name):
    model, px, kind = _zoo()[name]
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    gm, plan = _traced(model, x)
    pins = pinned_levels(plan)
    free = [i for i in range(1, len(plan) - 1) if i not in pins]
    positions = [free[-1], free[-1]]  # two identities in a row, after the last free level
    before = {n: p.clone() for n, p in gm.named_parameters()}
    new, new_plan = insert_identity(gm, plan, positions, example=x)
    assert len(new_plan) == len(plan) + 2
    inserted = new.meta["fxfuse"]["inserted"]
    assert [r["kind"] for r in inserted] == [kind, kind]
    x2 = torch.randn(3, 3, px, px, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(copy.deepcopy(new).double()(x2), copy.deepcopy(model).double()(x2),
                               rtol=1e-6, atol=1e-6 * float(model.double()(x2).abs().max()))
    for n, p in gm.named_parameters():  # the input GraphModule is not modified
        assert torch.equal(p, before[n])
    # the inserted block keeps its weights but the zeroed last scale: it can still train
    if kind == "block":
        mod = new.get_submodule(inserted[0]["module"])
        kept = [n for n, p in mod.named_parameters() if p.ndim >= 2 and p.abs().sum() > 0]
        assert kept, "the inserted block lost all its weights"


def test_insert_identity_falls_back_to_a_pass_through_for_non_idempotent_activations():
    model = mlp(3, act=nn.GELU)
    x = torch.randn(4, 8)
    gm, plan = _traced(model, x)
    new, new_plan = insert_identity(gm, plan, [1])
    assert new.meta["fxfuse"]["inserted"][0]["kind"] == "pass-through"
    torch.testing.assert_close(new(x), model(x))
    relu = mlp(3)
    gm, plan = _traced(relu, x)
    new, _ = insert_identity(gm, plan, [1])
    assert new.meta["fxfuse"]["inserted"][0]["kind"] == "affine"  # ReLU∘ReLU = ReLU: a copied level is exact


def test_insert_identity_rejects_a_position_after_the_head():
    gm, plan = _traced(mlp(2), torch.randn(2, 8))
    with pytest.raises(ValueError, match="nothing goes after the head"):
        insert_identity(gm, plan, [len(plan) - 1])


# --- alignment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlp", "resnet"])
def test_align_depth_recovers_inserted_identities(case):
    if case == "mlp":
        model, x, positions = mlp(3, width=24), torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), [1]
    else:
        model = resnet([2, 1, 1, 1])
        x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        positions = [2]
    gm, plan = _traced(model, x[:2])
    deep, deep_plan = insert_identity(gm, plan, positions, example=x[:2])
    al = align_depth([plan, deep_plan], [level_outputs(plan, x), level_outputs(deep_plan, x)])
    assert al.target == 1 and al.depths == (len(plan), len(plan) + len(positions))
    assert [after for after, _ in al.insertions[0]] == positions
    assert al.inserted_levels(0) == [p + 1 for p in positions]
    assert "+ identity" in al.table()


def test_align_depth_aligns_vit_halves_as_pairs():
    import timm

    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    deep = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32, depth=4).eval()
    shallow = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32, depth=2).eval()
    plans = [_traced(m, x[:2])[1] for m in (deep, shallow)]
    al = align_depth(plans, [level_outputs(p, x) for p in plans])
    assert len(al.insertions[1]) == 4 and max(al.units) == 2
    # an attention half and an MLP half go in together: the unmatched target levels come in consecutive pairs
    missing = al.inserted_levels(1)
    assert len(missing) == 4 and all(b == a + 1 for a, b in zip(missing[::2], missing[1::2]))
    assert all(m % 2 == missing[0] % 2 for m in missing[::2])


def test_align_depth_refuses_different_stages():
    x = torch.randn(16, 8)
    a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    b = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    plans = [_traced(m, x[:2])[1] for m in (a, b)]
    with pytest.raises(fxfuse.AlignmentError, match="pinned levels .* same stages"):
        align_depth(plans, [level_outputs(p, x) for p in plans])
    with pytest.raises(fxfuse.AlignmentError, match="pinned levels"):
        fxfuse.fuse([a, b], x, method="kf-linear", progress=False)


# --- fusion across depths ----------------------------------------------------------------------


def test_fuse_different_depths_takes_the_deepest_architecture():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    deep, shallow, narrow = mlp(4, seed=0), mlp(2, seed=1), mlp(2, seed=1, width=12)
    before = copy.deepcopy(narrow.state_dict())
    for method, other in (("kf-linear", narrow), ("hf-linear", shallow), ("kf-gradient", narrow)):
        opts = {"epochs": 3} if method == "kf-gradient" else {}
        fused = fxfuse.fuse([other, deep], x, method=method, progress=False, **opts)
        assert [tuple(p.shape) for p in fused.parameters()] == [tuple(p.shape) for p in deep.parameters()]
        levels = fused.meta["fxfuse"]["levels"]
        assert sum(1 for r in levels if r["identity"] == ["models[0]"] or r["identity"] == ("models[0]",)) == 2
        from fxfuse._engine import format_report

        assert "identity in" in format_report(fused)
    for k, v in narrow.state_dict().items():
        assert torch.equal(v, before[k])


def test_fuse_with_a_copy_plus_identities_reproduces_the_model():
    """A model and a deeper copy of itself (identity levels inserted) compute the same function, so fusing them
    must give it back: the alignment finds the identities and every level's targets agree."""
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    model = mlp(3, width=16)
    gm, plan = _traced(model, x[:2])
    deeper, _ = insert_identity(gm, plan, [1, 2], example=x[:2])
    fused = fxfuse.fuse([model, deeper], x, method="hf-linear", progress=False)
    test = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    err = float((fused(test) - model(test)).norm() / model(test).norm())
    assert err < 1e-3


def test_fuse_into_a_shallower_target_merges_the_deeper_models_levels():
    """Fusing a model with a deeper copy of itself into the model's own (shallower) architecture: the copy's
    identity levels are merged into the levels that follow them, every level's targets agree, and the model
    comes back."""
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    model = mlp(3, width=16)
    gm, plan = _traced(model, x[:2])
    deeper, _ = insert_identity(gm, plan, [1, 2], example=x[:2])
    fused = fxfuse.fuse([deeper, model], x, method="hf-linear", target=model, progress=False)
    assert [tuple(p.shape) for p in fused.parameters()] == [tuple(p.shape) for p in model.parameters()]
    levels = fused.meta["fxfuse"]["levels"]
    assert [len(r["merged"]) for r in levels] == [0, 0, 1, 1]
    assert all(r["merged"][0].startswith("models[0]: ") and " + " in r["merged"][0] for r in levels[2:])
    test = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    assert float((fused(test) - model(test)).norm() / model(test).norm()) < 1e-3
    from fxfuse._engine import format_report

    assert "merged models[0]: " in format_report(fused)
    # two deep models into a shallow architecture no base model has: the uniform mapping
    shallow_target = mlp(1, width=16, seed=5)
    fused = fxfuse.fuse([mlp(3, seed=1), mlp(3, seed=2)], x, method="kf-linear", target=shallow_target,
                        progress=False)
    assert [tuple(p.shape) for p in fused.parameters()] == [tuple(p.shape) for p in shallow_target.parameters()]
    assert sum(len(r["merged"]) for r in fused.meta["fxfuse"]["levels"]) == 2


def test_fuse_resnets_of_different_depth_solves_blocks_in_closed_form():
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    deep, shallow = resnet([2, 2, 1, 1]), resnet([1, 1, 1, 1])
    fused = fxfuse.fuse([deep, shallow], x, method="kf-linear", progress=False)
    levels = fused.meta["fxfuse"]["levels"]
    inserted = [r for r in levels if r["identity"]]
    assert [r["name"] for r in inserted] == ["layer1.1", "layer2.1"]
    assert all(r["approximation"].startswith("closed form") for r in levels)
    assert fused(x).shape == (64, 4)
    # into the shallower architecture: the deeper model's extra blocks merge into the block after them
    small = fxfuse.fuse([deep, shallow], x, method="kf-linear", target=shallow, progress=False)
    levels = small.meta["fxfuse"]["levels"]
    assert [list(r["merged"]) for r in levels if r["merged"]] == [["models[0]: layer1.1 + layer2.0"],
                                                                  ["models[0]: layer2.1 + layer3.0"]]
    assert all(r["approximation"].startswith("closed form") for r in levels)
    assert [tuple(p.shape) for p in small.parameters()] == [tuple(p.shape) for p in shallow.parameters()]


def test_depth_alignment_refusals():
    x = torch.randn(32, 8)
    deep, shallow = mlp(4), mlp(2)
    with pytest.raises(fxfuse.AlignmentError, match="np-merge-levelwise .* cannot use identity levels"):
        fxfuse.fuse([deep, shallow], x, method="np-merge-levelwise", progress=False)
    for method in ("vanilla", "git-rebasin", "otfusion", "np-merge"):
        with pytest.raises(fxfuse.AlignmentError, match=f"{method} combines the models' parameters tensor by tensor, "
                           "so the models need the same depth.*kf-linear"):
            fxfuse.fuse([deep, shallow], x, method=method, progress=False)
    other_stages = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(fxfuse.AlignmentError, match="cannot be merged into it: .* pinned levels"):
        fxfuse.fuse([deep, mlp(4, seed=3)], x, method="kf-linear", target=other_stages, progress=False)
    with pytest.raises(ValueError, match="cla_samples"):
        fxfuse.fuse([deep, shallow], x, method="kf-linear", cla_samples=1, progress=False)


# --- fine-tune --------------------------------------------------------------------------------


def test_finetune_improves_a_fused_model_and_leaves_it_untouched():
    from fxfuse._experiments import make_setting

    s = make_setting("mlp", seed=0)
    fused = fxfuse.fuse(s.models, s.fusion, method="kf-linear", progress=False)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    report = copy.deepcopy(fused.meta["fxfuse"])
    x, y = s.fusion
    tuned = fxfuse.finetune(fused, (x, y), epochs=10, lr=1e-3, progress=False)
    with torch.no_grad():
        loss_before = float(torch.nn.functional.cross_entropy(fused(x), y))
        loss_after = float(torch.nn.functional.cross_entropy(tuned(x), y))
    assert loss_after < loss_before
    losses = tuned.meta["fxfuse"]["finetune"]["loss"]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert isinstance(tuned, torch.fx.GraphModule) and not tuned.training
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k])
    assert fused.meta["fxfuse"] == report  # the input's report is not changed
    # label-free: distil the base models' mean softmax on inputs alone
    distilled = fxfuse.finetune(fused, x, teachers=s.models, epochs=3, progress=False)
    assert distilled.meta["fxfuse"]["finetune"]["objective"] == "distill"


def test_finetune_bad_arguments():
    m = mlp(2)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match="objective='ce' needs labels"):
        fxfuse.finetune(m, x, progress=False)
    with pytest.raises(ValueError, match="teachers"):
        fxfuse.finetune(m, (x, y), objective="distill", progress=False)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        fxfuse.finetune(m, (x, y), lr=0, progress=False)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        fxfuse.finetune(m, (x, y), epochs=0, progress=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        fxfuse.finetune(m, (x, y), objective="mse", progress=False)


def test_restandardise_batchnorm_keeps_the_function_and_matches_batch_statistics():
    from fxfuse._finetune import restandardise_batchnorm

    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    deep, shallow = resnet([2, 1, 1, 1]), resnet([1, 1, 1, 1])
    fused = fxfuse.fuse([deep, shallow], x, method="kf-linear", progress=False)  # BatchNorms folded: mean 0, var 1
    m = copy.deepcopy(fused).double()
    xd = x.double()
    with torch.no_grad():
        before = m(xd)
        train_before = copy.deepcopy(m).train()(xd)  # a copy: train mode updates the running statistics
        assert restandardise_batchnorm(m, [xd]) > 0
        torch.testing.assert_close(m(xd), before, rtol=1e-9, atol=1e-9)  # eval function unchanged
        train_after = copy.deepcopy(m).train()(xd)  # batch statistics now equal the running ones
    after, folded = float((train_after - before).abs().max()), float((train_before - before).abs().max())
    # batch statistics equal the running ones up to the biased/unbiased variance (n / (n − 1))
    assert after < 5e-3 * float(before.abs().max()) and folded > 20 * after


def test_alignment_arguments_are_checked():
    from fxfuse.passes._depth import merge_levels

    x = torch.randn(8, 8)
    plans = [_traced(m, x[:2])[1] for m in (mlp(3), mlp(1))]
    with pytest.raises(ValueError, match="cost must be 'cka' or 'uniform'"):
        align_depth(plans, None, cost="l2")
    with pytest.raises(ValueError, match="cost='cka' compares level outputs: pass activations"):
        align_depth(plans, None)
    with pytest.raises(ValueError, match="target=5 is not a model index"):
        align_depth(plans, None, target=5, cost="uniform")
    with pytest.raises(ValueError, match="ends must rise strictly and end at the head"):
        merge_levels(plans[0], [2, 1, 3])
