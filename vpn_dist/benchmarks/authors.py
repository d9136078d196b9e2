"""`vpn-dist bench authors`: the authors' training loop against `vpn-dist train`, side by side in one run, on the same
Fashion-MNIST images, epochs and optimizer (the paper preset: SGD with momentum, lr 0.001, cosine, batch 256).

The authors' side re-creates their code (hyzhang98/VPN: train.py, data_loader.py, pi_noise_generator.py) as it runs
on this data: the uint8 images behind a per-sample `ToTensor` Dataset and a shuffling DataLoader (their 16 worker
processes, pinned memory), their DNN3 base and DNN3 generator (weights N(0, 0.002^2), an unused mean head), the input
conditioned as x + gamma * y / (K - 1), m noise draws per image, one SGD over both networks, fp32. vpn-dist runs
its own path (a prepared .beton, FFCV, the paper preset) at fp32 and at the default precision.

Images/s are training images over the training part of each epoch (the evaluations either side runs are left out),
median over epochs 2..E; the whole protocol's wall time is that epoch time times the paper's 40 epochs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

PROTOCOL_EPOCHS = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=os.path.join(os.environ.get("VPN_DATA_ROOT", "../shared/datasets"),
                                                    "fashion-mnist"),
                   help="Fashion-MNIST IDX files (default: $VPN_DATA_ROOT/fashion-mnist)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per side: 1 warm-up + timed (default 3)")
    p.add_argument("--loader-workers", type=int, default=16,
                   help="the authors' DataLoader worker processes (theirs: 16)")
    p.add_argument("--m", type=int, default=1, help="noise draws per image (the authors' --noise_size, default 1)")


def run(args: argparse.Namespace) -> int:
    import torch

    from data_prep import prepare
    from data_prep.sources import read_fashion_mnist
    from vpn_dist.errors import UserError
    from vpn_dist.launch import train
    from vpn_dist.trainer import resolve_amp

    if args.epochs < 2:
        raise UserError(f"--epochs must be at least 2 (one warm-up epoch, then timed ones), got {args.epochs}")
    source = read_fashion_mnist(Path(args.source))
    images, labels = source.train_x[:, 0].copy(), source.train_y  # (writable, as torchvision hands it) all 60,000 training images, as their loader has
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "fashion-mnist"
        prepare("fashion-mnist", data, source=args.source)
        cfg_fp32 = _ours(args, data, tmp / "fp32", "off")
        rows = [("authors' loop", "fp32", _authors(images, labels, cfg_fp32, args))]
        for amp in ("off", "auto"):
            cfg = _ours(args, data, tmp / amp, amp)
            metrics = train(cfg)
            rates = [h["train_images_per_sec"] for h in metrics["history"][1:]]
            precision = resolve_amp(amp, torch.device("cpu"))
            rows.append(("vpn-dist train", "fp32" if precision == "off" else precision, statistics.median(rates)))
    n = len(images)
    theirs = rows[0][2]
    print(f"\nFashion-MNIST, DNN3 base + DNN3 generator, m={args.m}, the paper preset (SGD, batch 256); "
          f"{n:,} training images; {os.cpu_count()} cores, torch {torch.__version__}; median over epochs "
          f"2..{args.epochs}")
    print(f"| path | precision | train images/s | vs the authors' loop | {PROTOCOL_EPOCHS}-epoch training time |")
    print("|---|---|---|---|---|")
    for name, precision, rate in rows:
        print(f"| {name} | {precision} | {rate:,.0f} | {rate / theirs:.2f}x | "
              f"{PROTOCOL_EPOCHS * n / rate / 60:.1f} min |")
    return 0


def _ours(args: argparse.Namespace, data: Path, out: Path, amp: str):
    from vpn_dist.config import from_dict, preset

    return from_dict({"out": str(out), "data.path": str(data), "model.base": "dnn3", "model.generator": "dnn3",
                      "vpn.mode": "joint", "vpn.m": args.m, "train.epochs": args.epochs, "train.amp": amp,
                      "train.eval_every": 10**6, "train.figure_every": 10**6},
                     preset("paper"))


def _authors(images, labels, cfg, args: argparse.Namespace) -> float:
    """Their loop for cfg's epochs; the median training images/s over epochs 2..E."""
    import torch
    from torch import nn
    from torchvision import transforms

    torch.manual_seed(0)
    num_classes, (h, w) = int(labels.max()) + 1, images.shape[1:]
    d, gamma, m = h * w, 0.01, args.m  # gamma: their --coeff_category default

    class Images(torch.utils.data.Dataset):  # their VPNDataset: a uint8 image through ToTensor, one at a time
        to_tensor = transforms.ToTensor()

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return self.to_tensor(images[i]), int(labels[i])

    class Generator(nn.Module):  # their GaussianNoiseGeneratorDNN3
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, 1024), nn.Linear(1024, 1024)
            self.fc_variance, self.fc_mean = nn.Linear(1024, d), nn.Linear(1024, d)  # the mean head is never used
            for layer in (self.fc1, self.fc2, self.fc_variance, self.fc_mean):
                layer.weight.data.normal_(0, 0.002)
                layer.bias.data.zero_()

        def forward(self, x):
            feat = self.fc2(self.fc1(x.reshape(len(x), -1)).relu()).relu()
            return torch.zeros(x.shape), self.fc_variance(feat).abs().reshape(x.shape)

    base = nn.Sequential(nn.Flatten(), nn.Linear(d, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, num_classes))
    generator = Generator()
    loader = torch.utils.data.DataLoader(Images(), shuffle=True, batch_size=cfg.train.batch_size,
                                         num_workers=args.loader_workers, pin_memory=torch.cuda.is_available())
    optimizer = torch.optim.SGD([{"params": base.parameters()}, {"params": generator.parameters()}],
                                lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    cross_entropy = nn.CrossEntropyLoss()
    rates = []
    for _ in range(cfg.train.epochs):
        start = time.perf_counter()
        for x, y in loader:
            conditioned = x + (y / (num_classes - 1) * gamma)[:, None, None, None]
            optimizer.zero_grad()
            mu, sigma = generator(conditioned)
            noise = torch.randn(len(x), m, *x.shape[1:]) * sigma[:, None] + mu[:, None]
            inputs = (x[:, None] + noise).reshape(len(x) * m, *x.shape[1:])
            loss = cross_entropy(base(inputs), y.repeat_interleave(m))
            loss.backward()
            optimizer.step()
        scheduler.step()
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates[1:])
