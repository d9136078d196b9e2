"""The paper's evaluation: accuracy by Algorithm 2 and with no noise, always both; sigma statistics."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from vpn_dist.method import alg2_predict, bound_sigma, condition, predict_no_noise

SUBSET_SEED = 0  # one fixed subset per split, the same in every run, so curves compare across runs


def epoch_eval_images(cfg, meta: dict[str, Any], world_size: int) -> int:
    """Images per split for the per-epoch curves: train.epoch_eval_images, or when it is null a subset that keeps
    them near a twentieth of the epoch's training cost, so that with the last epoch's evaluation of every image
    evaluation stays under a tenth of the run. Rank 0 evaluates while
    the workers share the training; an evaluated image runs the networks forward about K + 1 times (Algorithm 2's
    K hypotheses, and sigma), a trained one about 3 times (forward and backward). 100 images per split at least
    (curves, not noise), 500 at most."""
    if cfg.train.epoch_eval_images is not None:
        return cfg.train.epoch_eval_images
    splits = 2 if meta["splits"].get("val") else 1
    passes = meta["num_classes"] + 1 if cfg.model.generator != "none" else 1
    if cfg.train.alg2_top_k:
        passes = min(passes, cfg.train.alg2_top_k + 2)  # h(x), then k hypotheses
    affordable = 0.05 * 3 * meta["splits"]["train"] / world_size / (passes * splits)
    return int(min(500, max(100, affordable)))


def eval_loaders(cfg, meta: dict[str, Any], device: torch.device, images: int = 0) -> dict:
    """Loaders over the val (when prepared) and test splits, in file order; `images` > 0 keeps a fixed random
    subset of that many images per split (a random one: test sets stored class by class would otherwise give
    one class)."""
    from vpn_dist.data import Loader

    loaders = {}
    for split in (["val", "test"] if meta["splits"].get("val") else ["test"]):
        n = meta["splits"][split]
        indices = None
        if 0 < images < n:
            indices = np.sort(np.random.default_rng(SUBSET_SEED).choice(n, size=images, replace=False))
        loaders[split] = Loader(cfg.data.path, split, batch_size=cfg.train.eval_batch_size, train=False,
                                device=device, num_workers=cfg.data.num_workers, os_cache=cfg.data.os_cache,
                                channels_last=cfg.train.channels_last, with_mask=bool(meta.get("has_mask")),
                                indices=indices, backend=cfg.data.loader, resolution=cfg.data.resolution)
    return loaders


def evaluate_splits(base: nn.Module, generator: nn.Module | None, loaders: dict, *, num_classes: int,
                    gamma: float, bound: str, C: float | None, autocast=None, top_k: int = 0) -> dict[str, Any]:
    """`{split}_{metric}` for every split, and `{split}_acc`: the one selection metric for every mode
    (Algorithm 2 where there is a generator, no-noise accuracy without one)."""
    metrics: dict[str, Any] = {}
    for split, batches in loaders.items():
        result = evaluate(base, generator, batches, num_classes=num_classes, gamma=gamma, bound=bound, C=C,
                          autocast=autocast, top_k=top_k)
        metrics.update({f"{split}_{k}": v for k, v in result.items()})
        metrics[f"{split}_acc"] = result["acc_alg2"] if generator is not None else result["acc_no_noise"]
    return metrics


def background_auroc(sigma_map: torch.Tensor, background: torch.Tensor) -> float:
    """AUROC of sigma as a score for "this pixel is background" (Mann-Whitney U over all pixels).

    0.5: sigma ignores the object; 1.0: every background pixel gets more noise than every object pixel.
    """
    scores = sigma_map.flatten().double()
    labels = background.flatten().bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    # average the ranks of tied scores so ties count one half
    uniq, inverse = torch.unique(scores, return_inverse=True)
    if len(uniq) < len(scores):
        ranks = torch.zeros_like(uniq).index_add_(0, inverse, ranks)[inverse] / torch.bincount(inverse)[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@torch.no_grad()
def evaluate(base: nn.Module, generator: nn.Module | None, batches: Iterable, *, num_classes: int, gamma: float,
             bound: str, C: float | None, autocast: contextlib.AbstractContextManager | None = None,
             max_rows: int = 8192, top_k: int = 0) -> dict[str, float | None]:
    """Accuracy by Algorithm 2 (None without a generator; over the top_k classes of h(x) when top_k > 0) and with
    no noise; sigma mean/max/at-bound, the share of its variance across images, how much it moves when only the
    label changes (to the next class: mean |sigma(x, y+1 mod K) - sigma(x, y)| over mean sigma(x, y)), and its
    background AUROC when the batches carry foreground masks (x, y, mask)."""
    was_training = [(mod, mod.training) for mod in (base, generator) if mod is not None]
    for mod, _ in was_training:
        mod.eval()
    autocast = autocast or contextlib.nullcontext()
    n = correct_alg2 = correct_plain = 0
    sigma_sum, sigma_max, at_bound, sigma_count = 0.0, 0.0, 0.0, 0
    label_change_sum = 0.0  # |sigma(x, another label) - sigma(x, y)|: what the label alone moves
    sigma_maps, backgrounds = [], []
    per_pixel_sum = per_pixel_sq = None  # sigma's moments per pixel across images (float64)
    for batch in batches:
        x, y = batch[0], batch[1]
        with autocast:
            correct_plain += int((predict_no_noise(base, x) == y).sum())
            if generator is not None:
                correct_alg2 += int((alg2_predict(base, generator, x, num_classes, gamma, bound, C,
                                                  max_rows=max_rows, top_k=top_k) == y).sum())
                raw = generator(condition(x, y, gamma)).float()
                sigma = bound_sigma(raw, bound, C)
                other_label = (y + 1) % num_classes
                sigma_other = bound_sigma(generator(condition(x, other_label, gamma)).float(), bound, C)
        n += len(y)
        if generator is None:
            continue
        sigma_sum += float(sigma.sum())
        label_change_sum += float((sigma_other - sigma).abs().sum())
        sigma_max = max(sigma_max, float(sigma.max()))
        sigma_count += sigma.numel()
        at_bound += _at_bound(raw, sigma, bound, C)
        flat = sigma.flatten(1).double()
        per_pixel_sum = flat.sum(0) if per_pixel_sum is None else per_pixel_sum + flat.sum(0)
        per_pixel_sq = (flat ** 2).sum(0) if per_pixel_sq is None else per_pixel_sq + (flat ** 2).sum(0)
        if len(batch) > 2:
            sigma_maps.append(sigma.mean(dim=1).cpu())
            backgrounds.append(batch[2][:, 0].cpu() < 0.5)
    for mod, training in was_training:
        mod.train(training)
    metrics: dict[str, float | None] = {
        "acc_alg2": correct_alg2 / max(n, 1) if generator is not None else None,
        "acc_no_noise": correct_plain / max(n, 1),
    }
    if generator is not None:
        metrics.update(sigma_mean=sigma_sum / max(sigma_count, 1), sigma_max=sigma_max,
                       sigma_frac_at_bound=at_bound / max(n, 1),
                       sigma_between_image_share=between_image_share(per_pixel_sum, per_pixel_sq, n),
                       # 0: the label does not move sigma; 1: changing it moves sigma by its own mean size
                       sigma_label_change=label_change_sum / sigma_sum if sigma_sum > 0 else 0.0)
        if sigma_maps:
            metrics["sigma_bg_auroc"] = background_auroc(torch.cat(sigma_maps), torch.cat(backgrounds))
    return metrics


def between_image_share(per_pixel_sum: torch.Tensor, per_pixel_sq: torch.Tensor, n: int) -> float:
    """The share of sigma's variance (over images and pixels) that varies across images at a fixed pixel:
    mean_p Var_i(sigma_ip) / Var_ip(sigma_ip). A generator that ignores its input gives 0."""
    mean_p = per_pixel_sum / n
    across_images = (per_pixel_sq / n - mean_p ** 2).clamp_min(0).mean()
    total = per_pixel_sq.sum() / (n * len(mean_p)) - (per_pixel_sum.sum() / (n * len(mean_p))) ** 2
    return float(across_images / total) if total > 0 else 0.0


def _at_bound(raw: torch.Tensor, bounded: torch.Tensor, bound: str, C: float | None) -> float:
    """How many samples' sigma the bound touched (elementwise: the share of clipped entries, summed per sample)."""
    if bound == "none":
        return 0.0
    if bound == "elementwise":
        return float((raw >= C).flatten(1).float().mean(dim=1).sum())
    return float((raw.flatten(1).norm(dim=1) > C).sum())
