"""The FFCV loader the trainer iterates: (x, y[, mask]) batches, x float32 in [0, 1] on the device.

Order: train=True draws a fresh permutation per epoch from (seed, epoch) (ffcv's RANDOM order, which
under `distributed=True` is torch's DistributedSampler with that seed and epoch, so each rank reads its
own shard); train=False reads sequentially.  `set_epoch(e)` makes the next pass use epoch e's order,
which is all a resumed run needs.  uint8 pixels travel to the device and become floats there.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vpn_dist.errors import UserError


def read_meta(data_dir, split: str | None = None) -> dict:
    """meta.json of a prepared directory; with `split`, also require that split's .beton."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; create it with `vpn-dist prep`")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing: {data_dir} is not a complete `vpn-dist prep` output")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_path} is not readable JSON ({err})") from None
    if split is not None:
        if not meta.get("splits", {}).get(split):
            raise UserError(f"{data_dir} has no {split!r} split (splits: {meta.get('splits')})")
        if not (data_dir / f"{split}.beton").is_file():
            raise UserError(f"{data_dir / (split + '.beton')} is missing")
    return meta


class Loader:
    """Wraps `ffcv.loader.Loader` over `<data_dir>/<split>.beton`."""

    def __init__(self, data_dir, split, *, batch_size, train: bool, device="cpu", seed=0, distributed=False,
                 num_workers=2, os_cache=True, channels_last=False, augment=False, with_mask=False,
                 drop_last=False, indices=None):
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader as FFCVLoader, OrderOption
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        self.meta = read_meta(data_dir, split)
        if with_mask and not self.meta.get("has_mask"):
            raise UserError(f"{data_dir} has no masks (has_mask is false); only synthetic sets do")
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} must be at least 1")
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("Loader(distributed=True) needs an initialised torch.distributed process group")
        self.device = torch.device(device)
        self.train, self.seed = train, seed
        self.channels_last, self.augment, self.with_mask = channels_last, augment and train, with_mask
        self.rank = torch.distributed.get_rank() if distributed else 0

        to_device = [] if self.device.type == "cpu" else [ToDevice(self.device, non_blocking=True)]
        if self.meta["storage"] == "jpeg":
            image = [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=False)]
        else:
            image = [NDArrayDecoder(), ToTensor()]
        pipelines = {"image": image + to_device, "label": [IntDecoder(), ToTensor()] + to_device}
        if self.meta.get("has_mask"):  # None disables the field: no decoding when the trainer doesn't ask
            pipelines["mask"] = [NDArrayDecoder(), ToTensor()] + to_device if with_mask else None
        self._loader = FFCVLoader(
            str(Path(data_dir) / f"{split}.beton"), batch_size=batch_size, num_workers=num_workers,
            os_cache=os_cache, order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
            distributed=distributed, seed=seed, pipelines=pipelines, drop_last=drop_last,
            indices=None if indices is None else np.asarray(indices))
        order = len(self._loader.first_traversal_order)
        self.num_samples = min(order, len(self._loader) * batch_size)

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        self._loader.next_epoch = epoch

    def __iter__(self):
        epoch = self._loader.next_epoch
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self.seed * 1_000_003 + epoch * 1_009 + self.rank) % (1 << 62))
        epoch_iter = iter(self._loader)
        try:
            for batch in epoch_iter:
                # ffcv reuses its batch buffers: every yielded tensor is a fresh one.
                x = batch[0].to(torch.float32).div_(255)
                y = batch[1].reshape(-1).to(torch.int64, copy=True)
                mask = batch[2].to(torch.float32) if self.with_mask else None
                if gen is not None:
                    x, mask = flip_and_crop(x, mask, gen)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield (x, y) if mask is None else (x, y, mask)
        finally:  # a loop that breaks early stops ffcv's prefetch thread now, not at garbage collection
            epoch_iter.close()


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
