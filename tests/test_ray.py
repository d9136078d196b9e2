"""Ray Train: 2 DDP workers survive a killed worker, and a job runs through `ray job submit`.

Every Ray cluster here binds 127.0.0.1 and is stopped by the test that started it.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_console import assert_console_once

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def test_two_workers_survive_a_killed_worker(synthetic_dir, tmp_path, cli):
    out = tmp_path / "run"
    args = ["--data", str(synthetic_dir), "--base", "dnn3", "--generator", "dnn3", "--mode", "joint", "--epochs", "2",
            "--workers", "2", "--set", "train.batch_size=50", "--set", "data.num_workers=1",
            "--set", "train.optimizer=adam", "--set", "train.lr_schedule=constant"]  # learns in 2 epochs
    # rank 1 exits hard at step 3 of epoch 1 (0-based), once; Ray restarts the group from epoch 1's checkpoint
    proc = cli("train", *args, "--out", str(out), "--set", "train.max_failures=1", "--set", "train.fault=1:1:3",
               check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / ".fault_injected").exists(), "the fault fired"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and metrics["worker_restarts"] == 1
    starts = [a["start_epoch"] for a in metrics["attempts"]]
    assert starts == [0, 1], "the restart resumed from the last completed epoch: at most one epoch redone"
    assert all(a["world_size"] == 2 and a["master_addr"] == "127.0.0.1" for a in metrics["attempts"]), "loopback"
    assert metrics["test_acc_alg2"] > 0.3 and metrics["test_acc_no_noise"] > 0.3  # chance is 0.25
    # in line with an uninterrupted 2-worker run (noise draws differ only in the redone partial epoch)
    clean = tmp_path / "clean"
    console = cli("train", *args, "--out", str(clean), timeout=600)
    assert_console_once(console.stdout + console.stderr, epochs=2)  # rank 0's line once; no per-rank report dumps
    reference = json.loads((clean / "metrics.json").read_text())
    assert abs(metrics["test_acc_no_noise"] - reference["test_acc_no_noise"]) < 0.08
    assert (out / "tb").is_dir() and list((out / "checkpoints").glob("epoch_0002/state.pt"))


def test_a_diverged_ray_run_exits_1_naming_epoch_and_step(synthetic_dir, tmp_path, cli):
    proc = cli("train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "none", "--mode", "baseline",
               "--epochs", "1", "--out", str(tmp_path / "nan"), "--workers", "2", "--set", "train.lr=3e38",
               "--set", "train.optimizer=sgd", "--set", "train.batch_size=100", check=False, timeout=600)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vpn-dist train: error: the Ray Train run failed: rank 0: non-finite loss"), last
    assert "at epoch 0 step" in last and "--resume" not in last  # no checkpoint to resume from


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str) -> None:
    """Stop only the Ray processes of the head this test started (`ray stop` would stop every Ray here)."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in arg for arg in (p.info["cmdline"] or []))]
    mine += [child for p in mine for child in _children(p)]  # agents retitle themselves (ray::DashboardAgent)
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=20)
    for proc in alive:
        proc.kill()


LOOPBACK_ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
    # loopback only, as `vpn_dist.launch.ray_session` does for a local Ray: workers report 127.0.0.1
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


def ray_start(temp_dir: str, *args: str) -> None:
    """`ray start` for one node on 127.0.0.1 with its own temp dir (what stop_head finds it by)."""
    node = subprocess.run([str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
                           "--disable-usage-stats",
                           # the job agent's fixed default port (52365) is taken when another Ray runs here
                           "--dashboard-agent-listen-port", str(free_port()), *args],
                          capture_output=True, text=True, env=LOOPBACK_ENV, timeout=180)
    assert node.returncode == 0, node.stderr


def start_head(temp_dir: str, num_cpus: int) -> tuple[int, int]:
    """A head node; returns (GCS port, dashboard port)."""
    gcs, dashboard = free_port(), free_port()
    ray_start(temp_dir, "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
              str(dashboard), "--num-cpus", str(num_cpus), "--ray-client-server-port", str(free_port()))
    return gcs, dashboard


def submit(dashboard: int, *argv: str) -> subprocess.CompletedProcess:
    """`ray job submit -- vpn-dist ARGV`, waiting for the head's job agent (slow to start on a loaded machine:
    Ray says so, and to retry)."""
    deadline = time.monotonic() + 300  # a busy 2-core machine took over 120 s
    while True:
        job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                              str(BIN / "vpn-dist"), *argv], capture_output=True, text=True, env=LOOPBACK_ENV,
                             timeout=600)
        if "No available agent to submit job" not in job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(3)


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_ray_job_submit_runs_a_two_worker_job(synthetic_dir, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="vpnray", dir="/tmp")  # short: Ray's socket paths must stay short
    try:
        _, dashboard = start_head(temp_dir, num_cpus=2)
        out = tmp_path / "job-run"
        job = submit(dashboard, "train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "dnn3",
                     "--mode", "joint", "--epochs", "2", "--out", str(out), "--workers", "2", "--set",
                     "train.batch_size=100", "--set", "data.num_workers=1")
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
        assert_console_once(job.stdout + job.stderr, epochs=2)  # joining a cluster printed them 2 to 4 times
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["epochs_completed"] == 2 and metrics["attempts"][0]["world_size"] == 2
        assert metrics["attempts"][0]["master_addr"] == "127.0.0.1"
        assert list((out / "tb").rglob("events.out.tfevents.*"))
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_worker_that_does_not_see_run_dir_stops_the_run_naming_node_and_path(synthetic_dir, tmp_path):
    """RUN_DIR on a disk the workers do not share, played on one machine: the driver skips writing its marker."""
    out = tmp_path / "unshared"
    script = ("import sys, vpn_dist.launch as launch; launch.write_storage_marker = lambda *a: None; "
              "from vpn_dist.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, "train", "--data", str(synthetic_dir), "--base", "sr",
                           "--generator", "none", "--mode", "baseline", "--epochs", "1", "--out", str(out),
                           "--workers", "2"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "does not see the run directory the driver wrote" in last and "node " in last, last
    assert f"{out / '.storage-marker'} is missing" in last and "cluster/README.md" in last, last
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("epoch_*")), "nothing trained"
