import pytest
import timm
import torch

import fxfuse
from zoo import ConvBN, mlp, seeded


@pytest.fixture(scope="module")
def fused_cnn():
    a, b = seeded(ConvBN, 0), seeded(ConvBN, 1)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return fxfuse.fuse([a, b], x, method="kf-linear", progress=False), x


@pytest.mark.parametrize("fmt,load", [
    ("torchscript", lambda p: torch.jit.load(p)),
    ("export", lambda p: torch.export.load(p).module()),
])
def test_export_round_trip(tmp_path, fused_cnn, fmt, load):
    fused, x = fused_cnn
    path = fxfuse.export(fused, tmp_path / f"m.{fmt}", x[:4], format=fmt)
    loaded = load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[4:10]), fused(x[4:10]))  # another batch size too


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_export_fused_timm_model(tmp_path, fmt):
    a = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1)
    b = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1)
    x = torch.randn(32, 1, 16, 16)
    fused = fxfuse.fuse([a, b], x, method="kf-linear", epochs=1, progress=False)
    fxfuse.export(fused, tmp_path / "m", x[:2], format=fmt)


def test_export_bad_format(tmp_path):
    with pytest.raises(ValueError, match="valid formats: torchscript, export"):
        fxfuse.export(mlp(), tmp_path / "m", torch.randn(2, 16), format="onnx")
