"""Base classifiers h_phi and noise generators f_theta (paper section 4.1), built from torchvision where it has them."""
from __future__ import annotations

import math

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from vpn_dist.config import GENERATORS
from vpn_dist.errors import UserError

BASE_MODELS = ("sr", "dnn3", "resnet18", "resnet34", "resnet50")


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


AUTHORS_GENERATOR_INIT_STD = 0.002


class AbsDNN3(nn.Module):
    """The authors' DNN3 generator, d-1024-1024-d, sigma = |last layer|. Every Linear starts at N(0, 0.002^2)
    with zero bias (std 0.002, as `pi_noise_generator.py` does), so sigma starts near 0: training begins from
    the noise-free model and the generator grows noise only where it lowers the loss.

    init_std: another std for that init, or "pytorch" to keep PyTorch's default (weights and biases uniform in
    +-1/sqrt(fan_in)): under SGD sigma can stay collapsed near its small start, so the scale is worth varying."""

    def __init__(self, shape: tuple[int, int, int], init_std: float | str | None = None):
        super().__init__()
        self.shape = shape
        self.net = dnn3(math.prod(shape), math.prod(shape))
        if init_std == "pytorch":
            return
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, AUTHORS_GENERATOR_INIT_STD if init_std is None else init_std)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, *self.shape).abs()

    def sigma_per_class(self, x: torch.Tensor, gamma: float, classes: torch.Tensor) -> torch.Tensor:
        """f(x + gamma*Y) for each image's hypotheses `classes` (B, k), rows sample-major (x0 Y0, x0 Y1, ...), as
        Algorithm 2 needs. The first layer is linear in x_hat = x + gamma*Y: W x_hat + b = (W x + b) +
        gamma*Y * W.sum(1), so it runs once per image instead of once per class (exact up to float rounding)."""
        first, rest = self.net[1], self.net[2:]
        per_image = first(x.flatten(1))  # (B, width)
        label_shift = gamma * classes.to(per_image.dtype)  # (B, k)
        hidden = per_image[:, None, :] + label_shift[:, :, None] * first.weight.sum(dim=1).to(per_image.dtype)
        return rest(hidden.flatten(0, 1)).view(-1, *self.shape).abs()


class ResNet18Generator(nn.Module):
    """The authors' ResNet-18 generator (`GaussianNoiseGeneratorResnet18`): a 7x7 stride-2 conv + BN + ReLU +
    3x3 stride-2 max-pool, BasicBlock stages of 64, 128, 256 and 64 channels with strides 1, 2, 2, 2 (the last
    map is 1/32 of the input: 1x1 for 28x28 or 32x32 images), bilinear upsampling to the input size
    (align_corners=True, as nn.UpsamplingBilinear2d), a 3x3 conv without bias to C channels, |.|.
    PyTorch's default init, as theirs."""

    STAGES = ((64, 1), (128, 2), (256, 2), (64, 2))  # (channels, stride of the stage's first block)

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        c = shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        blocks, width = [], 64
        for channels, stride in self.STAGES:
            downsample = None
            if stride != 1 or width != channels:
                downsample = nn.Sequential(nn.Conv2d(width, channels, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(channels))
            blocks += [BasicBlock(width, channels, stride, downsample), BasicBlock(channels, channels)]
            width = channels
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Conv2d(width, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        features = nn.functional.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return self.head(features).abs()


def build_generator(name: str, shape: tuple[int, int, int], init_std: float | str | None = None) -> nn.Module:
    """init_std: model.generator_init_std (the DNN3 generator's; the ResNet-18 generator keeps PyTorch's init)."""
    if name == "dnn3":
        return AbsDNN3(shape, init_std)
    if name == "resnet18":
        return ResNet18Generator(shape)
    raise UserError(f"unknown generator {name!r}; use {', '.join(GENERATORS)} or none")


def build_models(cfg, meta: dict, device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """A run's base model and generator (None without one) for data of `meta`'s shape and classes, on `device` in
    the configured memory format (at `data.resolution` when the loader decodes crops of that side). `cfg` is a
    RunConfig."""
    c, h, w = meta["shape"]
    resolution, num_classes = cfg.data.resolution, meta["num_classes"]
    shape = (c, h, w) if resolution is None else (c, resolution, resolution)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    base = build_base(cfg.model.base, shape, num_classes).to(device, memory_format=memory_format)
    generator = None
    if cfg.model.generator != "none":
        generator = build_generator(cfg.model.generator, shape, cfg.model.generator_init_std)
        generator = generator.to(device, memory_format=memory_format)
    return base, generator
