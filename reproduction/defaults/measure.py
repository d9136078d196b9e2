"""Which RunConfig defaults train well on a user's own data: a few candidates on Fashion-MNIST, CIFAR-10 and a small
ImageFolder (1,400 Fashion-MNIST training images as PNGs), DNN3 base, baseline and joint (DNN3 generator), seed 0.

    python reproduction/defaults/measure.py DATA_DIR SHARED_DATASETS   # resumable: finished runs are read back

Writes reproduction/defaults/results.csv (one row per candidate x data x mode). amp=auto for every candidate, so
they differ only in the optimizer settings; the paper's protocol is the `paper` preset.
"""
from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
VPN = [sys.executable, "-m", "vpn_dist.cli"]
CANDIDATES = {
    "paper (SGD 1e-3, cosine)": ["--preset", "paper", "--set", "train.amp=auto"],
    "Adam 1e-3, constant (the defaults)": [],
    "Adam 1e-3, cosine": ["--set", "train.lr_schedule=cosine"],
    "Adam 1e-3, constant, no decay": ["--set", "train.weight_decay=0"],
}
EPOCHS = {"fashion-mnist": 10, "cifar10": 10, "small-imagefolder": 20}


def small_imagefolder(shared: Path, out: Path, per_class: tuple[int, int] = (140, 50)) -> None:
    """A user-sized ImageFolder: the first 140 training and 50 test images of each Fashion-MNIST class, as PNGs."""
    if out.is_dir():
        return
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = np.frombuffer(gzip.open(shared / f"fashion-mnist/{prefix}-images-idx3-ubyte.gz").read(), np.uint8,
                               offset=16).reshape(-1, 28, 28)
        labels = np.frombuffer(gzip.open(shared / f"fashion-mnist/{prefix}-labels-idx1-ubyte.gz").read(), np.uint8,
                               offset=8)
        n = per_class[0] if split == "train" else per_class[1]
        for label in range(10):
            folder = out / split / f"class{label}"
            folder.mkdir(parents=True)
            for i, index in enumerate(np.flatnonzero(labels == label)[:n]):
                Image.fromarray(images[index]).save(folder / f"{i:04d}.png")


def main() -> int:
    data_root, shared = Path(sys.argv[1]), Path(sys.argv[2])
    data = {"fashion-mnist": data_root / "fm", "cifar10": data_root / "c10", "small-imagefolder": data_root / "small"}
    small_imagefolder(shared, data_root / "small-tree")
    if not (data["small-imagefolder"] / "meta.json").exists():
        subprocess.run([*VPN, "prep", "imagefolder", "--source", str(data_root / "small-tree"), "--out",
                        str(data["small-imagefolder"])], check=True)
    rows = []
    for label, path in data.items():
        for number, (candidate, flags) in enumerate(CANDIDATES.items()):
            for mode, generator in (("baseline", "none"), ("joint", "dnn3")):
                out = data_root / "defaults-runs" / label / f"c{number}-{mode}"
                metrics = out / "metrics.json"
                finished = metrics.exists() and json.loads(metrics.read_text())["epochs_completed"] == EPOCHS[label]
                if not finished:
                    subprocess.run([*VPN, "train", "--data", str(path), "--base", "dnn3", "--generator", generator,
                                    "--mode", mode, "--epochs", str(EPOCHS[label]), "--out", str(out), *flags,
                                    *(["--resume", str(out)] if metrics.exists() else [])], check=True)
                m = json.loads(metrics.read_text())
                rows.append({"data": label, "candidate": candidate, "mode": mode, "epochs": EPOCHS[label],
                             "test_acc": m["test_acc_alg2"] if generator != "none" else m["test_acc_no_noise"],
                             "test_acc_no_noise": m["test_acc_no_noise"], "val_acc": m.get("val_acc"),
                             "train_loss": m["train_loss"],
                             "wall_time_s": round(m["wall_time_s"], 1)})
                write(rows)
    return 0


def write(rows: list[dict]) -> None:
    tmp = HERE / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(HERE / "results.csv")


if __name__ == "__main__":
    raise SystemExit(main())
