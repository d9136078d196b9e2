"""Shared fixtures: prepared data directories (converted once per session), a CLI runner, and checks that test
modules share (test modules do not import each other)."""
import re
import subprocess
import sys
from pathlib import Path

from vpn_dist.launch import local_ray_environment

# Local Ray clusters started in this process stay on loopback, even when a test imports Ray first.
local_ray_environment()

import pytest

from data_fixtures import cifar10_dir, fashion_mnist_dir, synthetic_dir, tiny_synthetic_dir  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None):
    """`vpn-dist ARGS` in a fresh process; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "vpn_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"vpn-dist {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


def assert_console_once(text: str, epochs: int) -> None:
    """Each epoch's line of a run's console exactly once (Ray prefixes a worker's lines with its name and pid), and
    none of Ray Train's per-report dumps."""
    for epoch in range(1, epochs + 1):
        lines = re.findall(rf"^.*epoch +{epoch} \| loss .*$", text, flags=re.MULTILINE)
        assert len(lines) == 1, f"epoch {epoch}:\n{text[-4000:]}"
    assert "TrainingReport(" not in text, text[-4000:]


# Test tiers: `make test-fast` runs what is neither slow nor integration; integration tests train end to end,
# start Ray or other processes, or read the real data sets (each module below does throughout).
INTEGRATION_MODULES = {"test_train", "test_console", "test_fuzz", "test_benchmarks", "test_kill", "test_ray", "test_faults",
                       "test_tune"}
REAL_DATA_FIXTURES = {"fashion_mnist_dir", "cifar10_dir"}


def pytest_collection_modifyitems(items):
    for item in items:
        if (item.module.__name__ in INTEGRATION_MODULES or item.get_closest_marker("ray")
                or REAL_DATA_FIXTURES & set(item.fixturenames)):
            item.add_marker(pytest.mark.integration)
