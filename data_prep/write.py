"""Write decoded splits to FFCV .beton files plus meta.json, atomically.

Every reader in this package hands over a `SourceData`: uint8 arrays in memory for the small sets, or
`ImageFiles` for image trees, which ffcv's writer processes decode one image at a time, so memory does not
grow with the number of images. This module validates it, carves the validation split, writes
`train/val/test.beton` to temporary names that are renamed only when complete, `meta.json` last, with the
train statistics the writers summed on the way.  A directory without
`meta.json` is never a usable data set, so an interrupted run cannot leave something that looks valid.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpn_dist.errors import UserError, free_space, size_text

SPLITS = ("train", "val", "test")
MIN_PAGE_SIZE = 1 << 21  # ffcv's minimum; small pages keep tiny test files small


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@dataclass
class SourceData:
    """A whole data set: images (N, C, H, W) uint8 (an array, or ImageFiles that decode on demand), labels int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    checksum: str
    train_mask: np.ndarray | None = None
    test_mask: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


class _Samples:
    """The indexable dataset ffcv's writer processes read (they share it by fork). Each sample's per-channel pixel
    sums land in `sums`, memory shared with the parent, for the train statistics: no second pass over the images."""

    def __init__(self, images, labels, masks, hwc):
        import multiprocessing

        self.images, self.labels, self.masks, self.hwc = images, labels, masks, hwc
        channels = images.shape[1]
        shared = multiprocessing.RawArray("q", len(labels) * (2 * channels + 1))
        self.sums = np.frombuffer(shared, dtype=np.int64).reshape(len(labels), 2 * channels + 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = np.asarray(self.images[i])  # ImageFiles decode here, in the writer process
        wide = image.reshape(image.shape[0], -1).astype(np.int64)
        self.sums[i] = np.concatenate([wide.sum(1), np.square(wide).sum(1), [wide.shape[1]]])
        if self.hwc:  # RGBImageField wants H, W, C
            image = np.ascontiguousarray(image.transpose(1, 2, 0))
        if self.masks is None:
            return image, int(self.labels[i])
        return image, int(self.labels[i]), self.masks[i]


def channel_stats(blocks, sums: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the train pixels scaled to [0, 1]: in float64 over uint8 (N, C, H, W) blocks of
    4096 images, as every earlier preparation computed them, so a set prepared again has the same meta.json to the
    last digit (a reproduction's data fingerprint); or, for JPEG sets from image files (blocks None), from the
    writers' exact integer sums (_Samples.sums)."""
    if blocks is None:
        totals = sums.sum(axis=0)
        channels = (len(totals) - 1) // 2
        count = float(totals[-1])
        mean = totals[:channels] / 255.0 / count
        std = np.sqrt(np.maximum(totals[channels:2 * channels] / 255.0**2 / count - mean**2, 0.0))
        return mean.tolist(), std.tolist()
    total = total_sq = None
    count = 0
    for block in blocks:
        block = block.astype(np.float64) / 255.0
        if total is None:
            total, total_sq = np.zeros(block.shape[1]), np.zeros(block.shape[1])
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def _stat_blocks(images, written: Path, chunk: int = 4096):
    """The train images in blocks of `chunk`: sliced from an array, or read back from the raw .beton just written
    (image files: decoded once only, by the writers); None for JPEG image files (their stats come from the sums)."""
    if isinstance(images, np.ndarray):
        return (images[start:start + chunk] for start in range(0, len(images), chunk))
    if getattr(images, "max_side", None) is not None or not _is_raw(written):
        return None
    return _raw_blocks(written, chunk)


def _is_raw(path: Path) -> bool:
    from ffcv.fields import NDArrayField

    from vpn_dist.compat import beton_tables

    return isinstance(beton_tables(path).handlers["image"], NDArrayField)


def _raw_blocks(path: Path, chunk: int):
    """A raw .beton's images, in order, straight from the file: each sample is C*H*W bytes at its data pointer."""
    from vpn_dist.compat import beton_tables

    tables = beton_tables(path)
    shape = tables.handlers["image"].shape
    pointers = tables.metadata[tables.metadata.dtype.names[0]].astype(np.int64)  # a raw field: its data pointer
    pixels = np.memmap(path, dtype=np.uint8, mode="r")
    size = int(np.prod(shape))
    for start in range(0, len(pointers), chunk):
        yield np.stack([pixels[p:p + size].reshape(shape) for p in pointers[start:start + chunk]])


def _page_size(sample_bytes: int) -> int:
    page = MIN_PAGE_SIZE
    while page < 2 * sample_bytes:
        page *= 2
    return page


def _writers(num_workers: int, count: int) -> int:
    """Fewer writer processes than cores for tiny splits: each one costs a fork and a page."""
    return max(1, min(num_workers, count // 1000 + 1))


def write_beton(path: Path, images, labels: np.ndarray, masks: np.ndarray | None = None,
                *, jpeg_quality: int | None = None, num_workers: int = 2, desc: str = "writing") -> np.ndarray:
    """Write one split to `path` (fields: image, label[, mask]); no renaming or cleanup here. `images`: a uint8
    (N, C, H, W) array or ImageFiles. Returns each sample's pixel sums (see channel_stats)."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    max_side = getattr(images, "max_side", None)
    if jpeg_quality is None:
        image_field = NDArrayField(dtype=np.dtype("uint8"), shape=tuple(images.shape[1:]))
    else:
        image_field = RGBImageField(write_mode="jpg", jpeg_quality=jpeg_quality, max_resolution=max_side)
    fields = {"image": image_field, "label": IntField()}
    if masks is not None:
        fields["mask"] = NDArrayField(dtype=np.dtype("uint8"), shape=tuple(masks.shape[1:]))
    sample_bytes = int(np.prod(images.shape[1:])) + (0 if masks is None else int(np.prod(masks.shape[1:])))
    workers = _writers(num_workers, len(labels))
    writer = DatasetWriter(str(path), fields, page_size=_page_size(sample_bytes), num_workers=workers)
    samples = _Samples(images, labels, masks, hwc=jpeg_quality is not None)
    _write_watched(writer, samples, chunksize=max(1, min(1000, len(labels) // workers)), desc=desc)
    return samples.sums


def beton_bytes(images, masks: np.ndarray | None, num_workers: int, jpeg: bool = False) -> int:
    """About how large write_beton's file for these images will be: the samples, their metadata rows, and the pages
    that pad them (each writer process fills pages of its own, the first one aligned to a page). JPEG files from
    an image tree: at most twice the source files (a re-encoded JPEG is rarely larger than its source)."""
    sample_bytes = int(np.prod(images.shape[1:])) + (0 if masks is None else int(np.prod(masks.shape[1:])))
    stored = len(images) * sample_bytes
    if jpeg and hasattr(images, "file_bytes"):
        stored = min(stored, 2 * images.file_bytes)
    return stored + len(images) * 64 + (_writers(num_workers, len(images)) + 1) * _page_size(sample_bytes)


def _write_watched(writer, dataset, *, chunksize: int, desc: str) -> None:
    """ffcv's `from_indexed_dataset` with its writer processes watched. ffcv's own parent waits, with no timeout,
    for a count of written samples that a writer which died (of ENOSPC, say) never reaches, while the other writers
    spin for that writer's page: a hang. Here each writer reports what stopped it; the parent, seeing a writer fail
    or vanish, stops the others, frees the shared memory and raises that error (an OSError keeps its errno, a
    UserError its text). Progress shows images/s and the time left."""
    import ctypes
    import multiprocessing
    import queue
    import time

    from tqdm import tqdm

    from vpn_dist import compat

    fork = multiprocessing.get_context("fork")  # the writers share `dataset` (and its sums) with this process
    count = len(dataset)
    processes = []
    try:
        begun = compat.writer_begin(writer, count)
        work = fork.Queue()
        for start in range(0, count, chunksize):
            indices = np.arange(start, min(start + chunksize, count))
            work.put(np.stack([indices, indices], axis=1))  # (destination, source) rows, as ffcv's own loop
        for _ in range(writer.num_workers):
            work.put(None)  # one "no more work" per writer
        allocations = fork.Queue()
        errors = fork.SimpleQueue()
        done = fork.Value(ctypes.c_uint64, 0)
        args = (compat.writer_job(), errors, work, *begun, done, allocations, dataset)
        processes = [fork.Process(target=_report_failure, args=args) for _ in range(writer.num_workers)]
        for process in processes:
            process.start()
        written = 0
        with tqdm(total=count, desc=desc, unit="img", mininterval=1.0, disable=count < 1000) as progress:
            while written < count:  # (a disabled bar does not count)
                _raise_writer_failure(processes, errors)
                if done.value > written:
                    progress.update(done.value - written)
                    written = done.value
                time.sleep(0.1)
        allocation_list = []
        for _ in processes:  # each writer sends its page allocations as it ends
            while True:
                _raise_writer_failure(processes, errors)
                try:
                    allocation_list.extend(allocations.get(timeout=0.2))
                    break
                except queue.Empty:
                    continue
        for process in processes:
            process.join()
        compat.writer_end(writer, allocation_list)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        compat.writer_release(writer)


def _report_failure(target, errors, *args) -> None:
    """A writer process's body: ffcv's, with what stopped it sent to the parent instead of printed as a traceback."""
    try:
        target(*args)
    except BaseException as err:  # noqa: BLE001 - the parent decides what to say
        errors.put((type(err).__name__, getattr(err, "errno", None), getattr(err, "strerror", None), str(err)))
        raise SystemExit(1) from None


def _raise_writer_failure(processes: list, errors) -> None:
    """Raise a writer's error, or say which writer ended without finishing."""
    if not errors.empty():
        name, code, strerror, text = errors.get()
        if code is not None:
            raise OSError(code, strerror or text)
        if name == "UserError":  # bad input found while decoding (a corrupt image): its own one line
            raise UserError(text)
        raise UserError(f"an FFCV writer process failed: {name}: {text}")
    for process in processes:
        if process.exitcode not in (None, 0):
            raise UserError(f"an FFCV writer process ended with exit code {process.exitcode} (killed: out of "
                            f"memory?) before its samples were written")


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
    """Refuse to overwrite a complete set without --force. With it, the old set stays whole until the new files are
    (see write_dataset): a failure on the way (a full disk) leaves the old set usable."""
    meta_path = out_dir / "meta.json"
    if meta_path.exists() and not force:
        raise UserError(f"{out_dir} already holds a prepared data set (meta.json); pass --force to overwrite")


def _replace_set(out_dir: Path, finished: dict[str, Path]) -> list[Path]:
    """Put the new splits in place of an old set's: meta.json goes first (from then on the old set no longer looks
    complete), then each rename, and old splits the new set lacks are removed. Renames need no space."""
    (out_dir / "meta.json").unlink(missing_ok=True)
    written = []
    for name in SPLITS:
        final = out_dir / f"{name}.beton"
        if name in finished:
            os.replace(finished[name], final)
            written.append(final)
        else:
            final.unlink(missing_ok=True)
    return written


def _check_written(path: Path, split: str, count: int, data: SourceData, jpeg_quality: int | None) -> None:
    """The file ffcv wrote reads back whole: a write the disk cut short without an error (a short write of the last
    page) would otherwise become a set that looks complete."""
    from vpn_dist.data import check_beton

    meta = {"splits": {split: count}, "storage": "raw" if jpeg_quality is None else "jpeg",
            "has_mask": data.train_mask is not None, "shape": list(data.train_x.shape[1:]),
            "num_classes": len(data.class_names), "max_side": getattr(data.train_x, "max_side", None)}
    try:
        check_beton(path, meta, split)
    except UserError as err:
        free = free_space(path)
        raise UserError(f"{split}.beton was not written whole ({size_text(free) if free is not None else '?'} free "
                        f"on its file system): {str(err).split('; prepare')[0]}") from None


def _check_space(out_dir: Path, parts: dict, num_workers: int, force: bool, jpeg: bool) -> None:
    """Refuse, before anything is written, a set that will not fit in the free space of --out's file system."""
    need = sum(beton_bytes(x, m, num_workers, jpeg) for x, _, m in parts.values())
    free = free_space(out_dir)
    if free is not None and free < need:
        kept = " (with --force the old set stays until the new one is whole)" if force else ""
        raise UserError(f"--out {out_dir}: the .beton files need about {size_text(need)}, but its file system has "
                        f"{size_text(free)} free{kept}; free space there or choose another --out")


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
    _check_space(out_dir, parts, num_workers, force, jpeg_quality is not None)

    from vpn_dist.lock import hold_directory
    from vpn_dist.observe import signals_deferred

    with hold_directory(out_dir, "--out"):  # one writer at a time: a second prep into --out is refused
        _prepare_out_dir(out_dir, force)
        written: list[Path] = []
        temp_paths: list[Path] = []
        finished: dict[str, Path] = {}
        try:
            for name, (x, y, m) in parts.items():
                with signals_deferred():  # created and recorded for cleanup as one step
                    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".partial")
                    os.close(fd)
                    temp_paths.append(Path(tmp))
                print(f"writing {name}: {len(y)} images", flush=True)
                try:
                    sums = write_beton(Path(tmp), x, y.astype(np.int64), m, jpeg_quality=jpeg_quality,
                                       num_workers=num_workers, desc=f"writing {name}")
                except OSError as err:  # named by the file it was to become (the temporary one is removed below)
                    raise OSError(err.errno, err.strerror or str(err), str(out_dir / f"{name}.beton")) from None
                _check_written(Path(tmp), name, len(y), data, jpeg_quality)
                os.chmod(tmp, _file_mode())  # mkstemp makes 0600
                finished[name] = Path(tmp)
                if name == "train":
                    mean, std = channel_stats(_stat_blocks(x, Path(tmp)), sums)
            with signals_deferred():  # the old set, or the new one: never half of each
                written = _replace_set(out_dir, finished)
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
                # only when set: meta.json of every other set stays as before (a reproduction's data fingerprint)
                **({"max_side": data.train_x.max_side} if getattr(data.train_x, "max_side", None) else {}),
                **(extra_meta or {}),
            }
            with signals_deferred():
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
