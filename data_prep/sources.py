"""Readers from each source layout to a `SourceData`: uint8 arrays in memory for the small fixed-format sets,
`ImageFiles` (decoded one image at a time while writing) for image trees of any size.

Each reader checks its input and raises `UserError` naming the file at fault; nothing here touches the
output directory, so a bad source never leaves a .beton behind.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.write import SourceData
from vpn_dist.errors import UserError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
GRAY_MODES = {"1", "L", "LA", "La"}  # 8-bit gray; 16-bit, 32-bit and float gray: to_uint8


def sha256_file(path: Path, h=None):
    """Stream a file into a sha256 (or into `h`, when given)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable text file ({err})") from None


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist or is not a directory")
    return path


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)

def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(f"missing file {root / stem}[.gz]")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of uint8 (magic 0x0000 08 ndim), gzipped or not, checking its size."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path}: cannot read or decompress ({err})") from None
    magic = raw[:4]
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
        raise UserError(f"{path}: not an IDX file of {ndim}-d uint8 (magic number {magic.hex() or 'missing'}, "
                        f"expected 00000800 + {ndim:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise UserError(f"{path}: truncated or corrupt IDX: dimensions {dims} need {expected} bytes of data, "
                        f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_fashion_mnist(source: Path) -> SourceData:
    _require_dir(source, "Fashion-MNIST directory")
    paths = {key: _find_idx(source, stem) for key, stem in [
        ("train_x", "train-images-idx3-ubyte"), ("train_y", "train-labels-idx1-ubyte"),
        ("test_x", "t10k-images-idx3-ubyte"), ("test_y", "t10k-labels-idx1-ubyte")]}
    arrays = {key: read_idx(p, 3 if key.endswith("x") else 1) for key, p in paths.items()}
    for split in ("train", "test"):
        n_x, n_y = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if n_x != n_y:
            raise UserError(f"{paths[split + '_y']}: {n_y} labels for {n_x} images in {paths[split + '_x']}")
        if len(arrays[f"{split}_y"]) and arrays[f"{split}_y"].max() >= len(FASHION_MNIST_CLASSES):
            raise UserError(f"{paths[split + '_y']}: labels out of range (max {arrays[split + '_y'].max()}, "
                            f"expected 0..{len(FASHION_MNIST_CLASSES) - 1})")
    h = hashlib.sha256()
    for p in paths.values():
        h.update(p.name.encode())
        sha256_file(p, h)
    return SourceData(train_x=arrays["train_x"][:, None], train_y=arrays["train_y"].astype(np.int64),
                      test_x=arrays["test_x"][:, None], test_y=arrays["test_y"].astype(np.int64),
                      class_names=list(FASHION_MNIST_CLASSES), checksum=h.hexdigest())


# --------------------------------------------------------------------------- CIFAR-10 (python pickles)

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def _unpickle(data: bytes, where: str) -> dict:
    try:  # the official release is pickled; only feed it files you trust, as with any pickle
        obj = pickle.loads(data, encoding="bytes")
    except Exception as err:
        raise UserError(f"{where}: corrupt CIFAR-10 pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a dict in the CIFAR-10 pickle, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(blobs: dict[str, bytes], name: str, where: str, num_classes: int):
    batch = _unpickle(blobs[name], f"{where}/{name}")
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except KeyError as err:
        raise UserError(f"{where}/{name}: missing key {err} in the CIFAR-10 batch") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(f"{where}/{name}: expected data (N, 3072) and N labels, got {data.shape} and {len(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{where}/{name}: labels out of range ({labels.min()}..{labels.max()}, "
                        f"expected 0..{num_classes - 1})")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(source: Path, workers: int) -> SourceData:
    """The python tarball, its extracted cifar-10-batches-py/, or an ImageFolder tree (train/, test/)."""
    if not source.exists():
        raise UserError(f"CIFAR-10 source {source} does not exist")
    h = hashlib.sha256()
    if source.is_file():
        where = str(source)
        try:
            with tarfile.open(source, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in CIFAR_BATCHES if n not in members]
                if missing:
                    raise UserError(f"{source}: missing {', '.join(missing)} in the tarball")
                blobs = {n: tar.extractfile(members[n]).read() for n in CIFAR_BATCHES}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise UserError(f"{source}: not a readable CIFAR-10 tarball ({err})") from None
        sha256_file(source, h)
    else:
        if (source / "train").is_dir():
            return read_imagefolder(source, workers, channels=3)
        batch_dir = source / "cifar-10-batches-py" if (source / "cifar-10-batches-py").is_dir() else source
        missing = [n for n in CIFAR_BATCHES if not (batch_dir / n).is_file()]
        if missing:
            raise UserError(f"{batch_dir}: missing {', '.join(missing)} (expected cifar-10-batches-py/ "
                            f"or an ImageFolder tree with train/ and test/)")
        where = str(batch_dir)
        blobs = {n: (batch_dir / n).read_bytes() for n in CIFAR_BATCHES}
        for n in CIFAR_BATCHES:
            h.update(n.encode())
            h.update(blobs[n])
    meta = _unpickle(blobs["batches.meta"], f"{where}/batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if not names:
        raise UserError(f"{where}/batches.meta: no label_names")
    train = [_cifar_batch(blobs, n, where, len(names)) for n in CIFAR_BATCHES[:5]]
    test_x, test_y = _cifar_batch(blobs, "test_batch", where, len(names))
    return SourceData(train_x=np.concatenate([x for x, _ in train]), train_y=np.concatenate([y for _, y in train]),
                      test_x=test_x, test_y=test_y, class_names=names, checksum=h.hexdigest())


# --------------------------------------------------------------------------- image trees

def _read_image(path: str) -> np.ndarray:
    """One image file as 8-bit gray (H, W) or RGB (H, W, 3); UserError naming the file when it cannot be."""
    try:
        with Image.open(path) as im:
            im.load()
            array, error = to_uint8(im)
    except OSError as err:
        if err.strerror:  # the file itself (missing, unreadable), not its contents
            raise UserError(f"{path}: cannot read ({err.strerror})") from None
        error = f"not a readable image ({type(err).__name__}: {err})"
    except Exception as err:  # noqa: BLE001 - Pillow raises what a damaged file makes it raise
        error = f"not a readable image ({type(err).__name__}: {err})"
    if error:
        raise UserError(f"{path}: {error}")
    return array


def _scan(path: str):
    """Hash one file and read its image header (decoding a 32-bit or float one, to check its range): (digest, (H, W),
    gray, bytes) or (None, why, None, None)."""
    try:
        with open(path, "rb") as fh:
            blob = fh.read()
    except OSError as err:
        return None, f"cannot read ({err.strerror})", None, None
    try:
        with Image.open(io.BytesIO(blob)) as im:
            width, height = im.size
            gray = im.mode in GRAY_MODES or im.mode.startswith("I;16") or im.mode in ("I", "F")
            # 32-bit and float pixels may lie outside what converts: decode those (rare) now, before writing starts
            error = to_uint8(im)[1] if im.mode in ("I", "F") else None
    except Exception as err:  # noqa: BLE001
        return None, f"not a readable image ({type(err).__name__}: {err})", None, None
    if error:
        return None, error, None, None
    return hashlib.sha256(blob).digest(), (height, width), gray, len(blob)


def to_uint8(im: Image.Image) -> tuple[np.ndarray | None, str | None]:
    """An image as 8-bit gray (H, W) or RGB (H, W, 3), or why it cannot be. Pillow's convert("L") clips a 16-bit or
    a float image instead of scaling it (16-bit mid-grey 32768 becomes 255, float 0.5 becomes 0), so those are
    scaled here: 16-bit by 255/65535, 32-bit integers when they hold 16-bit values, floats when they lie in [0, 1]."""
    if im.mode.startswith("I;16"):
        wide = np.asarray(im).astype(np.uint32)
        return ((wide + 128) // 257).astype(np.uint8), None  # round(v * 255 / 65535)
    if im.mode == "I":
        wide = np.asarray(im)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            return None, (f"32-bit integer pixels ({int(wide.min())}..{int(wide.max())}) that are not 16-bit values: "
                          f"convert the image to 8 or 16 bits per channel first")
        return ((wide.astype(np.int64) + 128) // 257).astype(np.uint8), None  # 16-bit PNG and TIFF data
    if im.mode == "F":
        values = np.asarray(im)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            return None, (f"floating-point pixels outside [0, 1] ({float(np.nanmin(values)):g}.."
                          f"{float(np.nanmax(values)):g}): convert the image to 8 or 16 bits per channel first")
        return np.rint(values * 255).astype(np.uint8), None
    return np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB")), None


def scan_images(paths: list[Path], workers: int, desc: str) -> list[tuple]:
    """_scan every file, with a progress bar; UserError on the first bad one. Reads headers (and decodes only the
    rare 32-bit and float images): what decoding finds wrong in the others (a truncated file) stops the writer. In this process: a pool forked from a process whose
    other threads (numba's, OpenMP's) hold a lock deadlocks on it, and reading headers is quick."""
    del workers  # (the writer's processes decode in parallel)
    found = []
    for name in tqdm([str(p) for p in paths], desc=desc, unit="img", mininterval=1.0, disable=len(paths) < 1000):
        digest, size, gray, nbytes = _scan(name)
        if digest is None:
            raise UserError(f"{name}: {size}")
        found.append((digest, size, gray, nbytes))
    return found


def conform(array: np.ndarray, *, channels: int, size: tuple[int, int] | None,
            max_side: int | None = None) -> np.ndarray:
    """One decoded image as (C, H, W) uint8: resized to `size` (bilinear) when it differs, or shrunk to fit within
    max_side; gray repeated to RGB for channels=3, RGB made gray for channels=1."""
    if size is not None and array.shape[:2] != tuple(size):
        array = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    if array.ndim == 2:
        array = array[None] if channels == 1 else np.broadcast_to(array[None], (3,) + array.shape)
    elif channels == 1:
        array = np.asarray(Image.fromarray(array).convert("L"))[None]
    else:
        array = array.transpose(2, 0, 1)
    if max_side is not None:
        from vpn_dist.compat import fit_within

        array = fit_within(np.ascontiguousarray(array.transpose(1, 2, 0)), max_side).transpose(2, 0, 1)
    return np.ascontiguousarray(array)


class ImageFiles:
    """Image files standing in for the uint8 (N, C, H, W) array they decode to, so a set of any size converts in
    bounded memory: `files[i]` reads and decodes image i (in one of ffcv's writer processes), `files[indices]` is a
    subset. Every image becomes `size`, or with max_side keeps its own size, shrunk to fit within max_side
    (its nominal shape is then C x max_side x max_side)."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, paths: list[str], nbytes: np.ndarray, *, channels: int, size: tuple[int, int] | None,
                 max_side: int | None = None):
        self.paths, self.nbytes = paths, np.asarray(nbytes, dtype=np.int64)
        self.channels, self.size, self.max_side = channels, size, max_side
        self.shape = (len(paths), channels) + (tuple(size) if max_side is None else (max_side, max_side))
        self.file_bytes = int(self.nbytes.sum())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return conform(_read_image(self.paths[index]), channels=self.channels, size=self.size,
                           max_side=self.max_side)
        index = np.arange(len(self))[index]
        return ImageFiles([self.paths[i] for i in index], self.nbytes[index], channels=self.channels,
                          size=self.size, max_side=self.max_side)


def _tree_checksum(root: Path, paths: list[Path], digests: list[bytes]) -> str:
    h = hashlib.sha256()
    for p, d in sorted(zip((str(p.relative_to(root)) for p in paths), digests)):
        h.update(p.encode())
        h.update(d)
    return h.hexdigest()


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class folders")
    files = {}
    for name in classes:
        found = sorted(Path(dp) / f for dp, dns, fns in os.walk(split_dir / name)
                       for f in fns if not f.startswith("."))
        if not found:
            raise UserError(f"class folder {split_dir / name} is empty")
        files[name] = found
    return files


def read_imagefolder(source: Path, workers: int, *, channels: int | None = None,
                     size: tuple[int, int] | None = None, max_side: int | None = None) -> SourceData:
    """`train/<class>/...` and `test/<class>/...` (or `val/`); class index = sorted folder name."""
    _require_dir(source, "image tree")
    train_dir = _require_dir(source / "train", "train folder")
    test_dir = next((source / n for n in ("test", "val") if (source / n).is_dir()), None)
    if test_dir is None:
        raise UserError(f"{source} has neither test/ nor val/ next to train/")
    train_files, test_files = _class_files(train_dir), _class_files(test_dir)
    if set(train_files) != set(test_files):
        only_train = sorted(set(train_files) - set(test_files))
        only_test = sorted(set(test_files) - set(train_files))
        raise UserError(f"{train_dir} and {test_dir} have different class folders "
                        f"(only in train: {only_train}, only in {test_dir.name}: {only_test})")
    classes = sorted(train_files)
    paths, labels = {}, {}
    for split, files in (("train", train_files), ("test", test_files)):
        paths[split] = [p for c in classes for p in files[c]]
        labels[split] = np.concatenate([np.full(len(files[c]), i, np.int64) for i, c in enumerate(classes)])
    return _image_splits(source, paths, labels, classes, workers, channels=channels, size=size,
                         max_side=max_side)


def _image_splits(root, paths, labels, classes, workers, *, channels, size, max_side) -> SourceData:
    """Scan every file (checksum, sizes, gray or not) and settle the shape; the pixels are decoded while writing.
    Gray only when every image is gray (or channels=1); odd sizes are resized to the most common one (or to
    `size`); with max_side, RGB at each image's own size, shrunk to fit."""
    all_paths = paths["train"] + paths["test"]
    found = scan_images(all_paths, workers, desc=f"scanning {root.name}")
    sizes = [size for _, size, _, _ in found]
    if max_side is not None:
        channels, size, notes = 3, None, []
    else:
        if channels is None:
            channels = 1 if all(gray for _, _, gray, _ in found) else 3
        if size is None:
            size = Counter(sizes).most_common(1)[0][0]
        resized = sum(s != tuple(size) for s in sizes)
        notes = [f"resized {resized} of {len(sizes)} images to {size[0]}x{size[1]}"] if resized else []
    nbytes = np.array([n for _, _, _, n in found], dtype=np.int64)
    images = ImageFiles([str(p) for p in all_paths], nbytes, channels=channels, size=size, max_side=max_side)
    n_train = len(paths["train"])
    return SourceData(train_x=images[:n_train], train_y=labels["train"], test_x=images[n_train:],
                      test_y=labels["test"], class_names=list(classes),
                      checksum=_tree_checksum(root, all_paths, [d for d, _, _, _ in found]), notes=notes)


def read_tiny_imagenet(source: Path, workers: int, *, size: tuple[int, int] | None = None,
                       max_side: int | None = None) -> SourceData:
    """tiny-imagenet-200/: wnids.txt (class order), words.txt (names), train/<wnid>/images, val/ as test."""
    if (source / "tiny-imagenet-200").is_dir():
        source = source / "tiny-imagenet-200"
    _require_dir(source, "Tiny ImageNet directory")
    wnids_path = source / "wnids.txt"
    if not wnids_path.is_file():
        raise UserError(f"missing file {wnids_path}")
    wnids = [w.strip() for w in _read_text(wnids_path).split() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise UserError(f"{wnids_path}: empty or has duplicate wnids")
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (source / "words.txt").is_file():
        for line in _read_text(source / "words.txt").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    train_dir = _require_dir(source / "train", "train folder")
    folders = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if set(folders) != set(wnids):
        raise UserError(f"{train_dir} class folders differ from {wnids_path} "
                        f"(not in wnids: {sorted(set(folders) - set(wnids))[:5]}, "
                        f"no folder: {sorted(set(wnids) - set(folders))[:5]})")
    train_paths, train_labels = [], []
    for w in wnids:
        img_dir = train_dir / w / "images"
        found = sorted(p for p in img_dir.glob("*") if p.is_file() and not p.name.startswith(".")) \
            if img_dir.is_dir() else []
        if not found:
            raise UserError(f"class folder {img_dir} is missing or empty")
        train_paths += found
        train_labels += [index[w]] * len(found)
    annotations = source / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"missing file {annotations}")
    test_paths, test_labels = [], []
    for n, line in enumerate(_read_text(annotations).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise UserError(f"{annotations}:{n}: expected 'file<TAB>wnid...', got {line!r}")
        if parts[1] not in index:
            raise UserError(f"{annotations}:{n}: label {parts[1]!r} is not one of the {len(wnids)} wnids "
                            f"in {wnids_path} (label out of range)")
        test_paths.append(source / "val" / "images" / parts[0])
        test_labels.append(index[parts[1]])
    if not test_paths:
        raise UserError(f"{annotations} lists no images")
    for p in test_paths:
        if not p.is_file():
            raise UserError(f"{p} is listed in {annotations} but missing")
    return _image_splits(source, {"train": train_paths, "test": test_paths},
                         {"train": np.array(train_labels, np.int64), "test": np.array(test_labels, np.int64)},
                         [words.get(w, w) for w in wnids], workers, channels=3, size=size, max_side=max_side)
