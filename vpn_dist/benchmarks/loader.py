"""`vpn-dist bench loader`: warm images/s of the training Loader's two backends (ffcv, memory) vs torchvision
ImageFolder vs a per-sample TensorDataset + DataLoader.

Each contender delivers what the training step consumes: float32 (B, C, H, W) in [0, 1] plus int64
labels, shuffled, same batch size.  One warm-up pass, then the median of `--passes` timed passes of
`--batches` batches each (an epoch restarts when it runs out).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vpn_dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="a `vpn-dist prep` output directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--imagefolder", type=Path, help="the same images as an ImageFolder split (e.g. .../train)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="loader threads/processes for ffcv and ImageFolder")
    parser.add_argument("--batches", type=int, default=0,
                        help="batches per timed pass (default 0: one epoch of the split)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes (the median is reported)")
    parser.add_argument("--device", default="cpu", help="where batches land (the memory backend keeps the set there)")


def _one_pass(loader, n_batches: int) -> tuple[int, float]:
    """Time `n_batches` batches, restarting the epoch as needed; touch each batch like a train step would."""
    images, done = 0, 0
    start = time.perf_counter()
    while done < n_batches:
        for batch in loader:
            x = batch[0]
            images += x.shape[0]
            x.sum()  # make sure the pixels are really there
            done += 1
            if done == n_batches:
                break
    return images, time.perf_counter() - start


def measure(loader, n_batches: int, passes: int) -> list[float]:
    """images/s of each timed pass, after one warm-up pass (JIT, worker start, page cache)."""
    _one_pass(loader, n_batches)
    rates = []
    for _ in range(passes):
        images, seconds = _one_pass(loader, n_batches)
        rates.append(images / seconds)
    return rates


def run(args) -> int:
    from torch.utils.data import DataLoader, TensorDataset

    from vpn_dist.data import Loader, read_meta

    if min(args.batch_size, args.passes) < 1 or args.batches < 0 or args.workers < 0:
        raise UserError("--batch-size and --passes must be >= 1, --batches and --workers >= 0")
    meta = read_meta(args.data, args.split)
    rows = []
    ffcv = Loader(args.data, args.split, batch_size=args.batch_size, train=True, num_workers=max(args.workers, 1),
                  device=args.device)
    args.batches = args.batches or len(ffcv)
    rows.append(("Loader, data.loader=ffcv", args.workers, measure(ffcv, args.batches, args.passes)))
    memory = Loader(args.data, args.split, batch_size=args.batch_size, train=True, device=args.device,
                    backend="memory")
    rows.append(("Loader, data.loader=memory", 0, measure(memory, args.batches, args.passes)))

    if args.imagefolder is not None:
        from torchvision import datasets, transforms

        if not args.imagefolder.is_dir():
            raise UserError(f"--imagefolder {args.imagefolder} is not a directory")
        folder = datasets.ImageFolder(str(args.imagefolder), transform=transforms.ToTensor())
        if len(folder) != meta["splits"][args.split]:
            print(f"note: {args.imagefolder} has {len(folder)} images, {args.split}.beton has "
                  f"{meta['splits'][args.split]}")
        dl = DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
        rows.append(("torchvision ImageFolder + DataLoader", args.workers, measure(dl, args.batches, args.passes)))

    # Per sample: the whole split as one float tensor, batches collated sample by sample.
    xs, ys = [], []
    for x, y in Loader(args.data, args.split, batch_size=1024, train=False, num_workers=max(args.workers, 1)):
        xs.append(x)
        ys.append(y)
    per_sample = DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=args.batch_size, shuffle=True,
                            num_workers=0)
    rows.append(("TensorDataset + DataLoader", 0, measure(per_sample, args.batches, args.passes)))

    print(f"\n{args.data}/{args.split}.beton: {meta['splits'][args.split]} images {meta['shape']}, "
          f"batch {args.batch_size}, {args.batches} batches x {args.passes} passes (median), "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'loader':38s} {'workers':>7s} {'images/s':>10s} {'(min-max)':>17s} {'ffcv / this':>12s}")
    best = statistics.median(rows[0][2])
    for name, workers, rates in rows:
        rate = statistics.median(rates)
        spread = f"{min(rates):.0f}-{max(rates):.0f}"
        print(f"{name:38s} {workers:7d} {rate:10.0f} {spread:>17s} {best / rate:11.2f}x")
    return 0
