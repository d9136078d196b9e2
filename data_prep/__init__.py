"""Convert a data set to FFCV .beton files + meta.json: `prepare(kind, out, ...)`, which `vpn-dist prep` runs.

The readers and writers load lazily, so importing this package (as `vpn-dist --help` does) stays fast.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from vpn_dist.errors import UserError

KINDS = ("fashion-mnist", "cifar10", "tiny-imagenet", "imagefolder", "synthetic")


def prepare(kind: str, out: str | os.PathLike, *, source: str | os.PathLike | None = None, val: int = 0,
            seed: int = 0, force: bool = False, size: str | None = None, jpeg_quality: int | None = None,
            max_side: int | None = None, workers: int | None = None, classes: int = 4, train_size: int = 4000,
            test_size: int = 1000) -> dict[str, Any]:
    """Convert `source` (a `kind` of data set; synthetic: generated) into `out`; returns the written meta.json.

    val: hold out that many train images as val.beton; seed: of the val split and the synthetic images;
    force: overwrite a complete prepared set; size: "HxW" to resize to (imagefolder, tiny-imagenet, synthetic);
    jpeg_quality: store RGB as JPEG (1-100) instead of raw uint8; max_side: store each image as JPEG at its own size,
    shrunk to at most that many pixels on its long side (imagefolder, tiny-imagenet; quality 90 unless given);
    workers: decode/write processes (default: every core); classes, train_size, test_size: the synthetic set's.
    Bad input raises UserError.
    """
    out = Path(out)
    if kind not in KINDS:
        raise UserError(f"prep kind {kind!r} must be one of {', '.join(KINDS)}")
    if val < 0:
        raise UserError(f"--val {val} must be >= 0")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality {jpeg_quality} must be between 1 and 100")
    if max_side is not None:
        if kind not in ("imagefolder", "tiny-imagenet"):
            raise UserError(f"--max-side is for image trees (imagefolder, tiny-imagenet), not {kind}")
        if max_side < 8:
            raise UserError(f"--max-side {max_side} must be at least 8")
        if size is not None:
            raise UserError("--max-side keeps each image's own size; it cannot go with --size")
        jpeg_quality = 90 if jpeg_quality is None else jpeg_quality
    if out.exists() and not out.is_dir():  # fail before a long decode
        raise UserError(f"--out {out} exists and is not a directory")
    if (out / "meta.json").exists() and not force:
        raise UserError(f"{out} already holds a prepared data set (meta.json); pass --force to overwrite")
    start = time.perf_counter()
    image_size = parse_size(size)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1")
    data = _load_source(kind, source, workers, image_size, max_side, classes=classes, train_size=train_size,
                        test_size=test_size, seed=seed)
    for note in data.notes:
        print(f"note: {note}")
    from data_prep.write import write_dataset

    meta = write_dataset(out, data, source_kind=kind, val=val, seed=seed, force=force, jpeg_quality=jpeg_quality,
                         num_workers=workers)
    splits = ", ".join(f"{k} {v}" for k, v in meta["splits"].items() if v)
    shape = f"at most {max_side} pixels a side" if max_side else f"shape {meta['shape']}"
    print(f"wrote {out}: {splits}; {meta['num_classes']} classes, {shape}, "
          f"storage {meta['storage']} in {time.perf_counter() - start:.1f}s")
    return meta


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise UserError(f"--size {text!r} must look like HxW with positive integers, e.g. 32x32")
    return int(match[1]), int(match[2])


def _load_source(kind: str, source: str | os.PathLike | None, workers: int, size: tuple[int, int] | None,
                 max_side: int | None, *, classes: int, train_size: int, test_size: int, seed: int):
    from data_prep import sources, synthetic

    if kind == "synthetic":
        return synthetic.read_synthetic(classes=classes, train_size=train_size, test_size=test_size, size=size,
                                        seed=seed)
    if source is None:
        raise UserError(f"prep {kind} needs --source")
    source = Path(source).expanduser()
    if kind == "fashion-mnist":
        return sources.read_fashion_mnist(source)
    if kind == "cifar10":
        return sources.read_cifar10(source, workers)
    if kind == "tiny-imagenet":
        return sources.read_tiny_imagenet(source, workers, size=size, max_side=max_side)
    return sources.read_imagefolder(source, workers, size=size, max_side=max_side)
