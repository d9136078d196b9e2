"""vpn_dist.data.Loader: order per (seed, epoch), resume, distributed shards, augmentation, errors."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.write import SourceData, write_dataset
from vpn_dist.data import Loader, read_meta
from vpn_dist.errors import UserError

N = 103  # odd, so two ranks need DistributedSampler padding


def index_set(out: Path, n: int = N) -> Path:
    """A set whose image encodes each sample's index (pixel 0 = i % 256, pixel 1 = i // 256), label = i % 5."""
    x = np.zeros((n, 3, 8, 8), np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    x[:, 0, 0, 1] = np.arange(n) // 256
    y = np.arange(n) % 5
    data = SourceData(train_x=x, train_y=y, test_x=x[:10], test_y=y[:10],
                      class_names=[str(k) for k in range(5)], checksum="none")
    write_dataset(out, data, source_kind="test")
    return out


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    return index_set(tmp_path_factory.mktemp("indexed") / "set")


def seen(loader) -> list[int]:
    out = []
    for x, y in loader:
        px = (x[:, 0, 0, :2] * 255).round().long()
        idx = px[:, 0] + 256 * px[:, 1]
        assert torch.equal(y, idx % 5)  # labels travel with their images
        out += idx.tolist()
    return out


def test_batches_are_float_unit_range_int64_labels(indexed):
    loader = Loader(indexed, "train", batch_size=16, train=False)
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 8, 8) and y.dtype == torch.int64 and y.shape == (16,)
    assert float(x.max()) <= 1.0 and float(x[1, 0, 0, 0]) == pytest.approx(1 / 255)
    assert len(loader) == 7 and loader.num_samples == N
    dropped = Loader(indexed, "train", batch_size=16, train=True, drop_last=True)
    assert len(dropped) == 6 and dropped.num_samples == 96 and len(seen(dropped)) == 96


def test_sequential_when_not_training(indexed):
    loader = Loader(indexed, "train", batch_size=10, train=False)
    assert seen(loader) == list(range(N)) and seen(loader) == list(range(N))


def test_loading_keeps_the_trainers_torch_thread_count(indexed):
    """ffcv sets torch's threads to its num_workers; a 1-CPU Ray worker must keep its one thread."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loader = Loader(indexed, "train", batch_size=4, train=True, num_workers=2)
        assert torch.get_num_threads() == 1
        assert seen(loader) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_order_reshuffles_per_epoch_and_resumes(indexed):
    loader = Loader(indexed, "train", batch_size=10, train=True, seed=7)
    epoch0, epoch1 = seen(loader), seen(loader)
    assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
    assert epoch0 != list(range(N)) and epoch0 != epoch1
    again = Loader(indexed, "train", batch_size=10, train=True, seed=7)
    assert seen(again) == epoch0  # same seed, same epoch: same order
    resumed = Loader(indexed, "train", batch_size=10, train=True, seed=7)
    resumed.set_epoch(1)
    assert seen(resumed) == epoch1  # a resumed run continues with epoch 1's order
    other = Loader(indexed, "train", batch_size=10, train=True, seed=8)
    assert seen(other) != epoch0


def _rank_worker(rank: int, world: int, port: int, data_dir: str, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = Loader(data_dir, "train", batch_size=8, train=True, seed=3, distributed=True)
        record = {"len": len(loader), "num_samples": loader.num_samples,
                  "epochs": [seen(loader) for _ in range(2)]}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_two_ranks_cover_each_sample_once_per_epoch(indexed, tmp_path):
    torch.multiprocessing.spawn(_rank_worker, args=(2, _free_port(), str(indexed), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    per_rank = (N + 1) // 2  # DistributedSampler pads 103 to 104
    for r in ranks:
        assert r["num_samples"] == per_rank and r["len"] == -(-per_rank // 8)
    for epoch in range(2):
        a, b = ranks[0]["epochs"][epoch], ranks[1]["epochs"][epoch]
        assert len(a) == len(b) == per_rank
        assert set(a) | set(b) == set(range(N))
        assert len(a) + len(b) - len(set(a) | set(b)) == 1  # exactly the one padded repeat
        assert len(set(a)) == per_rank and len(set(b)) >= per_rank - 1
    for r in ranks:
        assert r["epochs"][0] != r["epochs"][1]  # a new order each epoch
        assert set(r["epochs"][0]) != set(r["epochs"][1])  # and a new shard


def test_augment_flips_and_crops_image_and_mask_together(tmp_path):
    n = 64
    masks = np.zeros((n, 1, 16, 16), np.uint8)
    yy, xx = np.mgrid[0:16, 0:16]
    for i in range(n):  # an off-centre, asymmetric blob so flips and shifts show
        masks[i, 0] = (yy >= 2 + i % 5) & (yy < 9) & (xx >= 1 + i % 3) & (xx < 6 + (i % 7))
    x = np.repeat(masks * 255, 3, axis=1).astype(np.uint8)
    y = np.arange(n) % 2
    write_dataset(tmp_path / "set", SourceData(x, y, x, y, ["a", "b"], "none", masks, masks), source_kind="test")

    def run(train, augment, seed=0):
        loader = Loader(tmp_path / "set", "train", batch_size=n, train=train, augment=augment, with_mask=True,
                        seed=seed)
        return next(iter(loader))

    xa, _, ma = run(True, True)
    assert ma.dtype == torch.float32 and ma.shape == (n, 1, 16, 16)
    assert torch.equal(xa[:, :1], ma)  # the mask moved exactly with the image
    xp, _, mp = run(True, False)
    assert not torch.equal(xa, xp)  # augmentation changed something...
    assert torch.equal(run(True, True)[0], xa)  # ...deterministically for (seed, epoch)
    xe, _, _ = run(False, True)  # never on evaluation loaders
    assert torch.equal(xe, torch.from_numpy(x).float() / 255)
    # Each augmented image is its own image, maybe flipped, reflect-padded by 4 and cropped back.
    from vpn_dist.compat import epoch_order

    order = epoch_order(np.arange(n), seed=0, epoch=0, shuffle=True, distributed=False)
    original = torch.from_numpy(x[order.astype(np.int64)]).float() / 255
    flips, shifts = set(), set()
    for i in range(n):
        matches = [(f, dy, dx) for f in (0, 1) for dy in range(9) for dx in range(9)
                   if torch.equal(torch.nn.functional.pad((original[i:i + 1].flip(3) if f else original[i:i + 1]),
                                                          (4, 4, 4, 4), mode="reflect")[0, :, dy:dy + 16, dx:dx + 16],
                                  xa[i])]
        assert matches, f"sample {i} is not a flip+crop of its image"
        flips |= {m[0] for m in matches}
        shifts |= {m[1:] for m in matches}
    assert flips == {0, 1} and len(shifts) > 10

def test_channels_last_and_masks_on_synthetic(synthetic_dir):
    loader = Loader(synthetic_dir, "val", batch_size=50, train=False, channels_last=True, with_mask=True)
    x, y, m = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (50, 3, 32, 32)
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    assert len(loader) == 4 and loader.num_samples == 200


def test_errors(tmp_path, indexed):
    with pytest.raises(UserError, match="does not exist"):
        read_meta(tmp_path / "nope")
    with pytest.raises(UserError, match="meta.json is missing"):
        read_meta(tmp_path)
    with pytest.raises(UserError, match="no 'val' split"):
        Loader(indexed, "val", batch_size=4, train=False)
    with pytest.raises(UserError, match="has no masks"):
        Loader(indexed, "train", batch_size=4, train=False, with_mask=True)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "meta.json").write_text((indexed / "meta.json").read_text())
    with pytest.raises(UserError, match="train.beton is missing"):
        Loader(copy, "train", batch_size=4, train=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline(indexed):
    loader = Loader(indexed, "train", batch_size=16, train=True, device="cuda")
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
    assert sorted(seen(Loader(indexed, "train", batch_size=16, train=True, device="cuda"))) == list(range(N))


# --------------------------------------------------------------------------- the memory backend

def batches_of(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


@pytest.mark.parametrize("kwargs", [
    dict(train=True, seed=7),
    dict(train=True, seed=7, drop_last=True),
    dict(train=False),
    dict(train=True, seed=2, indices=np.arange(0, N, 3)),
])
def test_memory_backend_gives_ffcvs_batches(indexed, kwargs):
    """Same order per (seed, epoch), same last batch, same subset: switching data.loader changes only the speed."""
    ffcv = Loader(indexed, "train", batch_size=10, **kwargs)
    memory = Loader(indexed, "train", batch_size=10, backend="memory", **kwargs)
    assert len(memory) == len(ffcv) and memory.num_samples == ffcv.num_samples
    for _ in range(2):  # epochs 0 and 1
        expected, got = batches_of(ffcv), batches_of(memory)
        assert len(got) == len(expected)
        for (xe, ye), (xg, yg) in zip(expected, got):
            assert torch.equal(xg, xe) and torch.equal(yg, ye) and xg.dtype == torch.float32
    memory.set_epoch(1)
    ffcv.set_epoch(1)
    assert seen(memory) == seen(ffcv)


def test_memory_backend_augments_and_masks_like_ffcv(synthetic_dir):
    args = dict(batch_size=64, train=True, seed=3, augment=True, with_mask=True, channels_last=True)
    ffcv, memory = Loader(synthetic_dir, "train", **args), Loader(synthetic_dir, "train", backend="memory", **args)
    for (xe, ye, me), (xg, yg, mg) in zip(batches_of(ffcv), batches_of(memory)):
        assert torch.equal(xg, xe) and torch.equal(yg, ye) and torch.equal(mg, me)
        assert xg.is_contiguous(memory_format=torch.channels_last)


def test_backend_and_resolution_errors(indexed):
    with pytest.raises(UserError, match="data.loader 'disk' must be one of ffcv, memory"):
        Loader(indexed, "train", batch_size=4, train=True, backend="disk")
    with pytest.raises(UserError, match="is stored raw"):
        Loader(indexed, "train", batch_size=4, train=True, resolution=32)


@pytest.mark.integration
def test_two_ranks_shard_the_memory_backend_as_ffcv(indexed, tmp_path):
    torch.multiprocessing.spawn(_backend_rank_worker, args=(2, _free_port(), str(indexed), str(tmp_path)), nprocs=2)
    for r in range(2):
        record = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert record["memory"] == record["ffcv"] and len(record["ffcv"][0]) == (N + 1) // 2


def _backend_rank_worker(rank: int, world: int, port: int, data_dir: str, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        record = {}
        for backend in ("ffcv", "memory"):
            loader = Loader(data_dir, "train", batch_size=8, train=True, seed=3, distributed=True, backend=backend)
            record[backend] = [seen(loader) for _ in range(2)]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()
