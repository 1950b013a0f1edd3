"""Backbones and where they are split.

Every family is described by a :class:`BackboneSpec`: a *teacher* network (the plain classifier), the name of its
modules that the split bottleneck replaces (stem + first stage, as in Entropic Student), the tensor shape at the
split point, and the layout of the bottleneck encoder/decoder that stands in for those modules.

Two scales exist:

* machine scale (CIFAR-10, 32x32): ``resnet`` (deep), ``resnet_shallow`` and ``regnet``; small enough to train
  in minutes on two CPU cores;
* paper scale (ImageNet, 224x224): ``resnet50``, ``resnet101`` and ``regnety_6_4gf`` from torchvision, built with
  random weights (never downloaded); users load their own checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """What a split model needs to know about a backbone family."""

    name: str
    input_size: int
    num_classes: int
    split_channels: int  # channels of the teacher feature map the decoder reproduces
    latent_channels: int  # channels of the entropy-coded latent y
    encoder_stride: int  # total stride of the bottleneck encoder (one or two 5x5/2 convs)
    bottleneck_width: int  # hidden width of encoder/decoder
    hyper_channels: int  # channels of the MSHP side latent z
    builder: Callable[[int], Backbone]
    paper_scale: bool = False


class Normalize(nn.Module):
    """Per-channel mean/std normalisation inside the model, so every public input is an image in [0, 1]
    (attacks, defenses and the edge runtime all work in pixel space)."""

    def __init__(self, mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465),
                 std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A classifier seen as ``tail(head(normalize(x)))``; ``head`` is what a split model replaces."""

    def __init__(self, head: nn.Module, tail: nn.Module, normalize: Normalize | None = None) -> None:
        super().__init__()
        self.normalize = normalize or Normalize()
        self.head = head
        self.tail = tail

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map at the split point (what a split model's decoder learns to reproduce)."""
        return self.head(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.features(x))


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """Two 3x3 conv-BN-ReLU with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Classifier(nn.Module):
    def __init__(self, channels: int, num_classes: int, scale: float = 0.125) -> None:
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(channels, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1)) * self.scale


def cifar_resnet(num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 256),
                 blocks: tuple[int, ...] = (1, 1, 1)) -> Backbone:
    """ResNet-9 style net (max-pool downsampling); head = stem + stage 1 (output at 16x16)."""
    w0, w1, w2, w3 = widths
    head = nn.Sequential(_conv_bn(3, w0), _conv_bn(w0, w1, pool=True), *[Residual(w1) for _ in range(blocks[0])])
    tail = nn.Sequential(
        _conv_bn(w1, w2, pool=True), *[Residual(w2) for _ in range(blocks[1])],
        _conv_bn(w2, w3, pool=True), *[Residual(w3) for _ in range(blocks[2])],
        _Classifier(w3, num_classes),
    )
    return Backbone(head, tail)


class _YBlock(nn.Module):
    """RegNetY block: 1x1 -> grouped 3x3 (stride) -> squeeze-excitation -> 1x1, with a projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int = 16) -> None:
        super().__init__()
        groups = max(1, c_out // group_width)
        se = max(8, c_in // 4)
        self.a = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(c_out, c_out, 3, stride, 1, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_out, se, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(se, c_out, 1), nn.Sigmoid())
        self.c = nn.Sequential(nn.Conv2d(c_out, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.proj: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))
        h = self.c(h * self.se(h))
        return self.act(h + self.proj(x))


def cifar_regnet(num_classes: int = 10, widths: tuple[int, ...] = (48, 96, 192), depths: tuple[int, ...] = (1, 2, 2)
                 ) -> Backbone:
    """RegNetY-style net for 32x32 inputs; head = stem + stage 1 (output at 16x16)."""
    stem = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
    stages: list[nn.Module] = []
    c_in = 24
    for width, depth in zip(widths, depths, strict=False):
        blocks = [_YBlock(c_in if i == 0 else width, width, 2 if i == 0 else 1) for i in range(depth)]
        stages.append(nn.Sequential(*blocks))
        c_in = width
    head = nn.Sequential(stem, stages[0])
    tail = nn.Sequential(*stages[1:], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    return Backbone(head, tail)


def _torchvision_resnet(depth: int, num_classes: int) -> Backbone:
    from torchvision.models import resnet50, resnet101

    net = (resnet50 if depth == 50 else resnet101)(weights=None, num_classes=num_classes)
    head = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    tail = nn.Sequential(net.layer2, net.layer3, net.layer4, net.avgpool, nn.Flatten(), net.fc)
    return Backbone(head, tail, Normalize(IMAGENET_MEAN, IMAGENET_STD))


def _torchvision_regnet(num_classes: int) -> Backbone:
    # torchvision ships no RegNetY-6.4GF builder; its generic RegNet with pycls' published 6.4GF design
    # parameters (depth 25, w0 112, wa 33.22, wm 2.27, group width 72, SE 0.25) is that network.
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=25, w_0=112, w_a=33.22, w_m=2.27, group_width=72, se_ratio=0.25)
    net = RegNet(params, num_classes=num_classes)
    blocks = list(net.trunk_output.children())
    head = nn.Sequential(net.stem, blocks[0])
    tail = nn.Sequential(*blocks[1:], net.avgpool, nn.Flatten(), net.fc)
    return Backbone(head, tail, Normalize(IMAGENET_MEAN, IMAGENET_STD))


FAMILIES: dict[str, BackboneSpec] = {
    "resnet": BackboneSpec("resnet", 32, 10, 64, 24, 2, 96, 16, lambda n: cifar_resnet(n)),
    "resnet_shallow": BackboneSpec(
        "resnet_shallow", 32, 10, 32, 24, 2, 64, 16,
        lambda n: cifar_resnet(n, widths=(16, 32, 64, 128), blocks=(0, 0, 1))),
    "regnet": BackboneSpec("regnet", 32, 10, 48, 32, 2, 96, 16, lambda n: cifar_regnet(n)),
    "resnet50": BackboneSpec("resnet50", 224, 1000, 256, 24, 4, 96, 16,
                             lambda n: _torchvision_resnet(50, n), paper_scale=True),
    "resnet101": BackboneSpec("resnet101", 224, 1000, 256, 24, 4, 96, 16,
                              lambda n: _torchvision_resnet(101, n), paper_scale=True),
    "regnety_6_4gf": BackboneSpec("regnety_6_4gf", 224, 1000, 144, 64, 4, 96, 16,
                                  _torchvision_regnet, paper_scale=True),
}


def get_spec(arch: str) -> BackboneSpec:
    """Look up a family by name, with an error that lists the known ones."""
    try:
        return FAMILIES[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(FAMILIES)}") from None


def build_backbone(arch: str, num_classes: int | None = None) -> Backbone:
    spec = get_spec(arch)
    return spec.builder(num_classes or spec.num_classes)
