"""Converters: round trips on generated files in each source layout, bad inputs, real data."""
from __future__ import annotations

import gzip
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.sources import FASHION_MNIST_CLASSES
from source_trees import (CIFAR_NAMES, RNG, make_cifar_batches, make_fashion, make_tiny_imagenet, make_tree,
                          save_png, write_idx)
from vpn_dist.cli import main
from vpn_dist.data import Loader, read_meta
from vpn_dist.errors import UserError


# --------------------------------------------------------------------------- helpers

def prep(*argv) -> int:
    return main(["prep", *map(str, argv)])


def read_split(data_dir, split, with_mask=False):
    """Everything in a split, in file order, with pixels back as uint8."""
    loader = Loader(data_dir, split, batch_size=64, train=False, with_mask=with_mask)
    xs, ys, ms = [], [], []
    for batch in loader:
        xs.append(batch[0])
        ys.append(batch[1])
        if with_mask:
            ms.append(batch[2])
    import torch

    x = (torch.cat(xs) * 255).round().to(torch.uint8).numpy()
    y = torch.cat(ys).numpy()
    return (x, y, torch.cat(ms).numpy()) if with_mask else (x, y)


def betons(out: Path) -> list[str]:
    """Anything a failed run may have left: .beton files and partial temp files (not the empty lock file that says
    which process owns the directory: vpn_dist/lock.py)."""
    from vpn_dist.lock import LOCK_FILE

    return sorted(p.name for p in out.glob("*") if p.name != LOCK_FILE) if out.exists() else []


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip(tmp_path, gz):
    data = make_fashion(tmp_path / "src", gz=gz)
    assert prep("fashion-mnist", "--source", tmp_path / "src", "--out", tmp_path / "out") == 0
    meta = read_meta(tmp_path / "out")
    assert meta["class_names"] == FASHION_MNIST_CLASSES and meta["num_classes"] == 10
    assert meta["shape"] == [1, 28, 28] and meta["splits"] == {"train": 40, "val": 0, "test": 20}
    assert meta["storage"] == "raw" and meta["has_mask"] is False and meta["source_kind"] == "fashion-mnist"
    assert len(meta["source_checksum"]) == 64
    assert meta["mean"][0] == pytest.approx(data["train"][0].mean() / 255, abs=1e-9)
    assert meta["std"][0] == pytest.approx((data["train"][0] / 255).std(), abs=1e-9)
    for split, key in (("train", "train"), ("test", "t10k")):
        x, y = read_split(tmp_path / "out", split)
        np.testing.assert_array_equal(x[:, 0], data[key][0])
        np.testing.assert_array_equal(y, data[key][1])


@pytest.mark.parametrize("layout", ["tarball", "directory", "parent"])
def test_cifar10_pickles_round_trip(tmp_path, layout):
    train_x, train_y, test_x, test_y = make_cifar_batches(tmp_path / "src")
    source = {"directory": tmp_path / "src" / "cifar-10-batches-py", "parent": tmp_path / "src",
              "tarball": tmp_path / "cifar-10-python.tar.gz"}[layout]
    if layout == "tarball":
        with tarfile.open(source, "w:gz") as tar:
            tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert prep("cifar10", "--source", source, "--out", tmp_path / "out", "--val", 7, "--seed", 3) == 0
    meta = read_meta(tmp_path / "out")
    assert meta["class_names"] == CIFAR_NAMES and meta["shape"] == [3, 32, 32]
    assert meta["splits"] == {"train": 23, "val": 7, "test": 6}
    # The val split is a seeded permutation of train, both kept in source order.
    perm = np.random.default_rng(3).permutation(30)
    val_idx, train_idx = np.sort(perm[:7]), np.sort(perm[7:])
    for split, idx in (("train", train_idx), ("val", val_idx)):
        x, y = read_split(tmp_path / "out", split)
        np.testing.assert_array_equal(x, train_x[idx])
        np.testing.assert_array_equal(y, train_y[idx])
    x, y = read_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(x, test_x)
    np.testing.assert_array_equal(y, test_y)
    assert meta["mean"] == pytest.approx(list(train_x[train_idx].mean(axis=(0, 2, 3)) / 255), abs=1e-9)


def test_tiny_imagenet_round_trip(tmp_path):
    expected = make_tiny_imagenet(tmp_path)
    assert prep("tiny-imagenet", "--source", tmp_path / "tiny-imagenet-200", "--out", tmp_path / "out") == 0
    meta = read_meta(tmp_path / "out")
    # Class order is wnids.txt's (not sorted), names from words.txt.
    assert meta["class_names"] == ["name n02", "name n01", "name n03"]
    assert meta["shape"] == [3, 16, 16] and meta["splits"] == {"train": 9, "val": 0, "test": 6}
    for split in ("train", "test"):
        x, y = read_split(tmp_path / "out", split)
        np.testing.assert_array_equal(x, expected[split][0])
        np.testing.assert_array_equal(y, expected[split][1])


def test_imagefolder_png_round_trip_with_val_folder(tmp_path):
    expected = make_tree(tmp_path / "tree", test_name="val")
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out") == 0
    meta = read_meta(tmp_path / "out")
    assert meta["class_names"] == ["ant", "bee", "cat"] and meta["shape"] == [3, 12, 10]
    # The writers sum the pixels as they decode: the statistics are the decoded train images'.
    train = expected["train"][0] / 255
    assert meta["mean"] == pytest.approx(list(train.mean(axis=(0, 2, 3))), abs=1e-12)
    assert meta["std"] == pytest.approx(list(train.std(axis=(0, 2, 3))), abs=1e-9)
    for split in ("train", "test"):
        x, y = read_split(tmp_path / "out", split)
        np.testing.assert_array_equal(x, expected[split][0])
        np.testing.assert_array_equal(y, expected[split][1])


def test_cifar10_accepts_an_imagefolder_tree(tmp_path):
    expected = make_tree(tmp_path / "tree", classes=("truck", "airplane"), size=(32, 32))
    assert prep("cifar10", "--source", tmp_path / "tree", "--out", tmp_path / "out") == 0
    assert read_meta(tmp_path / "out")["class_names"] == ["airplane", "truck"]
    x, y = read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(x, expected["train"][0])
    np.testing.assert_array_equal(y, expected["train"][1])


def test_imagefolder_gray_tree_gives_one_channel(tmp_path):
    expected = make_tree(tmp_path / "tree", gray=True)
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out") == 0
    assert read_meta(tmp_path / "out")["shape"] == [1, 12, 10]
    x, _ = read_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(x, expected["test"][0])


def test_imagefolder_mixed_sizes_are_resized_with_a_note(tmp_path, capsys):
    make_tree(tmp_path / "tree", size=(12, 10))
    odd = RNG.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    save_png(tmp_path / "tree" / "train" / "ant" / "odd.png", odd)
    save_png(tmp_path / "tree" / "test" / "bee" / "odd_gray.png", odd[..., 0])  # gray among RGB -> RGB
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out") == 0
    assert "resized 2 of 20 images to 12x10" in capsys.readouterr().out
    meta = read_meta(tmp_path / "out")
    assert meta["shape"] == [3, 12, 10] and meta["splits"]["train"] == 13
    # An explicit --size resizes every image.
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out2", "--size", "8x9") == 0
    assert "resized 20 of 20 images to 8x9" in capsys.readouterr().out
    x, _ = read_split(tmp_path / "out2", "train")
    assert x.shape == (13, 3, 8, 9)


def test_jpeg_storage_reads_back_close(tmp_path):
    expected = make_tree(tmp_path / "tree", classes=("a", "b"), per_class=(3, 2), size=(72, 72))
    # Smooth images so JPEG is nearly lossless and the comparison is meaningful.
    for split, sub in (("train", "train"), ("test", "test")):
        xs = []
        for i, path in enumerate(sorted((tmp_path / "tree" / sub).glob("*/*.png"))):
            yy, xx = np.mgrid[0:72, 0:72]
            img = np.stack([(yy * 3 + i * 10) % 256, (xx * 3) % 256, np.full_like(yy, 40 * i % 256)], -1)
            save_png(path, img.astype(np.uint8))
            xs.append(img.transpose(2, 0, 1))
        expected[split] = (np.stack(xs), expected[split][1])
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out",
                "--jpeg-quality", 95) == 0
    assert read_meta(tmp_path / "out")["storage"] == "jpeg"
    x, y = read_split(tmp_path / "out", "train")
    assert x.shape == (6, 3, 72, 72)
    np.testing.assert_array_equal(y, expected["train"][1])
    assert np.abs(x.astype(int) - expected["train"][0]).mean() < 3


def test_max_side_keeps_each_size_within_it_and_decodes_at_a_resolution(tmp_path):
    from vpn_dist.compat import beton_tables

    sizes = {"train": [(60, 30), (20, 50), (16, 16), (80, 80)], "test": [(45, 90), (30, 20)]}
    for split, shapes in sizes.items():
        for i, (h, w) in enumerate(shapes):
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([yy * 200 // h, xx * 200 // w, np.full_like(yy, 60 + 40 * i)], -1).astype(np.uint8)
            save_png(tmp_path / "tree" / split / ("a" if i % 2 else "b") / f"{i}.png", img)
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out", "--max-side", 40) == 0
    meta = read_meta(tmp_path / "out")
    assert meta["storage"] == "jpeg" and meta["max_side"] == 40 and meta["jpeg_quality"] == 90
    assert meta["shape"] == [3, 40, 40] and meta["splits"] == {"train": 4, "val": 0, "test": 2}
    for split, shapes in sizes.items():  # stored in sorted-class order: a (odd i) before b (even i)
        ordered = [s for i, s in enumerate(shapes) if i % 2] + [s for i, s in enumerate(shapes) if i % 2 == 0]
        stored = beton_tables(tmp_path / "out" / f"{split}.beton").metadata["f0"]
        for (h, w), sh, sw in zip(ordered, stored["height"], stored["width"]):
            scale = min(1.0, 40 / max(h, w))  # shrunk to fit, never enlarged, aspect kept
            assert (sh, sw) == (int(h * scale), int(w * scale))
    train = Loader(tmp_path / "out", "train", batch_size=4, train=True, resolution=24)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 24, 24) and train.shape == (3, 24, 24) and sorted(y.tolist()) == [0, 0, 1, 1]
    x, _ = next(iter(Loader(tmp_path / "out", "test", batch_size=2, train=False, resolution=24)))
    assert x.shape == (2, 3, 24, 24)
    with pytest.raises(UserError, match="varying size"):
        Loader(tmp_path / "out", "train", batch_size=4, train=True)
    with pytest.raises(UserError, match="use data.loader ffcv"):
        Loader(tmp_path / "out", "train", batch_size=4, train=True, resolution=24, backend="memory")


@pytest.mark.parametrize("args, expect", [
    (["fashion-mnist", "--max-side", "64"], "--max-side is for image trees"),
    (["imagefolder", "--max-side", "64", "--size", "8x8"], "cannot go with --size"),
    (["imagefolder", "--max-side", "4"], "--max-side 4 must be at least 8"),
])
def test_max_side_nonsense(tmp_path, capsys, args, expect):
    make_tree(tmp_path / "tree")
    assert prep(*args, "--source", tmp_path / "tree", "--out", tmp_path / "out") == 2
    assert expect in capsys.readouterr().err
    assert betons(tmp_path / "out") == []


def test_small_sets_decode_bit_for_bit_through_both_backends(tmp_path):
    """The paper's sets (raw storage, no resolution) read back exactly the source pixels, ffcv or memory."""
    train_x, train_y, _, _ = make_cifar_batches(tmp_path / "src")
    assert prep("cifar10", "--source", tmp_path / "src", "--out", tmp_path / "out") == 0
    for backend in ("ffcv", "memory"):
        loader = Loader(tmp_path / "out", "train", batch_size=7, train=False, backend=backend)
        x = torch.cat([x for x, _ in loader])
        np.testing.assert_array_equal((x * 255).round().to(torch.uint8).numpy(), train_x)
        assert torch.equal(x, torch.from_numpy(train_x).float() / 255)


def test_force_overwrites_and_drops_stale_splits(tmp_path):
    make_tree(tmp_path / "tree")
    out = tmp_path / "out"
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", out, "--val", 2) == 0
    assert betons(out) == ["meta.json", "test.beton", "train.beton", "val.beton"]
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", out) == 2  # complete set, no --force
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", out, "--force") == 0
    assert betons(out) == ["meta.json", "test.beton", "train.beton"]
    assert read_meta(out)["splits"] == {"train": 12, "val": 0, "test": 6}


def test_interrupted_write_leaves_no_beton(tmp_path, monkeypatch):
    import data_prep.write as write

    make_tree(tmp_path / "tree")
    real = write.write_beton
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # train is complete and renamed, test dies half way
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(write, "write_beton", failing)
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out") == 130  # as after Ctrl-C
    assert betons(tmp_path / "out") == []


# --------------------------------------------------------------------------- bad input

def _fashion_bad(tmp_path, how):
    src = tmp_path / "src"
    make_fashion(src, gz=False)
    images = src / "train-images-idx3-ubyte"
    if how == "missing file":
        (src / "t10k-labels-idx1-ubyte").unlink()
        return src, "t10k-labels-idx1-ubyte"
    if how == "magic":
        images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
        return src, "magic number"
    if how == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        return src, "truncated"
    if how == "truncated gz":
        blob = gzip.compress(images.read_bytes())
        images.unlink()
        (src / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
        return src, "train-images-idx3-ubyte.gz"
    if how == "labels out of range":
        write_idx(src / "t10k-labels-idx1-ubyte", np.full(20, 10), gz=False)
        return src, "out of range"
    if how == "count mismatch":
        write_idx(src / "train-labels-idx1-ubyte", np.zeros(39), gz=False)
        return src, "39 labels for 40 images"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing file", "magic", "truncated", "truncated gz", "labels out of range",
                                 "count mismatch"])
def test_fashion_mnist_bad_input(tmp_path, capsys, how):
    src, expect = _fashion_bad(tmp_path, how)
    assert prep("fashion-mnist", "--source", src, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "error:" in err and expect in err
    assert betons(tmp_path / "out") == []


def _tree_bad(tmp_path, how):
    root = tmp_path / "tree"
    make_tree(root)
    if how == "corrupt image":
        path = root / "train" / "bee" / "001.png"
        path.write_bytes(path.read_bytes()[:40])
        return root, "001.png"
    if how == "not an image":
        (root / "test" / "cat" / "notes.txt").write_text("hello")
        return root, "notes.txt"
    if how == "empty class":
        (root / "train" / "dog").mkdir()
        (root / "test" / "dog").mkdir()
        return root, "dog is empty"
    if how == "different classes":
        (root / "train" / "dog").mkdir()
        save_png(root / "train" / "dog" / "0.png", np.zeros((12, 10, 3), np.uint8))
        return root, "different class folders"
    if how == "no test":
        import shutil

        shutil.rmtree(root / "test")
        return root, "neither test/ nor val/"
    if how == "missing dir":
        return tmp_path / "nowhere", "nowhere"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["corrupt image", "not an image", "empty class", "different classes", "no test",
                                 "missing dir"])
def test_imagefolder_bad_input(tmp_path, capsys, how):
    src, expect = _tree_bad(tmp_path, how)
    assert prep("imagefolder", "--source", src, "--out", tmp_path / "out") == 2
    assert expect in capsys.readouterr().err
    assert betons(tmp_path / "out") == []


def test_cifar10_bad_input(tmp_path, capsys):
    make_cifar_batches(tmp_path / "bad_label", bad_label=True)
    assert prep("cifar10", "--source", tmp_path / "bad_label", "--out", tmp_path / "out") == 2
    assert "data_batch_3: labels out of range" in capsys.readouterr().err

    make_cifar_batches(tmp_path / "missing")
    (tmp_path / "missing" / "cifar-10-batches-py" / "test_batch").unlink()
    assert prep("cifar10", "--source", tmp_path / "missing", "--out", tmp_path / "out") == 2
    assert "missing test_batch" in capsys.readouterr().err

    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 50)
    assert prep("cifar10", "--source", tmp_path / "cifar-10-python.tar.gz", "--out", tmp_path / "out") == 2
    assert "cifar-10-python.tar.gz: not a readable CIFAR-10 tarball" in capsys.readouterr().err

    make_cifar_batches(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    assert prep("cifar10", "--source", tmp_path / "corrupt", "--out", tmp_path / "out") == 2
    assert "data_batch_2: corrupt CIFAR-10 pickle" in capsys.readouterr().err
    assert betons(tmp_path / "out") == []


def test_tiny_imagenet_bad_input(tmp_path, capsys):
    make_tiny_imagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    annotations = base / "val" / "val_annotations.txt"
    good = annotations.read_text()
    annotations.write_text(good + "val_0.JPEG\tn77\t0\t0\t1\t1\n")
    assert prep("tiny-imagenet", "--source", base, "--out", tmp_path / "out") == 2
    assert "'n77' is not one of the 3 wnids" in capsys.readouterr().err
    annotations.unlink()
    assert prep("tiny-imagenet", "--source", base, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "missing file" in err and "val_annotations.txt" in err
    assert betons(tmp_path / "out") == []


@pytest.mark.parametrize("args, expect", [
    (["--val", "-1"], "--val -1"),
    (["--val", "12"], "smaller than the train size 12"),
    (["--jpeg-quality", "0"], "--jpeg-quality 0"),
    (["--size", "0x5"], "--size '0x5'"),
    (["--size", "big"], "--size 'big'"),
])
def test_nonsense_values(tmp_path, capsys, args, expect):
    make_tree(tmp_path / "tree")
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out", *args) == 2
    assert expect in capsys.readouterr().err
    assert betons(tmp_path / "out") == []


def test_nonsense_values_synthetic_and_gray_jpeg(tmp_path, capsys):
    assert prep("synthetic", "--out", tmp_path / "out", "--classes", "1") == 2
    assert "--classes 1" in capsys.readouterr().err
    assert prep("synthetic", "--out", tmp_path / "out", "--train-size", "2") == 2
    make_tree(tmp_path / "tree", gray=True)
    assert prep("imagefolder", "--source", tmp_path / "tree", "--out", tmp_path / "out", "--jpeg-quality", 90) == 2
    assert "needs 3-channel images" in capsys.readouterr().err
    assert prep("fashion-mnist", "--out", tmp_path / "out") == 2
    assert "needs --source" in capsys.readouterr().err
    assert betons(tmp_path / "out") == []


@pytest.mark.integration
def test_console_script_exits_2_and_names_the_file(tmp_path):
    src, _ = _fashion_bad(tmp_path, "magic")
    script = Path(sys.executable).parent / "vpn-dist"
    result = subprocess.run([str(script), "prep", "fashion-mnist", "--source", str(src), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train-images-idx3-ubyte" in result.stderr and "magic number" in result.stderr
    assert betons(tmp_path / "out") == []


# --------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_balanced_and_masked():
    from data_prep.synthetic import make_synthetic

    x, y, m = make_synthetic(600, classes=4, seed=5)
    x2, y2, m2 = make_synthetic(600, classes=4, seed=5)
    x3, _, _ = make_synthetic(600, classes=4, seed=6)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and np.array_equal(m, m2)
    assert not np.array_equal(x, x3)
    assert x.shape == (600, 3, 32, 32) and m.shape == (600, 1, 32, 32) and set(np.unique(m)) == {0, 1}
    assert np.bincount(y).tolist() == [150] * 4
    # The mask marks the object: its pixels are brighter than the background's, image by image.
    bright = x.astype(float).mean(axis=1)
    obj = (bright * m[:, 0]).sum((1, 2)) / m[:, 0].sum((1, 2))
    bg = (bright * (1 - m[:, 0])).sum((1, 2)) / (1 - m[:, 0]).sum((1, 2))
    assert (obj > bg + 30).mean() > 0.95
    area = m.mean(axis=(1, 2, 3))
    assert 0.1 < area.min() and area.max() < 0.6
    # The object is central-ish: the mask's centroid lies in the middle half.
    yy, xx = np.mgrid[0:32, 0:32]
    cy = (m[:, 0] * yy).sum((1, 2)) / m[:, 0].sum((1, 2))
    assert np.all(np.abs(cy - 16) < 8)
    # Different classes have different shapes: mean object area differs by class.
    per_class = [area[y == k].mean() for k in range(4)]
    assert len({round(a, 2) for a in per_class}) == 4


def test_synthetic_is_learnable_by_a_small_mlp():
    import torch

    from data_prep.synthetic import make_synthetic

    x, y, _ = make_synthetic(2000, seed=0)
    xt, yt, _ = make_synthetic(500, seed=0, stream=1)
    torch.manual_seed(0)
    X, Y = torch.tensor(x).float().flatten(1) / 255, torch.tensor(y)
    net = torch.nn.Sequential(torch.nn.Linear(3072, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(4):
        for idx in torch.randperm(len(X)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(X[idx]), Y[idx]).backward()
            opt.step()
    acc = (net(torch.tensor(xt).float().flatten(1) / 255).argmax(1) == torch.tensor(yt)).float().mean().item()
    assert acc > 0.4  # chance is 0.25


def test_synthetic_dir_round_trips_masks(synthetic_dir):
    from data_prep.synthetic import make_synthetic

    meta = read_meta(synthetic_dir)
    assert meta["has_mask"] and meta["splits"] == {"train": 800, "val": 200, "test": 400}
    assert meta["class_names"] == ["square", "disc", "triangle", "cross"]
    x, y, m = read_split(synthetic_dir, "test", with_mask=True)
    ex, ey, em = make_synthetic(400, classes=4, seed=0, stream=1)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    np.testing.assert_array_equal(m, em.astype(np.float32))


# --------------------------------------------------------------------------- real data (VPN_DATA_ROOT)

def test_real_fashion_mnist(fashion_mnist_dir):
    meta = read_meta(fashion_mnist_dir)
    assert meta["splits"] == {"train": 60000, "val": 0, "test": 10000}
    assert meta["shape"] == [1, 28, 28] and meta["class_names"] == FASHION_MNIST_CLASSES
    assert meta["mean"][0] == pytest.approx(0.2860, abs=5e-4)
    import torch

    for split, n, per_class in (("train", 60000, 6000), ("test", 10000, 1000)):
        loader = Loader(fashion_mnist_dir, split, batch_size=1000, train=False)
        total, count, labels = 0.0, 0, []
        for x, y in loader:
            total += x.double().sum().item()
            count += x.numel()
            labels.append(y)
        labels = torch.cat(labels)
        assert len(labels) == n and torch.bincount(labels).tolist() == [per_class] * 10
        if split == "train":
            assert total / count == pytest.approx(0.2860, abs=5e-4)


def test_real_cifar10(cifar10_dir):
    meta = read_meta(cifar10_dir)
    assert meta["splits"] == {"train": 50000, "val": 0, "test": 10000}
    assert meta["class_names"] == CIFAR_NAMES and meta["shape"] == [3, 32, 32]
    assert meta["mean"] == pytest.approx([0.491, 0.482, 0.447], abs=5e-3)
    import torch

    from data_fixtures import data_root

    loader = Loader(cifar10_dir, "test", batch_size=2000, train=False)
    batches = list(loader)
    labels = torch.cat([y for _, y in batches])
    assert torch.bincount(labels).tolist() == [1000] * 10
    # Sequential order is sorted class, then sorted file: spot-check the first and last images.
    tree = data_root() / "cifar10" / "test"
    for x, cls in ((batches[0][0][0], "airplane"), (batches[-1][0][-1], "truck")):
        files = sorted((tree / cls).iterdir())
        path = files[0] if cls == "airplane" else files[-1]
        expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal((x * 255).round().to(torch.uint8).numpy(), expected)
    train = Loader(cifar10_dir, "train", batch_size=5000, train=True, seed=0)
    assert train.num_samples == 50000 and len(train) == 10
