import os
import subprocess
import sys

import pytest
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
