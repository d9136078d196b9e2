"""The loader the trainer iterates: (x, y[, mask]) batches, x float32 in [0, 1] on the device.

Order: train=True draws a fresh permutation per epoch from (seed, epoch) (ffcv's RANDOM order, which
under `distributed=True` is torch's DistributedSampler with that seed and epoch, so each rank reads its
own shard); train=False reads sequentially.  `set_epoch(e)` makes the next pass use epoch e's order,
which is all a resumed run needs.  Both backends (ffcv, memory) give the same batches in that order;
uint8 pixels travel to the device and become floats there.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from vpn_dist.errors import UserError


def read_meta(data_dir, split: str | None = None) -> dict:
    """meta.json of a prepared directory, its fields checked; with `split`, also that split's .beton header."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise UserError(f"data directory {data_dir} {what}; create it with `vpn-dist prep`")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing: {data_dir} is not a complete `vpn-dist prep` output")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{meta_path} is not readable JSON ({err})") from None
    check_meta(meta, meta_path)
    if split is not None:
        if not meta["splits"].get(split):
            raise UserError(f"{data_dir} has no {split!r} split (splits: {meta['splits']})")
        check_beton(data_dir / f"{split}.beton", meta, split)
    return meta


def check_data(data_dir) -> dict:
    """read_meta plus every split's .beton header, counts, labels and shapes: cheap, no pass over the pixels.
    Run it before committing to a run, so damaged data stops the command before anything is written."""
    meta = read_meta(data_dir)
    for split, count in meta["splits"].items():
        if count:
            check_beton(Path(data_dir) / f"{split}.beton", meta, split)
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_meta(meta, meta_path: Path) -> None:
    """The meta.json fields the loader and the trainer rely on, with their types and ranges."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            shown = meta.get(key, "missing") if isinstance(meta, dict) else meta
            raise UserError(f"{meta_path}: {key} must be {what}, got {shown!r}; prepare the data again with "
                            f"`vpn-dist prep ... --force`")

    need(isinstance(meta, dict), "the file", "a JSON object")
    need(_is_int(meta.get("num_classes")) and meta["num_classes"] >= 1, "num_classes", "an integer >= 1")
    shape = meta.get("shape")
    need(isinstance(shape, list) and len(shape) == 3 and all(_is_int(d) and d >= 1 for d in shape), "shape",
         "[C, H, W] of positive integers")
    splits = meta.get("splits")
    need(isinstance(splits, dict) and set(splits) <= {"train", "val", "test"}
         and all(_is_int(n) and n >= 0 for n in splits.values()), "splits",
         "an object of train/val/test image counts >= 0")
    need(splits.get("train", 0) > 0 and splits.get("test", 0) > 0, "splits", "counts with train and test above 0")
    if "storage" in meta:
        need(meta["storage"] in ("raw", "jpeg"), "storage", "'raw' or 'jpeg'")
    if "has_mask" in meta:
        need(isinstance(meta["has_mask"], bool), "has_mask", "true or false")
    if meta.get("max_side") is not None:
        need(_is_int(meta["max_side"]) and meta["max_side"] >= 1 and meta.get("storage") == "jpeg", "max_side",
             "null, or an integer >= 1 with storage 'jpeg'")
    if "class_names" in meta:
        need(isinstance(meta["class_names"], list) and len(meta["class_names"]) == meta["num_classes"],
             "class_names", f"a list of num_classes ({meta['num_classes']}) names")
    for key in ("mean", "std"):
        if key in meta:
            need(isinstance(meta[key], list) and len(meta[key]) == shape[0]
                 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in meta[key]), key,
                 f"a list of {shape[0]} numbers (one per channel)")


def check_beton(path: Path, meta: dict, split: str) -> None:
    """One .beton against meta.json: header, fields, sample count, label range, image and mask shapes, and that
    every pointer stays inside the file. Reads the header and the metadata table only (a few bytes per image)."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    from vpn_dist.compat import beton_tables

    if not path.is_file():
        raise UserError(f"{path} is missing" + (" (a directory is in its place)" if path.is_dir() else ""))
    redo = "prepare the data again with `vpn-dist prep ... --force`"
    try:
        reader = beton_tables(path)
    except Exception as err:  # noqa: BLE001 - ffcv raises whatever a damaged header makes it raise
        raise UserError(f"{path}: not a readable .beton ({type(err).__name__}: {err}); {redo}") from None
    file_size = path.stat().st_size
    expected = meta["splits"][split]
    if reader.num_samples != expected or len(reader.metadata) != expected:
        raise UserError(f"{path}: holds {len(reader.metadata)} of {reader.num_samples} images but meta.json says "
                        f"{expected}; {redo}")
    storage = meta.get("storage")
    if storage is None:
        raise UserError(f"{path.parent / 'meta.json'}: storage must be 'raw' or 'jpeg', got 'missing'; {redo}")
    has_mask = bool(meta.get("has_mask"))
    names = ["image", "label"] + (["mask"] if has_mask else [])
    if reader.field_names != names:
        raise UserError(f"{path}: fields {reader.field_names}, expected {names} (meta.json has_mask={has_mask}); "
                        f"{redo}")
    c, h, w = meta["shape"]
    image, label = reader.handlers["image"], reader.handlers["label"]
    raw_ok = isinstance(image, NDArrayField) and image.shape == (c, h, w) and image.dtype == np.uint8
    if not isinstance(label, IntField) or (storage == "raw" and not raw_ok) or (
            storage == "jpeg" and not isinstance(image, RGBImageField)):
        shown = getattr(image, "shape", type(image).__name__)
        raise UserError(f"{path}: image field {shown} does not match meta.json (shape {meta['shape']}, storage "
                        f"{storage}); {redo}")
    columns = dict(zip(names, reader.metadata.dtype.names))
    labels = reader.metadata[columns["label"]]
    if len(labels) and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
        raise UserError(f"{path}: labels {int(labels.min())}..{int(labels.max())} are out of range for "
                        f"num_classes {meta['num_classes']} in meta.json; {redo}")
    table, data_end = reader.alloc_table, reader.data_end
    sizes = {"image": c * h * w, "mask": h * w}
    pointers = []
    for name in ("image", "mask") if has_mask else ("image",):
        column = reader.metadata[columns[name]]
        if name == "image" and storage == "jpeg":
            heights, widths = column["height"].astype(np.int64), column["width"].astype(np.int64)
            if meta.get("max_side") is not None:
                if len(column) and (heights.min() < 1 or widths.min() < 1
                                    or max(heights.max(), widths.max()) > meta["max_side"]):
                    raise UserError(f"{path}: JPEG images are not within {meta['max_side']} pixels a side as "
                                    f"meta.json says; {redo}")
            elif len(column) and (np.any(heights != h) or np.any(widths != w)):
                raise UserError(f"{path}: JPEG images are not {h}x{w} as meta.json says; {redo}")
            column = column["data_ptr"]
        elif name == "mask" and getattr(reader.handlers["mask"], "shape", None) != (1, h, w):
            raise UserError(f"{path}: mask field is not (1, {h}, {w}) as meta.json says; {redo}")
        pointers.append((name, column.astype(np.uint64), sizes[name]))
    bad_table = (file_size < data_end or (file_size - data_end) % table.dtype.itemsize
                 or len(table) != len(pointers) * expected
                 or np.any(table["ptr"] + table["size"] > data_end) or np.any(table["sample_id"] >= expected))
    order = np.argsort(table["ptr"])
    for name, column, size in pointers:
        found = np.searchsorted(table["ptr"][order], column)
        if bad_table or np.any(found >= len(table)):
            bad_table = True
            break
        hit = order[found]
        if np.any(table["ptr"][hit] != column) or (storage == "raw" or name == "mask") and np.any(
                table["size"][hit] != size):
            bad_table = True
    if bad_table:
        raise UserError(f"{path}: the allocation table or the image pointers are damaged (truncated or overwritten "
                        f"file); {redo}")


@contextlib.contextmanager
def keep_torch_threads():
    """ffcv sets torch's thread count to its num_workers whenever a loader is built or iterated. Keep the
    trainer's: a Ray worker reserves dist.cpus_per_worker CPUs, and two torch threads on one reserved CPU ran
    every 1-CPU trial of a grid at a fraction of its speed (half its CPU time in an OpenMP thread)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


BACKENDS = ("ffcv", "memory")
CENTER_CROP_RATIO = 224 / 256  # evaluation's centre crop: the crop side over the short side, as FFCV's ImageNet example


def input_shape(meta: dict, resolution: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the batches a Loader yields: the stored shape, or resolution x resolution when decoding crops."""
    c, h, w = meta["shape"]
    return (c, h, w) if resolution is None else (c, resolution, resolution)


class Loader:
    """Batches of `<data_dir>/<split>.beton`, one of two ways (`backend`):

    ffcv: FFCV's loader decodes each batch as it is read, in threads; any size of set, and with `resolution` (JPEG
    sets) training crops at random and flips while decoding, evaluation takes the centre crop.
    memory: the split decoded once into uint8 tensors (on the device), batches gathered by index, as airbench does:
    the fastest path for sets that fit in memory, with the same batches as ffcv (same order, shards, last batch).
    """

    def __init__(self, data_dir, split, *, batch_size, train: bool, device="cpu", seed=0, distributed=False,
                 num_workers=2, os_cache=True, channels_last=False, augment=False, with_mask=False,
                 drop_last=False, indices=None, backend="ffcv", resolution=None):
        self.meta = read_meta(data_dir, split)
        if with_mask and not self.meta.get("has_mask"):
            raise UserError(f"{data_dir} has no masks (has_mask is false); only synthetic sets do")
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} must be at least 1")
        if backend not in BACKENDS:
            raise UserError(f"data.loader {backend!r} must be one of {', '.join(BACKENDS)}")
        _check_resolution(self.meta, data_dir, backend, resolution)
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("Loader(distributed=True) needs an initialised torch.distributed process group")
        self.device = torch.device(device)
        self.train, self.seed, self.batch_size, self.drop_last = train, seed, batch_size, drop_last
        self.channels_last, self.with_mask = channels_last, with_mask
        self.augment = augment and train and resolution is None  # with a resolution, the decoder crops and flips
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.shape = input_shape(self.meta, resolution)
        self.next_epoch = 0
        path = str(Path(data_dir) / f"{split}.beton")
        if backend == "ffcv":
            self._ffcv = self._ffcv_loader(path, train, num_workers, os_cache, distributed, indices, resolution,
                                           to_device=self.device.type != "cpu")
            order_length = len(self._ffcv.first_traversal_order)
        else:
            self._ffcv = None
            self._tensors = self._read_all(path, num_workers, os_cache)
            self._indices = np.arange(self.meta["splits"][split]) if indices is None else np.asarray(indices)
            self._distributed = distributed
            order_length = len(self._order(0))
        self._batches = order_length // batch_size if drop_last else -(-order_length // batch_size)
        self.num_samples = min(order_length, self._batches * batch_size)

    def _ffcv_loader(self, path, train, num_workers, os_cache, distributed, indices, resolution, *, to_device,
                     sequential=False, batch_size=None):
        from ffcv.fields.decoders import (CenterCropRGBImageDecoder, IntDecoder, NDArrayDecoder,
                                          RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder)
        from ffcv.loader import Loader as FFCVLoader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        device = [ToDevice(self.device, non_blocking=True)] if to_device else []
        if self.meta["storage"] == "raw":
            image = [NDArrayDecoder(), ToTensor()]
        elif resolution is None:
            image = [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=False)]
        elif train:
            image = [RandomResizedCropRGBImageDecoder((resolution, resolution)), RandomHorizontalFlip(), ToTensor(),
                     ToTorchImage(channels_last=False)]
        else:
            image = [CenterCropRGBImageDecoder((resolution, resolution), ratio=CENTER_CROP_RATIO), ToTensor(),
                     ToTorchImage(channels_last=False)]
        pipelines = {"image": image + device, "label": [IntDecoder(), ToTensor()] + device}
        if self.meta.get("has_mask"):  # None disables the field: no decoding when the trainer doesn't ask
            pipelines["mask"] = [NDArrayDecoder(), ToTensor()] + device if self.with_mask else None
        with keep_torch_threads():
            return FFCVLoader(path, batch_size=batch_size or self.batch_size, num_workers=num_workers,
                              os_cache=os_cache, distributed=distributed, seed=self.seed, pipelines=pipelines,
                              order=OrderOption.RANDOM if train and not sequential else OrderOption.SEQUENTIAL,
                              drop_last=self.drop_last and not sequential,
                              indices=None if indices is None else np.asarray(indices))

    def _read_all(self, path, num_workers, os_cache) -> list[torch.Tensor]:
        """The memory backend's tensors: every image (uint8), label and mask of the split, on the device."""
        n = self.meta["splits"][Path(path).stem]
        whole = None
        loader = self._ffcv_loader(path, False, num_workers, os_cache, False, None, None, to_device=False,
                                   sequential=True, batch_size=1024)
        start = 0
        with keep_torch_threads():
            for batch in loader:
                batch = [batch[0], batch[1].reshape(-1).to(torch.int64)] + ([batch[2]] if self.with_mask else [])
                if whole is None:
                    whole = [torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype) for t in batch]
                for into, t in zip(whole, batch):
                    into[start:start + len(t)] = t  # ffcv reuses its buffers: copy out
                start += len(batch[0])
        return [t.to(self.device) for t in whole]

    def _order(self, epoch: int) -> np.ndarray:
        from vpn_dist.compat import epoch_order

        return epoch_order(self._indices, seed=self.seed, epoch=epoch, shuffle=self.train,
                           distributed=self._distributed)

    def _uint8_batches(self, epoch: int):
        """(x uint8, y int64, mask uint8 or None) per batch of `epoch`, from either backend."""
        if self._ffcv is not None:
            from vpn_dist.compat import set_next_epoch

            set_next_epoch(self._ffcv, epoch)
            with keep_torch_threads():
                epoch_iter = iter(self._ffcv)
            try:
                for batch in epoch_iter:
                    yield batch[0], batch[1].reshape(-1).to(torch.int64, copy=True), \
                        batch[2] if self.with_mask else None
            finally:  # a loop that breaks early stops ffcv's prefetch thread now, not at garbage collection
                epoch_iter.close()
            return
        order = torch.from_numpy(self._order(epoch)[:self.num_samples].astype(np.int64)).to(self.device)
        for rows in order.split(self.batch_size):
            yield tuple(t[rows] for t in self._tensors) + ((None,) if not self.with_mask else ())

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __iter__(self):
        epoch = self.next_epoch
        self.next_epoch += 1
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self.seed * 1_000_003 + epoch * 1_009 + self.rank) % (1 << 62))
        for x, y, mask in self._uint8_batches(epoch):
            x = x.to(torch.float32).div_(255)  # ffcv reuses its batch buffers: this is a fresh tensor
            mask = mask.to(torch.float32) if mask is not None else None
            if gen is not None:
                x, mask = flip_and_crop(x, mask, gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield (x, y) if mask is None else (x, y, mask)


def _check_resolution(meta: dict, data_dir, backend: str, resolution: int | None) -> None:
    if resolution is not None:
        if not isinstance(resolution, int) or resolution < 8:
            raise UserError(f"data.resolution {resolution!r} must be an integer >= 8, or null")
        if meta["storage"] != "jpeg":
            raise UserError(f"data.resolution crops and resizes JPEG images while decoding; {data_dir} is stored raw "
                            f"(leave data.resolution null, or prepare with --jpeg-quality or --max-side)")
        if backend == "memory":
            raise UserError("data.resolution decodes a new crop each pass; data.loader memory keeps images decoded "
                            "once: use data.loader ffcv")
    elif meta.get("max_side") is not None:
        raise UserError(f"{data_dir} holds images of varying size (prepared with --max-side): set data.resolution "
                        f"(e.g. 224)")


def flip_and_crop(x, mask, gen, pad: int = 4):
    """Random horizontal flip and random crop after `pad` reflect-padding, per sample, same for the mask."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, None, :, None]  # (n, 1, h, 1)
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]

    def crop(t):
        t = torch.nn.functional.pad(t, (pad, pad, pad, pad), mode="reflect")
        chan = torch.arange(t.shape[1], device=t.device)[None, :, None, None]
        return t[batch, chan, rows, cols]

    x = crop(x)
    if mask is not None:
        mask = crop(torch.where(flip[:, None, None, None], mask.flip(3), mask))
    return x, mask
