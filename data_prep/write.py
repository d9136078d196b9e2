"""Write decoded splits to FFCV .beton files plus meta.json, atomically.

Every reader in this package hands over a `SourceData` (uint8 arrays in memory); this module validates
it, carves the validation split, computes train statistics and writes `train/val/test.beton` to
temporary names that are renamed only when complete, `meta.json` last.  A directory without
`meta.json` is never a usable data set, so an interrupted run cannot leave something that looks valid.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpn_dist.errors import UserError

SPLITS = ("train", "val", "test")
MIN_PAGE_SIZE = 1 << 21  # ffcv's minimum; small pages keep tiny test files small


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@dataclass
class SourceData:
    """A whole data set decoded into memory: images (N, C, H, W) uint8, labels int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    checksum: str
    train_mask: np.ndarray | None = None
    test_mask: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


class _Arrays:
    """The indexable dataset ffcv's DatasetWriter reads from (worker processes share it by fork)."""

    def __init__(self, images, labels, masks, hwc):
        self.images, self.labels, self.masks, self.hwc = images, labels, masks, hwc

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.hwc:  # RGBImageField wants H, W, C
            image = np.ascontiguousarray(image.transpose(1, 2, 0))
        if self.masks is None:
            return image, int(self.labels[i])
        return image, int(self.labels[i]), self.masks[i]


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels scaled to [0, 1], in float64, chunked to bound memory."""
    c = images.shape[1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def _page_size(sample_bytes: int) -> int:
    page = MIN_PAGE_SIZE
    while page < 2 * sample_bytes:
        page *= 2
    return page


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, masks: np.ndarray | None = None,
                *, jpeg_quality: int | None = None, num_workers: int = 2) -> None:
    """Write one split to `path` (fields: image, label[, mask]); no renaming or cleanup here."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    if jpeg_quality is None:
        image_field = NDArrayField(dtype=np.dtype("uint8"), shape=tuple(images.shape[1:]))
    else:
        image_field = RGBImageField(write_mode="jpg", jpeg_quality=jpeg_quality)
    fields = {"image": image_field, "label": IntField()}
    if masks is not None:
        fields["mask"] = NDArrayField(dtype=np.dtype("uint8"), shape=tuple(masks.shape[1:]))
    sample_bytes = int(np.prod(images.shape[1:])) + (0 if masks is None else int(np.prod(masks.shape[1:])))
    # Fewer writer processes than cores for tiny splits: each one costs a fork and a page.
    workers = max(1, min(num_workers, len(labels) // 1000 + 1))
    writer = DatasetWriter(str(path), fields, page_size=_page_size(sample_bytes), num_workers=workers)
    writer.from_indexed_dataset(_Arrays(images, labels, masks, hwc=jpeg_quality is not None),
                                chunksize=max(1, min(1000, len(labels) // workers)))


def _check(data: SourceData, val: int, jpeg_quality: int | None) -> None:
    num_classes = len(data.class_names)
    for split, x, y, m in (("train", data.train_x, data.train_y, data.train_mask),
                           ("test", data.test_x, data.test_y, data.test_mask)):
        if len(x) == 0:
            raise UserError(f"the {split} split is empty")
        if x.ndim != 4 or x.dtype != np.uint8:
            raise UserError(f"{split} images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise UserError(f"{split}: {len(x)} images but {len(y)} labels")
        if y.min() < 0 or y.max() >= num_classes:
            raise UserError(f"{split} labels out of range: found {int(y.min())}..{int(y.max())}, "
                            f"expected 0..{num_classes - 1} ({num_classes} classes)")
        if m is not None and m.shape != (len(x), 1) + x.shape[2:]:
            raise UserError(f"{split} masks have shape {m.shape}, expected {(len(x), 1) + x.shape[2:]}")
    if data.train_x.shape[1:] != data.test_x.shape[1:]:
        raise UserError(f"train images are {data.train_x.shape[1:]} but test images are {data.test_x.shape[1:]}")
    if not 0 <= val < len(data.train_x):
        raise UserError(f"--val {val} must be >= 0 and smaller than the train size {len(data.train_x)}")
    if jpeg_quality is not None:
        if not 1 <= jpeg_quality <= 100:
            raise UserError(f"--jpeg-quality {jpeg_quality} must be between 1 and 100")
        if data.train_x.shape[1] != 3:
            raise UserError(f"--jpeg-quality needs 3-channel images, these have {data.train_x.shape[1]}")


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    from vpn_dist.observe import make_output_dir

    meta_path = out_dir / "meta.json"
    if meta_path.exists() and not force:
        raise UserError(f"{out_dir} already holds a prepared data set (meta.json); pass --force to overwrite")
    make_output_dir(out_dir, "--out")
    if force:  # meta first: from here on the old set no longer looks complete
        for name in ["meta.json"] + [f"{s}.beton" for s in SPLITS]:
            (out_dir / name).unlink(missing_ok=True)


def write_dataset(out_dir: str | os.PathLike, data: SourceData, *, source_kind: str, val: int = 0,
                  seed: int = 0, force: bool = False, jpeg_quality: int | None = None,
                  num_workers: int | None = None, extra_meta: dict | None = None) -> dict:
    """Validate `data`, hold out `val` train images, write the .beton files and meta.json; return the meta."""
    _check(data, val, jpeg_quality)
    out_dir = Path(out_dir)
    num_workers = num_workers or min(os.cpu_count() or 1, 8)

    n_train = len(data.train_x)
    perm = np.random.default_rng(seed).permutation(n_train)
    val_idx, train_idx = np.sort(perm[:val]), np.sort(perm[val:])
    splits = {"train": train_idx, "val": val_idx} if val else {"train": None}

    def take(arr, idx):
        return None if arr is None else (arr if idx is None else arr[idx])

    parts = {name: (take(data.train_x, idx), take(data.train_y, idx), take(data.train_mask, idx))
             for name, idx in splits.items()}
    parts["test"] = (data.test_x, data.test_y, data.test_mask)
    mean, std = channel_stats(parts["train"][0])

    _prepare_out_dir(out_dir, force)
    written: list[Path] = []
    temp_paths: list[Path] = []
    try:
        for name, (x, y, m) in parts.items():
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".partial")
            os.close(fd)
            temp_paths.append(Path(tmp))
            print(f"writing {name}: {len(y)} images", flush=True)
            write_beton(Path(tmp), x, y.astype(np.int64), m, jpeg_quality=jpeg_quality, num_workers=num_workers)
            os.chmod(tmp, _file_mode())  # mkstemp makes 0600
            final = out_dir / f"{name}.beton"
            os.replace(tmp, final)
            written.append(final)
        meta = {
            "num_classes": len(data.class_names),
            "class_names": list(data.class_names),
            "shape": list(data.train_x.shape[1:]),
            "splits": {name: int(len(parts[name][1])) if name in parts else 0 for name in SPLITS},
            "mean": mean,
            "std": std,
            "source_kind": source_kind,
            "source_checksum": data.checksum,
            "storage": "raw" if jpeg_quality is None else "jpeg",
            "jpeg_quality": jpeg_quality,
            "has_mask": data.train_mask is not None,
            "fields": ["image", "label"] + (["mask"] if data.train_mask is not None else []),
            "val_seed": seed,
            **(extra_meta or {}),
        }
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".meta.", suffix=".partial")
        temp_paths.append(Path(tmp))
        with os.fdopen(fd, "w") as fh:
            json.dump(meta, fh, indent=2)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, out_dir / "meta.json")
    except BaseException:
        for path in temp_paths + written:
            path.unlink(missing_ok=True)
        raise
    return meta
