"""`vpn-dist prep KIND --source PATH --out DIR`: convert a data set to FFCV .beton files + meta.json."""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from vpn_dist.errors import UserError

KINDS = ("fashion-mnist", "cifar10", "tiny-imagenet", "imagefolder", "synthetic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="source format")
    parser.add_argument("--source", type=Path, help="source file or directory (not needed for synthetic)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for *.beton and meta.json")
    parser.add_argument("--val", type=int, default=0, help="hold out N train images as val.beton (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the val split and synthetic data")
    parser.add_argument("--force", action="store_true", help="overwrite a complete prepared set in --out")
    parser.add_argument("--size", help="HxW to resize images to (imagefolder, tiny-imagenet, synthetic)")
    parser.add_argument("--jpeg-quality", type=int, help="store RGB images as JPEG at this quality (1-100) "
                        "instead of raw uint8; meant for images larger than 64x64")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode/write processes")
    parser.add_argument("--classes", type=int, default=4, help="synthetic: number of classes (2-8)")
    parser.add_argument("--train-size", type=int, default=4000, help="synthetic: train images")
    parser.add_argument("--test-size", type=int, default=1000, help="synthetic: test images")


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise UserError(f"--size {text!r} must look like HxW with positive integers, e.g. 32x32")
    return int(match[1]), int(match[2])


def load_source(args) -> "SourceData":  # noqa: F821 (lazy import keeps `vpn-dist --help` fast)
    from data_prep import sources, synthetic

    size = parse_size(args.size)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    if args.kind == "synthetic":
        return synthetic.read_synthetic(classes=args.classes, train_size=args.train_size,
                                        test_size=args.test_size, size=size, seed=args.seed)
    if args.source is None:
        raise UserError(f"prep {args.kind} needs --source")
    source = Path(args.source).expanduser()
    if args.kind == "fashion-mnist":
        return sources.read_fashion_mnist(source)
    if args.kind == "cifar10":
        return sources.read_cifar10(source, args.workers)
    if args.kind == "tiny-imagenet":
        return sources.read_tiny_imagenet(source, args.workers, size=size)
    return sources.read_imagefolder(source, args.workers, size=size)


def run(args) -> int:
    from data_prep.write import write_dataset

    if args.val < 0:
        raise UserError(f"--val {args.val} must be >= 0")
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality {args.jpeg_quality} must be between 1 and 100")
    if (args.out / "meta.json").exists() and not args.force:  # fail before a long decode
        raise UserError(f"{args.out} already holds a prepared data set (meta.json); pass --force to overwrite")
    start = time.perf_counter()
    data = load_source(args)
    for note in data.notes:
        print(f"note: {note}")
    meta = write_dataset(args.out, data, source_kind=args.kind, val=args.val, seed=args.seed, force=args.force,
                         jpeg_quality=args.jpeg_quality, num_workers=args.workers)
    splits = ", ".join(f"{k} {v}" for k, v in meta["splits"].items() if v)
    print(f"wrote {args.out}: {splits}; {meta['num_classes']} classes, shape {meta['shape']}, "
          f"storage {meta['storage']} in {time.perf_counter() - start:.1f}s")
    return 0
