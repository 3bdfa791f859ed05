import os
import subprocess
import sys

import timm
import torch

import fxfuse
from fxfuse.cli import main


def test_levels_prints_table_and_writes_html(tmp_path, capsys):
    out = tmp_path / "levels.html"
    assert main(["levels", "resnet10t", "--input-size", "3", "32", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "resnet10t: 8 levels" in text
    assert "layer1.0  residual" in text and f"wrote {out}" in text
    assert "<svg" in out.read_text()


def test_levels_vit_small_input(tmp_path, capsys):
    assert main(["levels", "vit_tiny_patch16_224", "--input-size", "3", "32", "32", "--out", str(tmp_path / "v.txt")]) == 0
    text = capsys.readouterr().out
    assert "26 levels" in text
    assert "blocks.11.mlp" in text and "(1, 5, 192)" in text  # 4 patches + class token


def test_levels_default_output_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["levels", "resnet10t", "--input-size", "3", "32", "32"]) == 0
    assert (tmp_path / "resnet10t.levels.html").exists()


def test_unknown_model_suggests_close_names(capsys):
    assert main(["levels", "resnt18"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnt18'" in err and "'resnet18'" in err


def test_levels_from_checkpoint(tmp_path, capsys):
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    ckpt = tmp_path / "net.pt"
    fxfuse.save_checkpoint(model, ckpt, "resnet10t", num_classes=3, input_size=(3, 32, 32))
    assert main(["levels", str(ckpt), "--out", str(tmp_path / "n.txt")]) == 0
    text = capsys.readouterr().out
    assert "input (1, 3, 32, 32)" in text
    assert (tmp_path / "n.txt").read_text().splitlines()[-1].split()[:4] == ["7", "fc", "affine", "3"]


def test_bad_input_size_is_an_error(capsys):
    assert main(["levels", "resnet10t", "--input-size", "3", "0", "32"]) == 2
    assert "three positive ints" in capsys.readouterr().err


def test_console_script_and_package_layout(tmp_path):
    env = dict(os.environ)
    code = (
        "import importlib.util, fxfuse.passes;"
        "assert importlib.util.find_spec('passes') is None, 'a top-level `passes` package is importable';"
        "print(fxfuse.passes.__name__)"
    )
    # run outside the repository so the working directory is not on sys.path
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "fxfuse.passes"
    exe = os.path.join(os.path.dirname(sys.executable), "fxfuse")
    res = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == f"fxfuse {fxfuse.__version__}"


def _digits_checkpoints(tmp_path, n=2):
    paths = []
    for k in range(n):
        torch.manual_seed(k)
        m = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
        p = tmp_path / f"m{k}.pt"
        fxfuse.save_checkpoint(m, p, "test_resnet", num_classes=10, in_chans=1, input_size=(1, 16, 16))
        paths.append(str(p))
    return paths


def test_fuse_command_writes_checkpoint_torchscript_and_export(tmp_path, capsys):
    paths = _digits_checkpoints(tmp_path)
    out, ts, ep = tmp_path / "fused.pt", tmp_path / "fused.ts", tmp_path / "fused.pt2"
    rc = main(["fuse", *paths, "--data", "digits", "--samples", "64", "--method", "kf-linear", "--quiet",
               "--out", str(out), "--torchscript", str(ts), "--export", str(ep)])
    assert rc == 0
    fused, size = fxfuse.load_checkpoint(out)
    assert size == (1, 16, 16)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(torch.jit.load(str(ts))(x), fused(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.export.load(str(ep)).module()(x), fused(x), rtol=1e-4, atol=1e-4)


def test_fuse_command_with_arch_and_weights_and_tensor_data(tmp_path):
    specs = []
    for k in range(2):
        torch.manual_seed(k)
        net = timm.create_model("test_resnet", pretrained=False, num_classes=4, in_chans=3)
        torch.save(net.state_dict(), tmp_path / f"w{k}.pth")
        specs.append(f"test_resnet={tmp_path / f'w{k}.pth'}")
    torch.save(torch.randn(40, 3, 32, 32), tmp_path / "x.pt")
    rc = main(["fuse", *specs, "--num-classes", "4", "--data", str(tmp_path / "x.pt"), "--quiet",
               "--method", "hf-linear", "--out", str(tmp_path / "f.pt")])
    assert rc == 0 and (tmp_path / "f.pt").exists()


def test_fuse_command_bad_model_spec(tmp_path, capsys):
    assert main(["fuse", "nothing-here", "also-nothing", "--out", str(tmp_path / "f.pt")]) == 2
    assert "neither a checkpoint path nor ARCH=WEIGHTS" in capsys.readouterr().err


def test_export_command(tmp_path, capsys):
    out = tmp_path / "r.pt2"
    assert main(["export", "resnet10t", "--input-size", "3", "32", "32", "--format", "export", "--out", str(out)]) == 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.export.load(str(out)).module()(x).shape == (2, 1000)


def test_fuse_command_np_merge_uses_the_digit_labels(tmp_path, capsys):
    paths = _digits_checkpoints(tmp_path)
    out = tmp_path / "np.pt"
    assert main(["fuse", *paths, "--data", "digits", "--samples", "64", "--method", "np-merge", "--quiet",
                 "--out", str(out)]) == 0
    fused, _ = fxfuse.load_checkpoint(out)
    bases = [fxfuse.load_checkpoint(p)[0] for p in paths]
    w = fused.state_dict()["fc.weight"]
    assert not any(torch.equal(w, b.state_dict()["fc.weight"]) for b in bases)
    # a tensor file without labels: the default objective distils the ensemble, the paper's needs labels
    torch.save(torch.randn(40, 1, 16, 16), tmp_path / "x.pt")
    assert main(["fuse", *paths, "--data", str(tmp_path / "x.pt"), "--method", "np-merge", "--quiet",
                 "--out", str(tmp_path / "distill.pt")]) == 0
    assert main(["fuse", *paths, "--data", str(tmp_path / "x.pt"), "--method", "np-merge", "--objective", "ce",
                 "--quiet", "--out", str(tmp_path / "no.pt")]) == 2
    assert "objective='ce' learns on the labels" in capsys.readouterr().err
    assert main(["fuse", *paths, "--data", "digits", "--samples", "64", "--method", "kf-linear", "--objective",
                 "ce", "--quiet", "--out", str(tmp_path / "no.pt")]) == 2
    assert "--objective: kf-linear has no objective option" in capsys.readouterr().err
    # importance scores need no labels by default (each model's own prediction); the labels target does
    assert main(["fuse", *paths, "--data", str(tmp_path / "x.pt"), "--importance", "deeplift", "--quiet",
                 "--out", str(tmp_path / "own.pt")]) == 0
    assert main(["fuse", *paths, "--data", str(tmp_path / "x.pt"), "--importance", "deeplift",
                 "--importance-target", "labels", "--quiet", "--out", str(tmp_path / "no.pt")]) == 2
    assert "importance_target='labels' attributes each fusion sample's label, but the data has none" in \
        capsys.readouterr().err
    assert main(["fuse", *paths, "--data", "digits", "--samples", "64", "--importance-target", "own", "--quiet",
                 "--out", str(tmp_path / "no.pt")]) == 2
    assert "--importance-target: option importance_target='own'" in capsys.readouterr().err


def test_levels_of_two_models_prints_their_depth_alignment(tmp_path, capsys):
    import shutil
    import subprocess

    import timm

    from fxfuse import save_checkpoint

    for name, layers in (("deep", [2, 2, 1, 1]), ("shallow", [1, 1, 1, 1])):
        kw = dict(layers=layers, channels=(8, 16, 16, 32), stem_width=8, num_classes=4)
        torch.manual_seed(0)
        save_checkpoint(timm.create_model("resnet18", pretrained=False, **kw), tmp_path / f"{name}.pt", "resnet18",
                        input_size=(3, 16, 16), **kw)
    out = tmp_path / "al.html"
    rc = main(["levels", str(tmp_path / "deep.pt"), str(tmp_path / "shallow.pt"), "--data", "digits",
               "--samples", "48", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "target: deep.pt" in text
    rows = [line for line in text.splitlines() if "+ identity" in line]
    assert [r.split()[2] for r in rows] == ["layer1.1", "layer2.1"]  # the levels the shallow model lacks
    assert "shallow.pt: an identity level after its level(s) 1, 2" in text
    page = out.read_text()
    assert page.count('class="ident"') == 2 and page.count('class="match"') == 6
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser:  # the page loads in a real browser and keeps its table and heat map
        res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", out.as_uri()],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.count('class="match"') == 6 and 'id="alignment"' in res.stdout


def test_levels_of_several_models_needs_an_html_out(tmp_path, capsys):
    rc = main(["levels", "test_resnet", "test_resnet", "--input-size", "3", "16", "16", "--samples", "8",
               "--out", str(tmp_path / "al.txt")])
    assert rc == 2 and "an alignment is written as .html, got --out" in capsys.readouterr().err
