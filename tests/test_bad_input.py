"""Silent failures and unclear errors found by probing, each turned into a clear error or correct behaviour."""

import copy
import pickle

import pytest
import timm
import torch
from torch import nn

import fxfuse
from fxfuse._methods import METHODS
from fxfuse.cli import main
from zoo import ConvBN, mlp, seeded


def _x(shape, n=64, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


class Tied(nn.Module):
    """One Linear called twice: its weights are shared by two levels."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        return self.head(torch.relu(self.shared(h)))


def test_tied_weights_are_refused_with_the_module_name():
    a, b = seeded(Tied, 0), seeded(Tied, 1)
    with pytest.raises(fxfuse.FxFuseError, match=r"module `shared` is called in levels \[1, 2\].*[Uu]ntie"):
        fxfuse.fuse([a, b], _x((16,)), method="kf-linear", progress=False)


def test_one_hot_labels_are_not_taken_for_inputs():
    x = _x((16,))
    onehot = torch.nn.functional.one_hot(torch.arange(64) % 3, 3).float()
    with pytest.raises(ValueError, match=r"labels must be integer class indices.*one-hot.*argmax"):
        fxfuse.fuse([mlp(), mlp(seed=1)], (x, onehot), progress=False)
    # even when the one-hot labels have the inputs' shape
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        fxfuse.fuse([mlp(), mlp(seed=1)], (x, torch.zeros_like(x)), progress=False)


@pytest.mark.parametrize("labels,msg", [
    (torch.full((64,), 7), r"label 7 .*out of range for models with 3 classes"),
    (torch.full((64,), -1), r"label -1 .*out of range"),
    (torch.zeros(64), "labels must be integer class indices, got dtype torch.float32"),
    (torch.zeros(5, dtype=torch.long), "5 labels for 64 inputs"),
])
def test_bad_labels_say_labels(labels, msg):
    with pytest.raises(ValueError, match=msg):
        fxfuse.fuse([mlp(), mlp(seed=1)], (_x((16,)), labels), method="kf-linear", importance="conductance",
                    progress=False)


def test_int32_labels_are_accepted():
    x, y = _x((16,)), torch.arange(64) % 3
    ref = fxfuse.fuse([mlp(), mlp(seed=1)], (x, y), method="kf-linear", importance="conductance", progress=False)
    got = fxfuse.fuse([mlp(), mlp(seed=1)], (x, y.int()), method="kf-linear", importance="conductance", progress=False)
    torch.testing.assert_close(got(x), ref(x))


def test_dict_data_and_module_list_models():
    x, y = _x((16,)), torch.arange(64) % 3
    ref = fxfuse.fuse([mlp(), mlp(seed=1)], (x, y), method="kf-linear", progress=False)
    got = fxfuse.fuse(nn.ModuleList([mlp(), mlp(seed=1)]), {"inputs": x, "labels": y}, method="kf-linear",
                      progress=False)
    torch.testing.assert_close(got(x), ref(x))
    with pytest.raises(TypeError, match=r"a single Sequential; pass \[model_a, model_b\]"):
        fxfuse.fuse(mlp(), x)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['targets'\]"):
        fxfuse.fuse([mlp(), mlp(seed=1)], {"inputs": x, "targets": y})


def test_data_without_a_batch_dimension():
    with pytest.raises(ValueError, match=r"shape \(16,\) have no batch dimension.*unsqueeze"):
        fxfuse.fuse([mlp(), mlp(seed=1)], torch.randn(16))


def test_seed_and_device_are_checked():
    with pytest.raises(TypeError, match="seed must be an int, got NoneType"):
        fxfuse.fuse([mlp(), mlp(seed=1)], _x((16,)), seed=None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' was requested but CUDA is not available.*device='cpu'"):
            fxfuse.fuse([mlp(), mlp(seed=1)], _x((16,)), device="cuda")
    with pytest.raises(ValueError, match="not a valid torch device"):
        fxfuse.fuse([mlp(), mlp(seed=1)], _x((16,)), device="gpu0")


class TinyCNN(nn.Module):
    """A conv net with an MLP's level count (two levels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 12, 3, padding=1)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_models_of_different_structure_with_the_same_level_count():
    cnn = TinyCNN()
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(fxfuse.AlignmentError, match=r"level 0: models\[0\] level `conv` outputs .*models\[1\]"):
        fxfuse.fuse([cnn, net], _x((1, 4, 4)), method="kf-linear", progress=False)


def test_frozen_parameters_are_fitted_and_their_flags_kept():
    a, b = mlp(), mlp(seed=1)
    for p in [*a.parameters(), *b.parameters()]:
        p.requires_grad_(False)
    x = _x((16,), 128)
    fused = fxfuse.fuse([a, b], x, method="kf-gradient", epochs=3, progress=False)
    assert not any(p.requires_grad for p in fused.parameters())  # the fused model has the target's flags
    assert not any(p.requires_grad for p in [*a.parameters(), *b.parameters()])
    assert not torch.allclose(fused(x), a(x))  # and it was fitted, not left at models[0]


def test_too_few_samples_warn_that_the_reported_error_says_nothing():
    with pytest.warns(UserWarning, match=r"fewer fusion rows than unknowns.*levels 0 \(`1`: 8 rows, 17 columns\)"):
        fused = fxfuse.fuse([mlp(), mlp(seed=1)], _x((16,), 8), method="kf-linear", progress=False)
    assert fused.meta["fxfuse"]["levels"][0]["rows"] == 8


def test_too_few_samples_in_a_block_level_name_the_op():
    class Res(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.fc0, self.fc1, self.fc2, self.head = (torch.nn.Linear(16, 16), torch.nn.Linear(16, 64),
                                                       torch.nn.Linear(64, 16), torch.nn.Linear(16, 3))

        def forward(self, x):
            h = torch.relu(self.fc0(x))
            return self.head(h + self.fc2(torch.relu(self.fc1(h))))

    with pytest.warns(UserWarning, match=r"fewer fusion rows than unknowns.*, op `fc2`: 8 rows, 65 columns\)"):
        fused = fxfuse.fuse([Res(0), Res(1)], _x((16,), 8), method="hf-linear", progress=False)
    assert any(op["op"] == "fc2" for r in fused.meta["fxfuse"]["levels"] for op in r["ops"] or [])


def test_half_precision_models_are_fitted_in_float32():
    x = _x((16,), 256)
    a, b = mlp(), mlp(seed=1)
    ref = fxfuse.fuse([a, b], x, method="kf-gradient", epochs=20, progress=False, device="cpu")
    half = fxfuse.fuse([a.half(), b.half()], x.half(), method="kf-gradient", epochs=20, progress=False, device="cpu")
    assert next(half.parameters()).dtype == torch.float16
    err_ref = [r["approx_error"] for r in ref.meta["fxfuse"]["levels"]]
    err_half = [r["approx_error"] for r in half.meta["fxfuse"]["levels"]]
    for e_h, e_r in zip(err_half, err_ref):
        assert e_h < 1.2 * e_r + 1e-3, (err_half, err_ref)


def test_check_neuron_spaces_takes_a_tuple_like_trace():
    from fxfuse.passes import check_neuron_spaces

    x = _x((3, 8, 8), 4)
    gm = fxfuse.trace(seeded(ConvBN, 0), (x,))
    assert check_neuron_spaces(gm, (x,)).coverage == check_neuron_spaces(gm, x).coverage


def test_export_and_reset_batchnorm_keep_the_callers_mode(tmp_path):
    from fxfuse._align import reset_batchnorm

    m = seeded(ConvBN, 0).train()
    fxfuse.export(m, tmp_path / "m.pt", _x((3, 8, 8), 2))
    assert m.training
    reset_batchnorm(m, _x((3, 8, 8)))
    assert m.bn1.training and m.bn2.training


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))).cumsum(-1))


def test_alignment_warns_about_unknown_ops_instead_of_silencing_them():
    with pytest.warns(UserWarning, match="no handler for cumsum"):
        fxfuse.fuse([seeded(Cumsum, 0), seeded(Cumsum, 1)], _x((16,)), method="git-rebasin", progress=False)


def _small_kwargs(method):
    if METHODS[method].levelwise or method in ("last-layer-kd", "np-merge"):
        return {"epochs": 2}
    return {}


@pytest.mark.parametrize("method", list(METHODS))
def test_user_models_their_modes_and_flags_are_unchanged(method, tmp_path):
    a, b = seeded(ConvBN, 0).train(), seeded(ConvBN, 1).eval()
    b.conv1.weight.requires_grad_(False)
    snap = [(copy.deepcopy(m.state_dict()), [mod.training for mod in m.modules()],
             [p.requires_grad for p in m.parameters()]) for m in (a, b)]
    x, y = _x((3, 8, 8)), torch.arange(64) % 4
    fused = fxfuse.fuse([a, b], (x, y), method=method, progress=False, **_small_kwargs(method))
    fxfuse.export(fused, tmp_path / "f.pt", x[:2])
    fxfuse.export(a, tmp_path / "a.pt", x[:2])
    for m, (sd, modes, flags) in zip((a, b), snap):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
        assert [mod.training for mod in m.modules()] == modes
        assert [p.requires_grad for p in m.parameters()] == flags
        # the engine's copies compute channels-last; neither the user's models nor the fused one are left that way
        assert all(p.is_contiguous() for p in m.parameters())
    assert all(p.is_contiguous() for p in fused.parameters())


class Rank5Mask(nn.Module):
    """A conv net with a 5-d constant, as a traced Swin holds its attention mask: torch.fx keeps the tensor made in
    forward as a buffer of the GraphModule (``_tensor_constant0``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        mask = torch.ones(1, 2, 3, 1, 1)  # (1, groups, channels per group, 1, 1)
        h = self.conv(x).relu()
        h = (h.reshape(h.shape[0], 2, 3, 8, 8) * mask).reshape(h.shape[0], 6, 8, 8)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("importance", ["uniform", "deeplift"])
def test_models_with_a_5d_constant_fuse(importance):
    """The engine's channels-last copies convert only 4-d tensors: Module.to(memory_format=channels_last) refuses a
    5-d one, which made every fusion of a Swin fail in prepare (RuntimeError: required rank 4 tensor)."""
    a, b = seeded(Rank5Mask, 0).eval(), seeded(Rank5Mask, 1).eval()
    gm = fxfuse.trace(a, _x((3, 8, 8))[:2])
    assert any(t.dim() == 5 for t in gm.buffers())  # the case: a traced 5-d constant
    x = _x((3, 8, 8))
    fused = fxfuse.fuse([a, a], (x, torch.arange(64) % 4), method="hf-linear", importance=importance, progress=False)
    with torch.no_grad():
        assert torch.allclose(fused(x), a(x), rtol=1e-4, atol=1e-4 * float(a(x).abs().max()))
    fxfuse.fuse([a, b], x, method="kf-linear", importance=importance, progress=False)


# --- command line ------------------------------------------------------------------------------


@pytest.fixture()
def cnn_ckpts(tmp_path):
    from test_cli import _digits_checkpoints

    return _digits_checkpoints(tmp_path)


def test_cli_samples_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fuse", "a.pt", "b.pt", "--samples", "-1790"])
    assert e.value.code == 2 and "must be a positive integer, got -1790" in capsys.readouterr().err


def test_cli_resizing_is_explicit_and_said(cnn_ckpts, tmp_path, capsys):
    small = tmp_path / "small.pt"
    torch.save({"inputs": torch.rand(20, 1, 8, 8), "labels": torch.arange(20) % 10}, small)
    out = tmp_path / "f.pt"
    args = ["fuse", *cnn_ckpts, "--data", str(small), "--method", "vanilla", "--out", str(out), "--quiet"]
    assert main(args) == 2
    assert "inputs of shape (1, 8, 8) but the models take (1, 16, 16); pass --resize" in capsys.readouterr().err
    assert not out.exists()
    assert main(args + ["--resize"]) == 0
    assert "resizing the inputs from 8x8 to 16x16" in capsys.readouterr().out
    assert main(["fuse", *cnn_ckpts, "--samples", "20", "--method", "vanilla", "--out", str(out), "--quiet"]) == 0
    assert "resizing the digits from 8x8 to 16x16" in capsys.readouterr().out


def test_cli_unwritable_out_fails_before_fusing(cnn_ckpts, tmp_path, capsys):
    code = main(["fuse", *cnn_ckpts, "--out", str(tmp_path / "missing" / "f.pt"), "--quiet"])
    err = capsys.readouterr()
    assert code == 2 and "does not exist" in err.err and "fxfuse:" not in err.out


def test_cli_pickled_code_is_not_a_plain_file_and_no_unpickling_advice(tmp_path, capsys):
    bad = tmp_path / "w.pth"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": copy.deepcopy}, f)
    assert main(["fuse", f"test_resnet={bad}", f"test_resnet={bad}", "--num-classes", "10", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not a plain PyTorch file of tensors" in err and "weights_only=False" not in err


def test_cli_arch_weights_for_one_channel_models(tmp_path, capsys):
    paths = []
    for k in range(2):
        torch.manual_seed(k)
        m = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
        paths.append(tmp_path / f"w{k}.pth")
        torch.save(m.state_dict(), paths[-1])
    out = tmp_path / "f.pt"
    code = main(["fuse", *(f"test_resnet={p}" for p in paths), "--num-classes", "10", "--in-chans", "1",
                 "--input-size", "1", "16", "16", "--samples", "20", "--method", "vanilla", "--out", str(out),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    model, size = fxfuse.load_checkpoint(out)
    assert size == (1, 16, 16) and model(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_cli_unexpected_errors_are_one_line(cnn_ckpts, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("something deep broke")

    monkeypatch.setattr(fxfuse, "fuse", boom)
    assert main(["fuse", *cnn_ckpts, "--samples", "20", "--quiet", "--out", "/tmp/never.pt"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "fxfuse fuse: error: RuntimeError: something deep broke"


def test_models_that_are_not_a_sequence():
    with pytest.raises(TypeError, match="models must be a sequence of torch.nn.Module, got int"):
        fxfuse.fuse(3, _x((16,)))


def test_rewrite_params_names_bad_keys_and_shapes():
    from fxfuse.passes import rewrite_params

    gm = fxfuse.trace(nn.Linear(2, 1), torch.randn(1, 2))
    with pytest.raises(KeyError, match="`nope` is not a parameter or buffer"):
        rewrite_params(gm, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"`bias` has shape \(1,\), got \(2,\)"):
        rewrite_params(gm, {"bias": torch.zeros(2)})


def test_option_types_and_input_types_are_named():
    x = _x((16,))
    with pytest.raises(TypeError, match="progress must be True or False"):
        fxfuse.fuse([mlp(), mlp(seed=1)], x, progress="yes")
    with pytest.raises(TypeError, match="option reset_bn must be True or False"):
        fxfuse.fuse([mlp(), mlp(seed=1)], x, method="vanilla", reset_bn=1)
    with pytest.raises(TypeError, match="inputs must be a Tensor, got ndarray"):
        fxfuse.fuse([mlp(), mlp(seed=1)], {"inputs": x.numpy()})
    with pytest.raises(TypeError, match="batch 0 is a ndarray; expected a Tensor"):
        fxfuse.fuse([mlp(), mlp(seed=1)], (x.numpy(), torch.zeros(64, dtype=torch.long)))


def test_regularisation_and_hf_cost_options_are_checked():
    x = _x((16,))
    with pytest.raises(ValueError, match="option regularisation must be one of 'gcv', 'pinv', got 'lstsq'"):
        fxfuse.fuse([mlp(), mlp(seed=1)], x, regularisation="lstsq")
    with pytest.raises(ValueError, match="option hf_cost must be one of 'squared', 'distance'"):
        fxfuse.fuse([mlp(), mlp(seed=1)], x, method="hf-linear", hf_cost="l1")
    with pytest.raises(ValueError, match="kf-linear has no hf_cost option \\(it applies to hf-linear, hf-gradient\\)"):
        fxfuse.fuse([mlp(), mlp(seed=1)], x, method="kf-linear", hf_cost="distance")
    with pytest.raises(ValueError, match="vanilla has no regularisation option"):
        fxfuse.fuse([mlp(), mlp(seed=1)], x, method="vanilla", regularisation="pinv")


def test_fit_gradient_without_trainable_parameters():
    from fxfuse._solve import fit_gradient

    lin = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no trainable parameter"):
        fit_gradient(lin, torch.randn(8, 2), torch.randn(8, 2))
