"""Recipes (`fxfuse run`), timm checkpoints and preprocessing, the model directory and the report."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from fxfuse.passes import partition_levels
from PIL import Image
from safetensors.torch import save_file

import fxfuse
from fxfuse._recipe import RecipeError, parse_recipe
from fxfuse.cli import main

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")


def _timm_checkpoints(folder, num_classes=3):
    """Two test_resnets the way timm users keep them: a .safetensors file, and a .pth.tar whose EMA weights
    (under `module.`) are the ones to use (its `state_dict` is zeros)."""
    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(timm.create_model("test_resnet", pretrained=False, num_classes=num_classes).eval())
    save_file({k: v.contiguous() for k, v in models[0].state_dict().items()}, folder / "a.safetensors")
    sd = models[1].state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": torch.zeros_like(v) for k, v in sd.items()},
                "state_dict_ema": {f"module.{k}": v for k, v in sd.items()}}, folder / "b.pth.tar")
    return models


def _image_folder(root, n_per_class, seed):
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            arr = (rng.random((40, 48, 3)) * 80 + c * 60).astype("uint8")
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")


RECIPE = """\
format: fxfuse-recipe/1
seed: 0
device: cpu
models:
  - {model: test_resnet, checkpoint: a.safetensors, model_args: {num_classes: 3}}
  - {model: test_resnet, checkpoint: b.pth.tar, model_args: {num_classes: 3}}
data:
  fusion: {source: imagefolder, path: fusion, samples: 20}
  eval: {source: imagefolder, path: val}
  transform: {input_size: [3, 32, 32]}
method: {name: kf-linear, options: {epochs: 3}}
compare: [vanilla, ensemble, git-rebasin]
output: {path: out/fused, formats: [safetensors, torchscript]}
report: {html: report.html, json: report.json}
"""


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """The issue's run: timm checkpoints (.safetensors, .pth.tar), image folders for fusion and evaluation."""
    root = tmp_path_factory.mktemp("recipe")
    models = _timm_checkpoints(root)
    _image_folder(root / "fusion", 8, 0)
    _image_folder(root / "val", 6, 1)
    (root / "out").mkdir()
    (root / "recipe.yaml").write_text(RECIPE)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc = main(["run", "recipe.yaml", "--quiet"])
    finally:
        os.chdir(cwd)
    return root, rc, models


def test_run_writes_a_timm_directory_a_card_and_a_report(timm_run):
    root, rc, models = timm_run
    assert rc == 0
    out = root / "out" / "fused"
    for f in ("model.safetensors", "config.json", "README.md", "recipe.yaml", "report.html", "report.json",
              "model.torchscript.pt"):
        assert (out / f).is_file(), f
    assert (out / "recipe.yaml").read_text() == RECIPE
    assert not [p for p in (root / "out").iterdir() if p.name.startswith(".fxfuse-run-")]
    # timm loads the directory, and it is the fused model (the TorchScript file is checked against the
    # fused GraphModule when written)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (loaded(x) - torch.jit.load(str(out / "model.torchscript.pt"))(x)).abs().max()
        assert float(diff) <= 1e-5
        assert not torch.allclose(loaded(x), models[0](x), atol=1e-3)  # not simply a base model
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm") and "local-dir:" in card and "| fused (kf-linear) |" in card


def test_report_json_has_every_level_and_every_result(timm_run):
    root, rc, models = timm_run
    assert rc == 0
    rep = json.loads((root / "out" / "fused" / "report.json").read_text())
    plan = partition_levels(fxfuse.trace(models[0], torch.randn(1, 3, 32, 32)))
    assert [lv["name"] for lv in rep["levels"]] == [lv.name for lv in plan]
    for lv in rep["levels"]:
        assert {"name", "error", "seconds", "solved_by"} <= set(lv)
        assert lv["solved_by"] in ("closed form", "gradient") and lv["error"] >= 0
    names = [r["model"] for r in rep["results"]]
    assert names == ["a.safetensors", "b.pth.tar", "vanilla", "ensemble", "git-rebasin", "fused (kf-linear)"]
    assert all(0 <= r["accuracy"] <= 100 and r["loss"] > 0 for r in rep["results"])
    # the .pth.tar's EMA weights were loaded, not its zero `state_dict`: a zero model has loss ln 3
    assert abs(rep["results"][1]["loss"] - float(np.log(3))) > 1e-4
    assert rep["run"]["recipe"] == RECIPE and rep["run"]["versions"]["timm"] == timm.__version__
    assert any(s["how"].startswith("grouped") for s in rep["neuron_spaces"])


@pytest.mark.skipif(BROWSER is None, reason="needs chromium-headless-shell (.ci/run installs it)")
def test_report_renders_in_headless_chromium(timm_run, tmp_path):
    root, rc, _ = timm_run
    assert rc == 0
    page = root / "out" / "fused" / "report.html"
    n_levels = len(json.loads((root / "out" / "fused" / "report.json").read_text())["levels"])
    args = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    res = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'data-ready="1"' in dom  # the inline script ran to the end, with no error event
    assert '<p id="js-errors"></p>' in dom
    assert dom.count('class="level-mark"') == n_levels
    assert f'<span id="mark-count">{n_levels}</span>' in dom  # counted by the script in the page
    assert "Uncaught" not in res.stderr and "CONSOLE" not in res.stderr
    shot = tmp_path / "report.png"
    res = subprocess.run([*args, f"--screenshot={shot}", "--window-size=1280,1800", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.stat().st_size > 10_000


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def _workspace(tmp_path, monkeypatch):
    """The recipe's inputs in tmp_path (the current directory): checkpoints, image folders, an empty out/."""
    monkeypatch.chdir(tmp_path)
    _timm_checkpoints(tmp_path)
    (tmp_path / "out").mkdir()
    _image_folder(tmp_path / "fusion", 2, 0)
    _image_folder(tmp_path / "val", 2, 1)


def test_misspelt_key_exits_2_with_path_line_and_suggestion(tmp_path, capsys, monkeypatch):
    _workspace(tmp_path, monkeypatch)
    bad = RECIPE.replace("  eval: {source", "  evall: {source")
    assert main(["run", _write(tmp_path, bad)]) == 2
    err = capsys.readouterr().err
    assert "line 9" in err and "`data.evall`" in err and "did you mean `eval`?" in err
    assert list((tmp_path / "out").iterdir()) == []  # nothing written
    for text, expected in (
        (RECIPE.replace("seed: 0", "seed: zero"), "line 2: `seed`: expected an integer, got str 'zero'"),
        (RECIPE.replace("b.pth.tar", "c.pth.tar"), "line 6: `models[1].checkpoint`: checkpoint 'c.pth.tar' does not exist"),
        (RECIPE.replace("name: kf-linear", "name: kf-linaer"), "`method.name`: unknown value 'kf-linaer'; did you mean `kf-linear`?"),
        (RECIPE.replace("epochs: 3", "epoch: 3"), "`method.options.epoch`: unknown option(s) epoch"),
        (RECIPE.replace("path: val", "path: nowhere"), "`data.eval.path`: image folder 'nowhere' does not exist"),
        (RECIPE.replace("format: fxfuse-recipe/1\n", ""), "missing key `format`"),
        (RECIPE.replace("[safetensors, torchscript]", "[safetensor]"), "did you mean `safetensors`?"),
        (RECIPE.replace("models:", "models: 3\nx:"), "`models`: expected a list, got int 3"),
        ("format: fxfuse-recipe/1\nmodels: [\n", "is not valid YAML"),
    ):
        assert main(["run", _write(tmp_path, text)]) == 2, text
        assert expected in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []
    # a checkpoint that does not fit its model is named too, still before anything is written
    assert main(["run", _write(tmp_path, RECIPE.replace("num_classes: 3}}\n  - {model", "num_classes: 5}}\n  - {model"))]) == 2
    err = capsys.readouterr().err
    assert "`models[0].checkpoint`" in err and "model_args" in err and "line 5" in err
    assert list((tmp_path / "out").iterdir()) == []
    # an existing output directory is kept unless the recipe says otherwise
    (tmp_path / "out" / "fused").mkdir()
    assert main(["run", _write(tmp_path, RECIPE)]) == 2
    assert "`output.path`: 'out/fused' already exists; set `output.overwrite: true`" in capsys.readouterr().err
    # not even with overwrite may the output replace an input
    assert main(["run", _write(tmp_path, RECIPE), "--out", ".", "--overwrite"]) == 2
    assert "'.' contains the input `models[0]` ('a.safetensors')" in capsys.readouterr().err
    assert (tmp_path / "a.safetensors").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    _workspace(tmp_path, monkeypatch)
    assert main(["run", _write(tmp_path, RECIPE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "test_resnet" in out and "8 levels" in out and "6 samples of image folder fusion" in out
    assert "method: kf-linear" in out and "mean=(0.5, 0.5, 0.5)" in out
    assert "under kf-linear: 4 in closed form, 4 blocks op by op in closed form, 0 by gradient" in out
    assert list((tmp_path / "out").iterdir()) == []


def test_disagreeing_data_configs_need_a_choice(tmp_path, capsys, monkeypatch):
    from fxfuse._run import save_timm_dir

    monkeypatch.chdir(tmp_path)
    _timm_checkpoints(tmp_path)
    (tmp_path / "out").mkdir()
    _image_folder(tmp_path / "fusion", 2, 0)
    m = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    save_timm_dir(m, str(tmp_path / "c"), {"input_size": (3, 24, 24), "mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0)},
                  {"num_classes": 3})
    text = RECIPE.replace("b.pth.tar, model_args: {num_classes: 3}}", "b.pth.tar, model_args: {num_classes: 3}}\n"
                          "  - {model: \"local-dir:c\"}").replace("  eval: {source: imagefolder, path: val}\n", "")
    assert main(["run", _write(tmp_path, text), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "`data.transform`" in err and "(0.1, 0.2, 0.3) (models[2])" in err and "from_model" in err
    text = text.replace("transform: {input_size: [3, 32, 32]}", "transform: {from_model: 2}")
    assert main(["run", _write(tmp_path, text), "--dry-run"]) == 0
    assert "input_size=(3, 24, 24)" in capsys.readouterr().out


def test_a_failed_write_leaves_no_output(tmp_path, monkeypatch):
    import fxfuse._report

    monkeypatch.chdir(tmp_path)
    _timm_checkpoints(tmp_path)
    (tmp_path / "out").mkdir()
    _image_folder(tmp_path / "fusion", 2, 0)
    text = RECIPE.replace("  eval: {source: imagefolder, path: val}\n", "").replace("compare: [vanilla, ensemble, git-rebasin]\n", "")

    def boom(rec, folder):
        raise OSError("disk full")

    monkeypatch.setattr(fxfuse._report, "write_reports", boom)
    assert main(["run", _write(tmp_path, text), "--quiet"]) == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_fuse_flags_and_a_recipe_are_one_configuration(tmp_path):
    from fxfuse._cli_fusion import fuse_recipe
    from fxfuse.cli import _parser

    ckpt = tmp_path / "m.pt"
    m = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
    fxfuse.save_checkpoint(m, ckpt, "test_resnet", num_classes=10, in_chans=1, input_size=(1, 16, 16))
    args = _parser().parse_args(["fuse", str(ckpt), str(ckpt), "--method", "np-merge", "--objective", "ce",
                                 "--samples", "64", "--seed", "3", "--out", str(tmp_path / "f.pt")])
    from_flags = fuse_recipe(args)
    text = f"""format: fxfuse-recipe/1
seed: 3
models: [{{checkpoint: {ckpt}}}, {{checkpoint: {ckpt}}}]
data: {{fusion: {{source: digits, samples: 64}}}}
method: {{name: np-merge, options: {{objective: ce}}}}
output: {{checkpoint: {tmp_path / 'f.pt'}}}
"""
    from_file = parse_recipe(text)
    for field in ("models", "data", "method", "output", "seed", "device", "importance", "compare", "report"):
        assert getattr(from_flags, field) == getattr(from_file, field), field
    assert from_flags.fuse_kwargs() == from_file.fuse_kwargs()


def test_recipe_errors_are_value_errors_with_the_key():
    with pytest.raises(RecipeError, match=r"line 3: `data.fusion.source`: unknown value 'digit'; did you mean `digits`"):
        parse_recipe("format: fxfuse-recipe/1\nmodels: [test_resnet, test_resnet]\ndata: {fusion: {source: digit}}\n"
                     "method: vanilla\noutput: {path: o}\n", check_files=False)
    with pytest.raises(ValueError, match=r"`models`: fusion needs two or more models, got 1"):
        parse_recipe("format: fxfuse-recipe/1\nmodels: [test_resnet]\ndata: {}\nmethod: x\noutput: {}\n",
                     check_files=False)
    with pytest.raises(RecipeError, match=r"missing key `method`"):
        parse_recipe("format: fxfuse-recipe/1\nmodels: [a, b]\ndata: {}\noutput: {}\n", check_files=False)


def _fake_demo(folder):
    """What `fxfuse demo` leaves behind, with untrained bases (the examples only need the files)."""
    from fxfuse._cli_fusion import write_demo_inputs
    from fxfuse.data import load_digits

    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1).eval())
    x, y = load_digits(size=16)
    write_demo_inputs(models, (x[:64], y[:64]), (x[64:128], y[64:128]), str(folder / "fxfuse-demo"))


@pytest.mark.parametrize("name", ["digits_cnn.yaml", "digits_skewed_sample.yaml"])
def test_example_recipes_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_demo(tmp_path)
    text = open(os.path.join(EXAMPLES, name)).read()
    # keep the test fast: fewer samples and epochs than the example's
    text = text.replace("samples: 400", "samples: 48").replace("options: {n_init: 1}", "options: {n_init: 1, epochs: 2}")
    path = tmp_path / name
    path.write_text(text)
    assert main(["run", str(path), "--quiet"]) == 0
    out = tmp_path / parse_recipe(text, check_files=False).output.path
    rep = json.loads((out / "report.json").read_text())
    assert rep["results"][-1]["kind"] == "fused" and rep["results"][-1]["accuracy"] is not None
    assert timm.create_model(f"local-dir:{out}", pretrained=True) is not None


@pytest.mark.slow
def test_demo_bases_train_bit_for_bit_the_same(tmp_path):
    code = (
        "import hashlib, torch\n"
        "from fxfuse._experiments import make_setting\n"
        "for arch in ('mlp', 'cnn'):\n"
        "    s = make_setting(arch, split='dirichlet', n_models=2, seed=0)\n"
        "    print(hashlib.sha1(b''.join(v.numpy().tobytes() for m in s.models for v in m.state_dict().values()))"
        ".hexdigest())\n"
    )
    # outside the repository, so the installed package is imported
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.split()) == 2



BASE = """format: fxfuse-recipe/1
models: [test_resnet, test_resnet]
data: {fusion: {source: digits}}
method: kf-linear
output: {path: o}
"""


@pytest.mark.parametrize("old,new,expected", [
    ("data: {fusion: {source: digits}}", "data: {fusion: {source: digits}, transform: {from_model: 2}}",
     "`data.transform.from_model`: is an index into `models` (0 to 1), got 2"),
    ("data: {fusion: {source: digits}}", "data: {fusion: {source: digits}, transform: {std: [0.5, 0]}}",
     "`data.transform.std`: must be positive"),
    ("data: {fusion: {source: digits}}", "data: {fusion: {source: digits}, transform: {input_size: [3, 32]}}",
     "`data.transform.input_size`: must be three positive integers [C, H, W]"),
    ("data: {fusion: {source: digits}}", "data: {fusion: {source: digits}, transform: {crop_pct: 1.5}}",
     "`data.transform.crop_pct`: must be in (0, 1]"),
    ("data: {fusion: {source: digits}}", "data: {fusion: {source: digits}, transform: {interpolation: cubic}}",
     "did you mean `bicubic`?"),
    ("{source: digits}", "{source: digits, path: x}", "`data.fusion.path`: the digits are embedded; remove `path`"),
    ("{source: digits}", "{source: digits, resize: true}", "`data.fusion.resize`: only tensor files are resized"),
    ("{source: digits}", "{source: imagefolder, path: x, split: train}",
     "`data.fusion.split`: only the digits have a built-in split"),
    ("{source: digits}", "{source: tensors}", "source tensors needs `path`"),
    ("{source: digits}", "{source: digits, samples: 0}", "`data.fusion.samples`: must be a positive integer"),
    ("output: {path: o}", "output: {path: o}\nreport: {html: /tmp/r.html}",
     "`report.html`: '/tmp/r.html': report files go inside output.path"),
    ("output: {path: o}", "output: {formats: [safetensors]}", "`output`: missing key `path`"),
    ("method: kf-linear", "method: {name: kf-linear, options: {target: 1}}", "`method.options.target`"),
    ("models: [test_resnet, test_resnet]", "models: [test_resnt, test_resnet]",
     "`models[0].model`: unknown timm model 'test_resnt'; did you mean 'test_resnet'"),
    ("models: [test_resnet, test_resnet]", "models: [{model: 'local-dir:x', checkpoint: a.pt}, test_resnet]",
     "`models[0].checkpoint`: a local-dir: model holds its own weights"),
    ("models: [test_resnet, test_resnet]", "models: [{checkpoint: a.pt, model_args: {num_classes: 3}}, test_resnet]",
     "`models[0].model_args`: model_args need `model`"),
])
def test_every_recipe_key_is_checked(old, new, expected):
    assert old in BASE
    with pytest.raises(RecipeError) as e:
        parse_recipe(BASE.replace(old, new), check_files=False)
    assert expected in str(e.value)
    assert parse_recipe(BASE, check_files=False).method.name == "kf-linear"  # the base recipe is valid


DEPTH_RECIPE = """\
format: fxfuse-recipe/1
models:
  - {model: resnet18, checkpoint: shallow.safetensors, model_args: {layers: [1, 1, 1, 1], channels: [8, 16, 16, 32], stem_width: 8, num_classes: 10, in_chans: 1}}
  - {model: resnet18, checkpoint: deep.safetensors, model_args: {layers: [2, 2, 1, 1], channels: [8, 16, 16, 32], stem_width: 8, num_classes: 10, in_chans: 1}}
data:
  fusion: {source: digits, split: train, samples: 64}
  eval: {source: digits, split: test}
  transform: {input_size: [1, 16, 16]}
method: kf-linear
output: {path: out/fused, formats: [safetensors]}
"""


def test_a_recipe_fuses_models_of_different_depth_into_the_deeper_architecture(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, layers in (("shallow", [1, 1, 1, 1]), ("deep", [2, 2, 1, 1])):
        torch.manual_seed(len(layers) + sum(layers))
        m = timm.create_model("resnet18", pretrained=False, layers=layers, channels=(8, 16, 16, 32), stem_width=8,
                              num_classes=10, in_chans=1)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / f"{name}.safetensors")
    (tmp_path / "out").mkdir()
    recipe = _write(tmp_path, DEPTH_RECIPE)
    assert main(["run", recipe, "--dry-run"]) == 0
    assert "depths differ: every model is aligned to models[1]" in capsys.readouterr().out
    assert main(["run", recipe, "--quiet"]) == 0
    fused = timm.create_model("local-dir:out/fused", pretrained=True)  # the deeper architecture, as timm loads it
    assert len(fused.layer1) == 2 and len(fused.layer2) == 2 and len(fused.layer3) == 1
    rep = json.loads((tmp_path / "out" / "fused" / "report.json").read_text())
    assert [lv["name"] for lv in rep["levels"] if lv["identity"]] == ["layer1.1", "layer2.1"]
    assert "identity level in models[0]" in (tmp_path / "out" / "fused" / "report.html").read_text()
