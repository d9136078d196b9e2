"""Base classifiers h_phi and noise generators f_theta (paper section 4.1), built from torchvision where it has them."""
from __future__ import annotations

import math

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from vpn_dist.errors import UserError

BASE_MODELS = ("sr", "dnn3", "resnet18", "resnet34", "resnet50")
GENERATORS = ("dnn3", "resnet18")


def is_torchvision_classifier(name: str) -> bool:
    return name in torchvision.models.list_models(module=torchvision.models)


def dnn3(d_in: int, d_out: int, width: int = 1024) -> nn.Sequential:
    """The paper's 3-layer MLP, d_in-1024-1024-d_out."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), nn.ReLU(inplace=True), nn.Linear(width, width),
                         nn.ReLU(inplace=True), nn.Linear(width, d_out))


def small_input_resnet(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet with the authors' stem for small images: 3x3 stride-1 conv, no max-pool."""
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class RepeatChannels(nn.Module):
    """Feeds grayscale images to torchvision models that expect RGB."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def build_base(name: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = shape
    d = c * h * w
    if name == "sr":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes))
    if name == "dnn3":
        return dnn3(d, num_classes)
    if name.startswith("resnet") and name in BASE_MODELS:
        return small_input_resnet(name, c, num_classes)
    if not is_torchvision_classifier(name):
        raise UserError(f"unknown base model {name!r}; use {', '.join(BASE_MODELS)} or a torchvision classifier")
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if c == 1:
        net = nn.Sequential(RepeatChannels(), net)
    try:  # torchvision models declare no input size; one dry forward tells whether this one fits
        with torch.no_grad():
            net.eval()(torch.zeros(2, c, h, w))
    except Exception as err:  # noqa: BLE001 - any failure means the model does not take this input
        raise UserError(f"base model {name!r} does not accept {c}x{h}x{w} inputs: {err}") from None
    return net.train()


class AbsDNN3(nn.Module):
    """The DNN3 generator, d-1024-1024-d; sigma = |last layer| as in the authors' code."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.shape = shape
        self.net = dnn3(math.prod(shape), math.prod(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, *self.shape).abs()


class ResNet18Generator(nn.Module):
    """The authors' ResNet-18 generator: torchvision's 7x7 stride-2 stem with max-pool, four stages of
    BasicBlocks ending at 64 channels (kept at 1/4 resolution so sigma stays spatial), bilinear upsampling to
    the input size, a 3x3 conv to C channels, |.|."""

    def __init__(self, shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        c = shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        self.stages = nn.Sequential(*[BasicBlock(width, width) for _ in range(4 * 2)])
        self.head = nn.Conv2d(width, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        features = nn.functional.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(features).abs()


def build_generator(name: str, shape: tuple[int, int, int]) -> nn.Module:
    if name == "dnn3":
        return AbsDNN3(shape)
    if name == "resnet18":
        return ResNet18Generator(shape)
    raise UserError(f"unknown generator {name!r}; use {', '.join(GENERATORS)} or none")
