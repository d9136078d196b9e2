"""Prepared data directories shared by tests: each converted once per session.

Use from a test module or conftest.py:  `from data_fixtures import fashion_mnist_dir, cifar10_dir, synthetic_dir`
(tests/ is on sys.path under pytest's default import mode).  Real-data fixtures skip only when
VPN_DATA_ROOT is unset; when it is set and the data is missing, they fail.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_PREPARED: dict[str, Path] = {}  # conversions survive fixtures being imported into several modules


def data_root() -> Path:
    root = os.environ.get("VPN_DATA_ROOT")
    if not root:
        pytest.skip("VPN_DATA_ROOT is not set (CI sets it to ../shared/datasets)")
    return Path(root)


def prepare(name: str, tmp_path_factory, argv: list[str]) -> Path:
    """Run `vpn-dist prep <argv> --out <tmp>` once per session and return the output dir."""
    from vpn_dist.cli import main

    if name not in _PREPARED:
        out = tmp_path_factory.mktemp(name) / "prepared"
        rc = main(["prep", *argv, "--out", str(out)])
        assert rc == 0, f"vpn-dist prep {' '.join(argv)} failed with exit code {rc}"
        _PREPARED[name] = out
    return _PREPARED[name]


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory) -> Path:
    """The real Fashion-MNIST (60,000 train / 10,000 test, no val) as .beton files."""
    source = data_root() / "fashion-mnist"
    assert source.is_dir(), f"VPN_DATA_ROOT is set but {source} is missing"
    return prepare("fashion_mnist", tmp_path_factory, ["fashion-mnist", "--source", str(source)])


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEG tree (50,000 / 10,000, labels by sorted folder name) as .beton files."""
    source = data_root() / "cifar10"
    assert source.is_dir(), f"VPN_DATA_ROOT is set but {source} is missing"
    return prepare("cifar10", tmp_path_factory, ["cifar10", "--source", str(source)])


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic set with masks: 4 classes, 800 train, 200 val, 400 test, 3x32x32."""
    return prepare("synthetic", tmp_path_factory,
                   ["synthetic", "--train-size", "1000", "--test-size", "400", "--val", "200", "--seed", "0"])


@pytest.fixture(scope="session")
def tiny_synthetic_dir(tmp_path_factory) -> Path:
    """A tiny synthetic set for commands that only check and plan: 4 classes of 16x16, 600 train, 100 val, 200 test."""
    return prepare("tiny_synthetic", tmp_path_factory,
                   ["synthetic", "--train-size", "600", "--test-size", "200", "--val", "100", "--classes", "4",
                    "--size", "16x16", "--seed", "0"])
