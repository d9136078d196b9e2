"""A synthetic test bed: one whole object per image decides the class, the background is clutter.

Each image has a textured background with fragments (half-cut copies) of *other* classes' shapes, and
one whole object of its own class near the centre, in a random colour.  The foreground mask marks the
object's pixels, so one can check where a learned noise scale sits (the paper's claim: on background).
Everything is vectorised numpy over the whole batch and seeded, so a seed gives the same bytes.
"""
from __future__ import annotations

import hashlib

import numpy as np
from tqdm import tqdm

from data_prep.write import SourceData
from vpn_dist.errors import UserError

VERSION = 1  # bump when the generator changes, so checksums of old sets differ


def _square(u, v): return np.maximum(abs(u), abs(v)) <= 0.8
def _disc(u, v): return u * u + v * v <= 1.0
def _triangle(u, v): return (u >= -0.9) & (u <= 0.8) & (abs(v) <= (u + 0.9) / 1.7)
def _cross(u, v): return ((abs(u) <= 1) & (abs(v) <= 0.3)) | ((abs(v) <= 1) & (abs(u) <= 0.3))
def _ring(u, v): return (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55**2)
def _diamond(u, v): return abs(u) + abs(v) <= 1.0
def _x(u, v): return (abs(abs(u) - abs(v)) <= 0.3) & (np.maximum(abs(u), abs(v)) <= 0.9)
def _stripes(u, v): return (np.maximum(abs(u), abs(v)) <= 0.85) & (np.floor((u + 0.85) * 3.5) % 2 == 0)


SHAPES = {"square": _square, "disc": _disc, "triangle": _triangle, "cross": _cross,
          "ring": _ring, "diamond": _diamond, "x": _x, "stripes": _stripes}
CLASS_NAMES = list(SHAPES)


def _draw(kinds, cy, cx, radius, grid_y, grid_x):
    """Boolean (N, H, W): shape kinds[i] centred at (cy[i], cx[i]) with the given radius."""
    u = (grid_y[None] - cy[:, None, None]) / radius[:, None, None]
    v = (grid_x[None] - cx[:, None, None]) / radius[:, None, None]
    out = np.zeros(u.shape, dtype=bool)
    for k, fn in enumerate(SHAPES.values()):
        sel = kinds == k
        if sel.any():
            out[sel] = fn(u[sel], v[sel])
    return out, u, v


def make_synthetic(n: int, *, classes: int = 4, size: tuple[int, int] = (32, 32), seed: int = 0,
                   stream: int = 0, fragments: int = 4):
    """Return images (n, 3, H, W) uint8, balanced labels (n,) int64, masks (n, 1, H, W) uint8 (1 = object)."""
    rng = np.random.default_rng([seed, stream, VERSION])
    labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
    images, masks = [], []
    with tqdm(total=n, desc="rendering", unit="img", disable=n <= 4096) as bar:  # a bar once there are chunks
        for i, start in enumerate(range(0, n, 4096)):  # chunks bound memory; each has its own seeded stream
            x, m = _render(labels[start:start + 4096], classes, size,
                           np.random.default_rng([seed, stream, VERSION, i]), fragments)
            images.append(x)
            masks.append(m)
            bar.update(len(x))
    return np.concatenate(images), labels, np.concatenate(masks)


def _render(labels, classes, size, rng, fragments):
    n = len(labels)
    h, w = size
    grid_y, grid_x = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5,
                                 indexing="ij")
    scale = min(h, w)

    # Background: dark base colour, a linear gradient, per-pixel noise.
    base = rng.uniform(15, 95, (n, 3, 1, 1)).astype(np.float32)
    slope = rng.uniform(-1, 1, (n, 2, 1, 1)).astype(np.float32) * (30.0 / scale)
    image = (base + slope[:, :1] * (grid_y - h / 2) + slope[:, 1:] * (grid_x - w / 2)
             + rng.uniform(-25, 25, (n, 3, h, w)).astype(np.float32))

    # Clutter: half-cut pieces of other classes' shapes, anywhere.
    for _ in range(fragments):
        kinds = (labels + rng.integers(1, classes, n)) % classes
        piece, u, v = _draw(kinds, rng.uniform(0, h, n), rng.uniform(0, w, n),
                            rng.uniform(0.22, 0.34, n) * scale, grid_y, grid_x)
        angle = rng.uniform(0, 2 * np.pi, n)[:, None, None]
        piece &= u * np.cos(angle) + v * np.sin(angle) > rng.uniform(-0.1, 0.4, n)[:, None, None]
        colour = rng.uniform(110, 255, (n, 3, 1, 1)).astype(np.float32)
        image = np.where(piece[:, None], colour, image)

    # The object: whole, central-ish, random colour with a little texture noise.
    jitter = scale / 8
    obj, _, _ = _draw(labels, h / 2 + rng.uniform(-jitter, jitter, n), w / 2 + rng.uniform(-jitter, jitter, n),
                      rng.uniform(0.28, 0.36, n) * scale, grid_y, grid_x)
    colour = rng.uniform(110, 255, (n, 3, 1, 1)).astype(np.float32)
    image = np.where(obj[:, None], colour + rng.uniform(-12, 12, (n, 3, h, w)).astype(np.float32), image)
    return np.clip(image, 0, 255).round().astype(np.uint8), obj[:, None].astype(np.uint8)


def read_synthetic(*, classes: int = 4, train_size: int = 4000, test_size: int = 1000,
                   size: tuple[int, int] | None = None, seed: int = 0) -> SourceData:
    size = size or (32, 32)
    if not 2 <= classes <= len(SHAPES):
        raise UserError(f"--classes {classes} must be between 2 and {len(SHAPES)} for synthetic")
    if train_size < classes or test_size < classes:
        raise UserError(f"--train-size {train_size} and --test-size {test_size} must each be at least "
                        f"--classes {classes}")
    if min(size) < 16 or max(size) > 512:
        raise UserError(f"--size {size[0]}x{size[1]} must be between 16 and 512 on each side for synthetic")
    train_x, train_y, train_m = make_synthetic(train_size, classes=classes, size=size, seed=seed, stream=0)
    test_x, test_y, test_m = make_synthetic(test_size, classes=classes, size=size, seed=seed, stream=1)
    params = f"synthetic v{VERSION} classes={classes} train={train_size} test={test_size} size={size} seed={seed}"
    return SourceData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                      class_names=CLASS_NAMES[:classes], checksum=hashlib.sha256(params.encode()).hexdigest(),
                      train_mask=train_m, test_mask=test_m)
