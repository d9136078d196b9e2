"""`vpn-dist prep KIND --source PATH --out DIR`: convert a data set to FFCV .beton files + meta.json."""
from __future__ import annotations

import argparse
import functools
import inspect
from pathlib import Path

from data_prep import KINDS, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="source format")
    option = functools.partial(parser.add_argument, default=argparse.SUPPRESS)  # omitted: prepare()'s default
    option("--source", type=Path, help="source file or directory (not needed for synthetic)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for *.beton and meta.json")
    option("--val", type=int, help="hold out N train images as val.beton (default 0)")
    option("--seed", type=int, help="seed for the val split and synthetic data (default 0)")
    option("--force", action="store_true", help="overwrite a complete prepared set in --out")
    option("--size", help="HxW to resize images to (imagefolder, tiny-imagenet, synthetic)")
    option("--jpeg-quality", type=int, help="store RGB images as JPEG at this quality (1-100) "
           "instead of raw uint8; meant for images larger than 64x64")
    option("--max-side", type=int, help="store each image as JPEG at its own size, shrunk to at most N pixels on "
           "its long side (FFCV's max_resolution; imagefolder, tiny-imagenet); train with data.resolution")
    option("--workers", type=int, help="decode/write processes (default: every core)")
    option("--classes", type=int, help="synthetic: number of classes (2-8, default 4)")
    option("--train-size", type=int, help="synthetic: train images (default 4000)")
    option("--test-size", type=int, help="synthetic: test images (default 1000)")


def run(args: argparse.Namespace) -> int:
    given = vars(args)
    prepare(**{name: given[name] for name in inspect.signature(prepare).parameters if name in given})
    return 0
