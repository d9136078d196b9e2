"""`vpn-dist bench scale`: an ImageNet-shaped set through the whole data path, at N and 2N images.

Generates an ImageFolder of JPEGs (sides 160-500 pixels, 100 classes, train and a test split a tenth its
size), converts it with `vpn-dist prep imagefolder --max-side` in a child process while sampling the RSS of
that process and all its children (the writer processes), then reads the .beton at 224x224 with
crop-while-decoding and trains a few ResNet-50 steps from it. Conversion memory must not grow with N: the
table's last column is the ratio 2N / N.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from vpn_dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, required=True, help="a directory for the generated trees and .betons")
    parser.add_argument("--images", type=int, default=2000, help="N: train images of the smaller set (default 2000)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--max-side", type=int, default=256, help="prep --max-side (default 256)")
    parser.add_argument("--resolution", type=int, default=224, help="decoded crop side (default 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="prep and loader workers (default: every core)")
    parser.add_argument("--steps", type=int, default=3, help="timed ResNet-50 training steps (after one warm-up)")


# --------------------------------------------------------------------------- the generated tree

def _one_jpeg(job) -> int:
    """A random scene of random size (coarse noise blown up into texture, rectangles, a disc) saved as JPEG at
    quality 90; returns its bytes. Cheap to draw, and it compresses about like a photo."""
    from PIL import Image, ImageDraw

    path, seed = job
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(160, 501, 2))
    coarse = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        draw.rectangle([x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))],
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    r = int(rng.integers(10, min(h, w) // 3))
    draw.ellipse([w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)
    return Path(path).stat().st_size


def generate_tree(root: Path, train_images: int, *, classes: int = 100, seed: int = 0, workers: int = 2,
                  reuse: Path | None = None) -> int:
    """An ImageFolder (train/ and test/, `classes` folders) of generated JPEGs; returns the bytes written. Image i
    depends only on (seed, split, i), so the 2N tree extends the N one: the files `reuse` (a smaller tree of the
    same seed) already has are hard-linked from it instead of drawn again."""
    jobs = []
    for split, count, stream in (("train", train_images, 0), ("test", max(classes, train_images // 10), 1)):
        for i in range(count):
            jobs.append((str(root / split / f"c{i % classes:03d}" / f"{i:07d}.jpg"), [seed, stream, i]))
    todo = []
    for path, job_seed in jobs:
        if Path(path).exists():
            continue
        earlier = None if reuse is None else reuse / Path(path).relative_to(root)
        if earlier is not None and earlier.exists():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            os.link(earlier, path)
        else:
            todo.append((path, job_seed))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_one_jpeg, todo, chunksize=16)
    return sum(Path(path).stat().st_size for path, _ in jobs)


# --------------------------------------------------------------------------- measurements

def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (shared pages count once per process)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_with_peak_rss(argv: list[str], interval: float = 0.05) -> tuple[float, int]:
    """Run a command; return its wall seconds and the peak RSS of its process tree, sampled every `interval`."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss(process.pid))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise UserError(f"{' '.join(argv)} failed ({process.returncode}): {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - start, peak[0]


def convert(tree: Path, out: Path, *, max_side: int, workers: int | None) -> dict:
    """`vpn-dist prep imagefolder --max-side` in a child process: seconds, images/s, peak RSS, .beton bytes."""
    import json

    argv = [sys.executable, "-m", "vpn_dist.cli", "prep", "imagefolder", "--source", str(tree), "--out", str(out),
            "--max-side", str(max_side), "--force"] + ([] if workers is None else ["--workers", str(workers)])
    seconds, peak = run_with_peak_rss(argv)
    meta = json.loads((out / "meta.json").read_text())
    images = sum(meta["splits"].values())
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "peak_rss": peak,
            "beton_bytes": sum(p.stat().st_size for p in out.glob("*.beton"))}


def loader_rate(data: Path, *, resolution: int, batch_size: int, workers: int) -> float:
    """Training images/s of the ffcv Loader at resolution x resolution, crop-while-decoding, one epoch after a
    warm-up epoch."""
    from vpn_dist.benchmarks.loader import measure
    from vpn_dist.data import Loader

    loader = Loader(data, "train", batch_size=batch_size, train=True, num_workers=workers, resolution=resolution)
    return float(np.median(measure(loader, len(loader), passes=1)))


def resnet50_rate(data: Path, *, resolution: int, batch_size: int, workers: int, steps: int, classes: int) -> float:
    """Images/s of ResNet-50 SGD steps (forward, loss, backward, step) fed by the Loader, after one warm-up step."""
    import torch
    import torchvision

    from vpn_dist.data import Loader

    loader = Loader(data, "train", batch_size=batch_size, train=True, num_workers=workers, resolution=resolution,
                    drop_last=True)
    model = torchvision.models.resnet50(num_classes=classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, start, done = 0, 0.0, 0
    while done <= steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if done == 0:
                start = time.perf_counter()  # the warm-up step is not timed
            else:
                images += len(y)
            done += 1
            if done > steps:
                break
    return images / (time.perf_counter() - start)


def run(args) -> int:
    import torch

    if args.images < args.classes or min(args.steps, args.batch_size, args.max_side, args.resolution) < 1:
        raise UserError("--images must be at least --classes; --steps, --batch-size, --max-side, --resolution >= 1")
    workers = args.workers or os.cpu_count() or 1
    rows = {}
    for n in (args.images, 2 * args.images):
        tree, out = args.work / f"tree{n}", args.work / f"beton{n}"
        print(f"generating {tree} ({n} train images)...", flush=True)
        source_bytes = generate_tree(tree, n, classes=args.classes, workers=workers,
                                     reuse=args.work / f"tree{args.images}" if n > args.images else None)
        print(f"converting {n}...", flush=True)
        rows[n] = dict(convert(tree, out, max_side=args.max_side, workers=args.workers), source_bytes=source_bytes)
    small, large = rows[args.images], rows[2 * args.images]
    out = args.work / f"beton{2 * args.images}"
    print("reading and training from the larger set...", flush=True)
    loader = loader_rate(out, resolution=args.resolution, batch_size=args.batch_size, workers=workers)
    train = resnet50_rate(out, resolution=args.resolution, batch_size=args.batch_size, workers=workers,
                          steps=args.steps, classes=args.classes)

    def mib(b):
        return f"{b / 2**20:.0f} MiB"

    print(f"\nImageNet-shaped JPEG trees (sides 160-500, {args.classes} classes), prep --max-side {args.max_side}, "
          f"{workers} workers, torch threads {torch.get_num_threads()}")
    print(f"{'':28s} {'N':>12s} {'2N':>12s} {'2N / N':>8s}")
    for name, key, shown in (("images (train + test)", "images", str), ("source JPEGs", "source_bytes", mib),
                             (".beton files", "beton_bytes", mib), ("conversion s", "seconds", lambda v: f"{v:.1f}"),
                             ("conversion images/s", "images_per_s", lambda v: f"{v:.0f}"),
                             ("peak RSS, process tree", "peak_rss", mib)):
        print(f"{name:28s} {shown(small[key]):>12s} {shown(large[key]):>12s} {large[key] / small[key]:8.2f}")
    print(f"\nloader, {args.resolution}x{args.resolution} random-resized-crop + flip while decoding: "
          f"{loader:.0f} images/s (batch {args.batch_size})")
    print(f"ResNet-50 training steps from it (fp32, batch {args.batch_size}, {args.steps} steps): "
          f"{train:.1f} images/s")
    return 0
