"""Small data sets in each source format `vpn-dist prep` reads (Fashion-MNIST IDX, CIFAR-10 pickles, ImageFolder
trees, Tiny ImageNet), written with random pixels; each maker returns what prep must read back.

Import from a test module: `from source_trees import make_fashion, ...` (tests/ is on sys.path under pytest's default
import mode).
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

RNG = np.random.default_rng(1234)


def write_idx(path: Path, array: np.ndarray, gz: bool, magic: bytes | None = None):
    header = magic or bytes([0, 0, 8, array.ndim])
    blob = header + np.array(array.shape, dtype=">u4").tobytes() + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def make_fashion(root: Path, gz=True, n_train=40, n_test=20):
    root.mkdir(parents=True, exist_ok=True)
    data = {"train": (RNG.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10),
            "t10k": (RNG.integers(0, 256, (n_test, 28, 28)), RNG.integers(0, 10, n_test))}
    for split, (x, y) in data.items():
        write_idx(root / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", y, gz)
    return data


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar_batches(root: Path, per_batch=6, bad_label=False):
    batch_dir = root / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = RNG.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
        y = [int(v) for v in RNG.integers(0, 10, per_batch)]
        if bad_label and name == "data_batch_3":
            y[2] = 10
        with open(batch_dir / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": y}, fh)
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.array(y))
    with open(batch_dir / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}, fh)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def save_png(path: Path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_tree(root: Path, classes=("cat", "ant", "bee"), per_class=(4, 2), test_name="test", size=(12, 10),
              gray=False):
    """ImageFolder of PNGs; returns {split: (images (N,C,H,W), labels)} in sorted-class, sorted-file order."""
    out = {}
    for split, n in (("train", per_class[0]), (test_name, per_class[1])):
        xs, ys = [], []
        for label, cls in enumerate(sorted(classes)):
            for i in range(n):
                shape = size if gray else size + (3,)
                img = RNG.integers(0, 256, shape).astype(np.uint8)
                save_png(root / split / cls / f"{i:03d}.png", img)
                xs.append(img[None] if gray else img.transpose(2, 0, 1))
                ys.append(label)
        out["test" if split == test_name else split] = (np.stack(xs), np.array(ys))
    return out


def make_tiny_imagenet(root: Path, wnids=("n02", "n01", "n03"), per_class=3, val_n=6):
    """tiny-imagenet-200 layout with 16x16 JPEGs (one grayscale); expected pixels via PIL."""
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tname {w}, other name\n" for w in wnids) + "n99\tunused\n")
    train = []
    for label, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per_class):
            path = base / "train" / w / "images" / f"{w}_{i}.JPEG"
            img = RNG.integers(0, 256, (16, 16) if i == 0 else (16, 16, 3)).astype(np.uint8)
            Image.fromarray(img).save(path, format="JPEG", quality=90)
            train.append((path, label))
    lines, test = [], []
    for i in range(val_n):
        label = int(RNG.integers(0, len(wnids)))
        path = base / "val" / "images" / f"val_{i}.JPEG"
        Image.fromarray(RNG.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(path, format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t10\t10")
        test.append((path, label))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    def pil(path):
        return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)

    return {split: (np.stack([pil(p) for p, _ in items]), np.array([lab for _, lab in items]))
            for split, items in (("train", train), ("test", test))}
