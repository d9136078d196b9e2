"""The authors' generators, pinned (GitHub hyzhang98/VPN, pi_noise_generator.py; docs/fidelity.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vpn_dist.models import build_generator


def test_dnn3_generator_starts_at_the_authors_init_so_sigma_starts_near_zero():
    torch.manual_seed(0)
    generator = build_generator("dnn3", (1, 28, 28))
    linears = [m for m in generator.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(1024, 784), (1024, 1024), (784, 1024)]
    for layer in linears:
        assert layer.weight.std().item() == pytest.approx(0.002, rel=0.02)
        assert abs(layer.weight.mean().item()) < 2e-4
        assert torch.count_nonzero(layer.bias) == 0
    sigma = generator(torch.rand(64, 1, 28, 28))
    assert sigma.min() >= 0 and sigma.max() < 1e-3  # PyTorch's default init gives sigma ~ 0.05-0.2


@pytest.mark.parametrize("size, maps", [(28, [7, 4, 2, 1]), (32, [8, 4, 2, 1]), (64, [16, 8, 4, 2])])
def test_resnet18_generator_stages_are_64_128_256_64_down_to_a_32nd_of_the_input(size, maps):
    generator = build_generator("resnet18", (3, size, size)).eval()
    shapes = []
    hooks = [stage.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
             for stage in (generator.stages[1], generator.stages[3], generator.stages[5], generator.stages[7])]
    with torch.no_grad():
        sigma = generator(torch.rand(2, 3, size, size))
    for hook in hooks:
        hook.remove()
    assert shapes == [(c, s, s) for c, s in zip((64, 128, 256, 64), maps)]
    assert sigma.shape == (2, 3, size, size) and sigma.min() >= 0
    assert generator.head.bias is None and generator.head.kernel_size == (3, 3)
    assert isinstance(generator.stem[0], nn.Conv2d) and generator.stem[0].kernel_size == (7, 7)
    assert isinstance(generator.stem[3], nn.MaxPool2d)


def test_resnet18_generator_sigma_is_flat_inside_small_images():
    """A 1x1 last map, upsampled, is one value per channel: away from the 3x3 head's zero padding, sigma
    cannot vary across pixels of a 32x32 image. This is the authors' design, and why it cannot place noise
    on the background of small images (docs/fidelity.md)."""
    generator = build_generator("resnet18", (3, 32, 32)).eval()
    with torch.no_grad():
        sigma = generator(torch.rand(2, 3, 32, 32))
    inner = sigma[:, :, 1:-1, 1:-1]
    assert torch.allclose(inner, inner[:, :, :1, :1].expand_as(inner))
    assert not torch.allclose(sigma[0], sigma[1])  # but it does depend on the image
