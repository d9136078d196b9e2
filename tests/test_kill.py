"""Kill drills, automatic: SIGKILL a `vpn-dist train` driver mid-epoch, cut its newest checkpoint short, then
`--resume`: the run falls back to the previous checkpoint, says so, and completes its configured epochs.

(A sweep driver killed with SIGKILL, then resumed: tests/test_reproduce.py; Ctrl-C on `vpn-dist tune`:
tests/test_tune.py.)
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli

ARGS = ["--base", "sr", "--generator", "dnn3", "--mode", "joint", "--epochs", "3", "--set", "train.batch_size=100",
        "--set", "data.num_workers=1", "--set", "train.optimizer=adam", "--set", "train.lr_schedule=constant"]


def kill_mid_epoch_3(argv: list[str], out: Path, log: Path, timeout: float = 600) -> None:
    """Start the driver in its own session, wait for epoch 2's checkpoint (epoch 3 is then under way), and SIGKILL
    the session: the driver and, with --workers, the local Ray it started."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    with open(log, "w") as sink:
        driver = subprocess.Popen([sys.executable, "-m", "vpn_dist.cli", *argv], cwd=REPO, env=env, stdout=sink,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    newest = out / "checkpoints" / "epoch_0002" / "state.pt"
    deadline = time.monotonic() + timeout
    try:
        while not newest.is_file():
            assert driver.poll() is None, f"the driver ended before epoch 2's checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:  # whole or not (a copy Ray Train was making stops with the kill), the test cuts the file short itself
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (out / "checkpoints" / "epoch_0003").exists(), "killed mid epoch 3"


def truncate_newest_then_resume(out: Path) -> dict:
    """Cut epoch 2's checkpoint to half (a crash while writing it, a full disk), resume, and return metrics.json."""
    newest = out / "checkpoints" / "epoch_0002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    resumed = run_cli("train", "--resume", str(out))
    told = resumed.stdout + resumed.stderr
    assert f"skipping checkpoint {newest.parent}" in told, told
    assert f"reading {out / 'checkpoints' / 'epoch_0001'} instead" in told, told
    assert (out / "checkpoints" / "unreadable-epoch_0002").is_dir(), "the unreadable checkpoint is kept, aside"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 3 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["resumed"] and metrics["resumed_from_epoch"] == 1
    return metrics


def test_sigkill_in_process_driver_then_resume_from_the_newest_readable_checkpoint(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    kill_mid_epoch_3(["train", "--data", str(synthetic_dir), *ARGS, "--out", str(out)], out, tmp_path / "first.log")
    truncate_newest_then_resume(out)


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_ray_driver_then_resume_from_the_newest_readable_checkpoint(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    kill_mid_epoch_3(["train", "--data", str(synthetic_dir), *ARGS, "--out", str(out), "--workers", "2"], out,
                     tmp_path / "first.log")
    metrics = truncate_newest_then_resume(out)
    assert [a["world_size"] for a in metrics["attempts"]] == [2, 2]
