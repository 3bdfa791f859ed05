import pytest
import timm
import torch

import fxfuse


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    path = tmp_path / "m.pt"
    fxfuse.save_checkpoint(model, path, "resnet10t", num_classes=4, input_size=(3, 32, 32))
    loaded, size = fxfuse.load_checkpoint(path)
    assert size == (3, 32, 32) and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_plain_dict_checkpoint_with_num_classes(tmp_path):
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    path = tmp_path / "m.pt"
    torch.save({"arch": "resnet10t", "num_classes": 2, "state_dict": model.state_dict()}, path)
    loaded, size = fxfuse.build_model(path)
    assert loaded.fc.out_features == 2
    assert size == tuple(loaded.pretrained_cfg["input_size"])  # timm's configured size when none is stored


def test_bad_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an fxfuse checkpoint.*'weights'"):
        fxfuse.load_checkpoint(bad)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a torch file")
    with pytest.raises(ValueError, match="is not a plain PyTorch file of tensors"):
        fxfuse.load_checkpoint(junk)
    wrong = tmp_path / "wrong.pt"
    torch.save({"arch": "resnet10t", "state_dict": {"fc.weight": torch.zeros(3, 3)}}, wrong)
    with pytest.raises(ValueError, match="does not fit timm's 'resnet10t'"):
        fxfuse.load_checkpoint(wrong)


def test_build_model_fixed_size_models_get_img_size():
    model, size = fxfuse.build_model("vit_tiny_patch16_224", input_size=(3, 32, 32), num_classes=5)
    assert size == (3, 32, 32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        fxfuse.build_model("resnet18x")
