"""The VPN method (paper sections 3.2-3.3, Algorithms 1 and 2), model-agnostic.

x is in [0, 1] with shape (B, C, H, W); y holds class indices; `base` returns logits; `generator` returns
a non-negative map with the shape of its input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def condition(x: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """x_hat = x + gamma * y: the label enters the generator as a per-image bias."""
    return x + gamma * y.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def bound_sigma(sigma: torch.Tensor, bound: str, C: float | None) -> torch.Tensor:
    """Project sigma onto ||Sigma|| <= C; a projection (not a detach), so gradients keep flowing inside the set."""
    if bound == "none":
        return sigma
    if bound == "elementwise":
        return sigma.clamp(max=C)
    if bound == "norm":
        norms = sigma.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (C / norms).clamp(max=1.0)
        return sigma * scale.view(-1, *([1] * (sigma.dim() - 1)))
    raise ValueError(f"unknown bound {bound!r}")


def generate_sigma(generator: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float, bound: str,
                   C: float | None) -> torch.Tensor:
    """sigma = bound(f_theta(x + gamma*y)), in fp32 whatever autocast did inside the generator."""
    return bound_sigma(generator(condition(x, y, gamma)).float(), bound, C)


def sample_noise(sigma: torch.Tensor, m: int, e: torch.Tensor | None = None) -> torch.Tensor:
    """m zero-mean draws per sample by reparameterization, eps_j = sigma * e_j with e_j ~ N(0, I).

    Returns (m * B, ...) ordered draw-major (all samples of draw 0, then draw 1, ...), matching x.repeat(m).
    """
    if e is None:
        e = torch.randn((m, *sigma.shape), device=sigma.device, dtype=sigma.dtype)
    return (sigma.unsqueeze(0) * e).flatten(0, 1)


def vpn_loss(logits: torch.Tensor, y: torch.Tensor, m: int) -> torch.Tensor:
    """Eq. 17: -1/(n m) sum_i sum_j log softmax(h(x_i + eps_ij))[y_i]; logits are draw-major (m * n rows)."""
    return F.cross_entropy(logits.float(), y.repeat(m))


def random_pixel_noise(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The paper's `random` ablation: per image, a random `fraction` of pixel positions get N(0, 1) noise."""
    b, c, h, w = x.shape
    k = round(fraction * h * w)
    chosen = torch.rand(b, h * w, device=x.device).topk(k, dim=1).indices  # a uniform k-subset, cheaper than argsort
    mask = torch.zeros(b, h * w, device=x.device, dtype=x.dtype).scatter_(1, chosen, 1.0)
    return x + mask.view(b, 1, h, w) * torch.randn_like(x)


def isotropic_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """The isotropic control: x + N(0, std^2 I), the same scale on every pixel of every image (no generator)."""
    return x + std * torch.randn_like(x)


@torch.no_grad()
def alg2_scores(base: nn.Module, generator: nn.Module, x: torch.Tensor, num_classes: int, gamma: float,
                bound: str, C: float | None, e: torch.Tensor | None = None, max_rows: int = 8192,
                top_k: int = 0) -> torch.Tensor:
    """Algorithm 2: q_Y = softmax(h(x + eps_Y))[Y] with eps_Y ~ N(0, Sigma(x, Y)), for every class Y.

    top_k > 0 (approximate): only the top_k classes most probable under h(x) are scored; the others get -inf,
    so argmax picks among them, and top_k = K is exact Algorithm 2. All hypotheses of a sample run as rows of one
    batch (chunked to `max_rows`). `e` (B, K, C, H, W) fixes the standard-normal draws, one per (image, class),
    for tests. Returns (B, K).
    """
    b, k = x.shape[0], num_classes
    if e is None:
        e = torch.randn((b, k, *x.shape[1:]), device=x.device, dtype=torch.float32)
    if 0 < top_k < k:
        hypotheses = base(x).float().topk(top_k, dim=1).indices.sort(dim=1).values  # (B, top_k)
    else:
        hypotheses = torch.arange(k, device=x.device).expand(b, k)
    per_image = hypotheses.shape[1]
    per_chunk = max(1, max_rows // per_image)
    scores = torch.full((b, k), float("-inf"), device=x.device)
    for start in range(0, b, per_chunk):
        xs, ys = x[start:start + per_chunk], hypotheses[start:start + per_chunk]
        x_rows, y_rows = xs.repeat_interleave(per_image, dim=0), ys.flatten()  # sample-major: (x0,Y0), (x0,Y1), ...
        if hasattr(generator, "sigma_per_class"):  # a generator that shares work across the hypotheses
            sigma = bound_sigma(generator.sigma_per_class(xs, gamma, ys).float(), bound, C)
        else:
            sigma = generate_sigma(generator, x_rows, y_rows, gamma, bound, C)
        draws = e[start:start + per_chunk].gather(1, ys.view(*ys.shape, *[1] * (x.dim() - 1)).expand(
            *ys.shape, *x.shape[1:]))
        probs = base(x_rows + sigma * draws.flatten(0, 1)).float().softmax(dim=1)
        q = probs[torch.arange(len(y_rows), device=x.device), y_rows].view(ys.shape)
        scores[start:start + per_chunk].scatter_(1, ys, q)
    return scores


def alg2_predict(base: nn.Module, generator: nn.Module, x: torch.Tensor, num_classes: int, gamma: float,
                 bound: str, C: float | None, e: torch.Tensor | None = None, max_rows: int = 8192,
                 top_k: int = 0) -> torch.Tensor:
    """Algorithm 2 prediction: argmax_Y q_Y (over the top_k classes of h(x) when top_k > 0)."""
    return alg2_scores(base, generator, x, num_classes, gamma, bound, C, e, max_rows, top_k).argmax(dim=1)


@torch.no_grad()
def predict_no_noise(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The paper's "No Noise" rule: argmax h(x)."""
    return base(x).argmax(dim=1)
