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

from vpn_dist.errors import UserError, free_space, size_text

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
    writer = _watched_writer(DatasetWriter)(str(path), fields, page_size=_page_size(sample_bytes), num_workers=workers)
    writer.from_indexed_dataset(_Arrays(images, labels, masks, hwc=jpeg_quality is not None),
                                chunksize=max(1, min(1000, len(labels) // workers)))


def beton_bytes(images: np.ndarray, masks: np.ndarray | None, num_workers: int) -> int:
    """About how large write_beton's file for these arrays will be: the samples, their metadata rows, and the pages
    that pad them (each writer process fills pages of its own, the first one aligned to a page)."""
    sample_bytes = int(np.prod(images.shape[1:])) + (0 if masks is None else int(np.prod(masks.shape[1:])))
    workers = max(1, min(num_workers, len(images) // 1000 + 1))
    return len(images) * (sample_bytes + 64) + (workers + 1) * _page_size(sample_bytes)


def _watched_writer(base):
    """ffcv's DatasetWriter with its writer processes watched. ffcv's own parent waits, with no timeout, for a count
    of written samples that a writer which died (of ENOSPC, say) never reaches, while the other writers spin for that
    writer's page: a hang. This copy of ffcv's `_write_common` (ffcv 1.0) has each writer report what stopped it; the
    parent, seeing a writer fail or vanish, stops the others, frees the shared memory and raises that error (an
    OSError keeps its errno)."""
    import ctypes
    import queue
    import time
    from multiprocessing import Process, Queue, SimpleQueue, Value

    from ffcv.memory_allocator import MemoryAllocator
    from tqdm import tqdm

    class WatchedWriter(base):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()  # the header, and the shared memory every writer fills with its samples' metadata
            processes: list[Process] = []
            try:
                work: Queue = Queue()
                for todo in queue_content:
                    work.put(todo)
                for _ in range(self.num_workers):
                    work.put(None)  # one "no more work" per writer
                allocations: Queue = Queue()
                errors = SimpleQueue()
                done = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                        *extra_worker_args)
                processes = [Process(target=_report_failure, args=(work_fn, errors, *args))
                             for _ in range(self.num_workers)]
                for process in processes:
                    process.start()
                with tqdm(total=self.num_samples) as progress:
                    while progress.n < self.num_samples:
                        _raise_writer_failure(processes, errors)
                        if done.value > progress.n:
                            progress.update(done.value - progress.n)
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
                self.finalize(allocation_list)
            finally:
                for process in processes:
                    if process.is_alive():
                        process.terminate()
                        process.join(timeout=5)
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return WatchedWriter


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
            "num_classes": len(data.class_names)}
    try:
        check_beton(path, meta, split)
    except UserError as err:
        free = free_space(path)
        raise UserError(f"{split}.beton was not written whole ({size_text(free) if free is not None else '?'} free "
                        f"on its file system): {str(err).split('; prepare')[0]}") from None


def _check_space(out_dir: Path, parts: dict, num_workers: int, force: bool) -> None:
    """Refuse, before anything is written, a set that will not fit in the free space of --out's file system."""
    need = sum(beton_bytes(x, m, num_workers) for x, _, m in parts.values())
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
    mean, std = channel_stats(parts["train"][0])
    _check_space(out_dir, parts, num_workers, force)

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
                    write_beton(Path(tmp), x, y.astype(np.int64), m, jpeg_quality=jpeg_quality, num_workers=num_workers)
                except OSError as err:  # named by the file it was to become (the temporary one is removed below)
                    raise OSError(err.errno, err.strerror or str(err), str(out_dir / f"{name}.beton")) from None
                _check_written(Path(tmp), name, len(y), data, jpeg_quality)
                os.chmod(tmp, _file_mode())  # mkstemp makes 0600
                finished[name] = Path(tmp)
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
