"""A tiny, seeded model zoo for the tests."""

from __future__ import annotations

import torch
from torch import nn

# timm models of the foundation issue, with the input size each is traced at.
# Small inputs keep the suite fast; mobilevit needs 64 px (five stride-2 stages
# and 2x2 unfolding patches). img_size is passed to models with a fixed size.
TIMM_ZOO: dict[str, int] = {
    "resnet18": 32,
    "resnet34": 32,
    "resnet50": 32,
    "resnet10t": 32,
    "vgg11": 32,
    "vgg16": 32,
    "vit_tiny_patch16_224": 32,
    "deit_tiny_patch16_224": 32,
    "convnext_atto": 32,
    "efficientnet_b0": 32,
    "mobilenetv3_small_100": 32,
    "regnetx_002": 32,
    "densenet121": 32,
    "mixer_s16_224": 32,
    "poolformer_s12": 32,
    "ghostnet_100": 32,
    "levit_128s": 32,
    "mobilevit_xxs": 64,
    "swin_tiny_patch4_window7_224": 32,
}


def mlp(seed: int = 0, d_in: int = 16, hidden: tuple[int, ...] = (12, 10), d_out: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    d = d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers).eval()


class ConvBN(nn.Module):
    """conv-BN-ReLU twice, global pooling and a linear head."""

    def __init__(self, width: int = 8, n_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResNetTiny(nn.Module):
    def __init__(self, c: int = 8, n_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, n_classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomise_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters (a trained model's are not 0/1); eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def seeded(model_fn, seed: int = 0, *args, **kwargs) -> nn.Module:
    """Build a model with a fixed seed and randomised BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomise_bn(model_fn(*args, **kwargs))


class Gate(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace through it."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.gate = Gate()
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(self.gate(self.fc1(x)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


class TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y, y.softmax(-1)
