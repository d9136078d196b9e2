"""Ray Train: 2 DDP workers survive a killed worker, a job runs through `ray job submit` on one node and on two
(one worker each), and a run outlives a lost node when one replaces it.

Every Ray cluster here binds 127.0.0.1 and is stopped by the test that started it.
"""
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import assert_console_once
from vpn_dist.checkpoint import TrainState
from vpn_dist.errors import UserError
from vpn_dist.run_dir import RunDir

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def test_two_workers_survive_a_killed_worker(synthetic_dir, tmp_path, cli):
    out = tmp_path / "run"
    args = ["--data", str(synthetic_dir), "--base", "dnn3", "--generator", "dnn3", "--mode", "joint", "--epochs", "2",
            "--set", "data.num_workers=1", "--set", "train.optimizer=adam",
            "--set", "train.lr_schedule=constant"]  # learns in 2 epochs
    # rank 1 exits hard at step 3 of epoch 1 (0-based), once; Ray restarts the group from epoch 1's checkpoint
    proc = cli("train", *args, "--out", str(out), "--workers", "2", "--set", "train.batch_size=50",
               "--set", "train.max_failures=1", "--set", "train.fault=1:1:3", check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / ".fault_injected").exists(), "the fault fired"
    assert_console_once(proc.stdout + proc.stderr, epochs=2)  # rank 0's line once, across the restart too
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and metrics["worker_restarts"] == 1
    starts = [a["start_epoch"] for a in metrics["attempts"]]
    assert starts == [0, 1], "the restart resumed from the last completed epoch: at most one epoch redone"
    assert all(a["world_size"] == 2 and a["master_addr"] == "127.0.0.1" for a in metrics["attempts"]), "loopback"
    assert metrics["test_acc_alg2"] > 0.3 and metrics["test_acc_no_noise"] > 0.3  # chance is 0.25
    # in line with an uninterrupted run of the same global batch (in this process: the 2-worker console without a
    # restart is test_ray_job_submit_runs_a_two_worker_job's)
    clean = tmp_path / "clean"
    cli("train", *args, "--out", str(clean), "--set", "train.batch_size=100", timeout=600)
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


EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1, between Ray's worker ports (10002-19999) and the kernel's ephemeral range, not
    handed out before: a port drawn from that range (a bind to port 0) was taken again by the time Ray's runtime-env
    agent bound it, which killed that node's raylet (every connection and port-0 server of the Ray processes
    starting beside it draws from the range too)."""
    low = int(EPHEMERAL.read_text().split()[0]) if EPHEMERAL.exists() else 32768
    while True:
        port = random.randrange(20000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def stop_node(temp_dir: str, kill: bool = False) -> None:
    """Stop only the Ray processes of the node this test started with `temp_dir` (`ray stop` would stop every Ray
    here): its raylet, agents and workers, and on a head its GCS and dashboard. kill: SIGKILL at once, a node lost
    rather than shut down (Ray hears nothing and finds out by its health checks)."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in arg for arg in (p.info["cmdline"] or []))]
    mine += [child for p in mine for child in _children(p)]  # workers and agents retitle themselves (ray::...)
    for proc in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill() if kill else proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=20)
    for proc in alive:
        proc.kill()


def remove_nodes(*temp_dirs: str | None) -> None:
    """The end of a test's cluster: stop each node it started (joined nodes before the head) and remove its temp
    dir."""
    for temp_dir in filter(None, temp_dirs):
        stop_node(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


LOOPBACK_ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
    # loopback only, as `vpn_dist.launch.ray_session` does for a local Ray: workers report 127.0.0.1
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo",
    # a loaded 2-core machine ran past Ray's start-up waits: 30 s for each dashboard module to start, 30 s for the
    # new GCS to answer `ray start`
    "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "300", "RAY_py_gcs_connect_timeout_s": "120",
    # workers keep the test's priority: Ray lowers theirs by 15, and beside another busy Ray they got next to no CPU
    "RAY_worker_niceness": "0"}

# `ray start --address` for a second node on this machine. Ray's CLI refuses to add a node while
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps Ray on 127.0.0.1); with it on, the CLI swaps 127.0.0.1 (in --address
# and --node-ip-address) for the host's address, where the head does not listen, and a node not on 127.0.0.1 binds all
# interfaces. So this runs Ray's own CLI with that one check lifted and 127.0.0.1 kept: the node is a real second raylet
# (its own temp dir, ports and processes, its own CPU) that joins through the head's GCS as a node on another machine.
JOIN_ON_LOOPBACK = ("import sys, ray._private.ray_constants as constants, ray._private.services as services; "
                    "constants.ENABLE_RAY_CLUSTER = True; "
                    "services.get_node_ip_address = lambda address=None: '127.0.0.1'; "
                    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")


def ray_start(temp_dir: str, *args: str) -> None:
    """`ray start` for one node on 127.0.0.1 with its own temp dir (what stop_node finds it by): a head, or with
    `--address` in args a node that joins one."""
    command = [sys.executable, "-c", JOIN_ON_LOOPBACK] if "--address" in args else [str(BIN / "ray")]
    for _ in range(3):  # a loaded machine can still run past a fixed wait (30 s for the raylet to register): again
        node = subprocess.run([*command, "start", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
                               "--disable-usage-stats",
                               # free ports for the agents: the job agent's fixed default (52365) is taken when
                               # another Ray runs here, and a raylet given no port waits 15 s for the agent to report
                               # its own, then aborts, which a loaded machine ran past (ray-project/ray#65983)
                               "--dashboard-agent-listen-port", str(free_port()),
                               "--dashboard-agent-grpc-port", str(free_port()),
                               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                               *args],
                              capture_output=True, text=True, env=LOOPBACK_ENV, timeout=600)  # minutes when loaded
        if node.returncode == 0:
            return
        stop_node(temp_dir)
    raise AssertionError(node.stdout[-3000:] + node.stderr[-3000:])


def start_head(temp_dir: str, num_cpus: int) -> tuple[int, int]:
    """A head node; returns (GCS port, dashboard port)."""
    gcs, dashboard = free_port(), free_port()
    ray_start(temp_dir, "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
              str(dashboard), "--num-cpus", str(num_cpus), "--ray-client-server-port", str(free_port()))
    return gcs, dashboard


def join_node(gcs: int) -> str:
    """A second node with 1 CPU joining the head at 127.0.0.1:GCS; returns its temp dir (stop_node's handle)."""
    temp_dir = tempfile.mkdtemp(prefix="vpnnode", dir="/tmp")  # short: Ray's socket paths must stay short
    ray_start(temp_dir, "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1")
    return temp_dir


def ray_list(dashboard: int, what: str, *args: str) -> list[dict]:
    """`ray list nodes|actors ...` as JSON, from the head's state API."""
    listed = subprocess.run([str(BIN / "ray"), "list", what, "--address", f"http://127.0.0.1:{dashboard}",
                             "--format", "json", "--limit", "1000", *args],
                            capture_output=True, text=True, env=LOOPBACK_ENV, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    return json.loads(listed.stdout)


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
        remove_nodes(temp_dir)


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


# dnn3 on both sides: an epoch takes seconds, time enough to lose a node in the middle of one
TWO_NODE_RUN = ["--data", "{data}", "--base", "dnn3", "--generator", "dnn3", "--mode", "joint", "--epochs", "3",
                "--workers", "2", "--set", "train.batch_size=50", "--set", "data.num_workers=1",
                "--set", "train.optimizer=adam", "--set", "train.lr_schedule=constant"]


def two_node_run(synthetic_dir: Path, out: Path, *extra: str) -> list[str]:
    return [arg.replace("{data}", str(synthetic_dir)) for arg in TWO_NODE_RUN] + ["--out", str(out), *extra]


def lose_node_mid_epoch(node_dir: str, out: Path) -> int:
    """Once the run's first checkpoint reads back whole (epoch 2 under way), SIGKILL every process of the node:
    raylet, agents and its training worker. Returns the epochs checkpointed by then. (Killed while Ray Train copied
    the checkpoint into RUN_DIR, a node holding rank 0 left it cut short: another drill.)"""
    deadline = time.monotonic() + 900
    while (found := RunDir(out).latest_checkpoint()) is None or not reads_back(found):
        assert time.monotonic() < deadline, "no checkpoint within 15 minutes"
        time.sleep(0.2)
    stop_node(node_dir, kill=True)
    return RunDir(out).latest_state()[0].epoch  # the newest that reads back whole: where a restart or --resume begins


def reads_back(checkpoint: Path) -> bool:
    try:
        TrainState.load(checkpoint)
    except UserError:
        return False
    return True


def worker_nodes(dashboard: int) -> list[tuple[str, str]]:
    """(node id, state) of every Ray Train worker actor the cluster has run, dead ones too."""
    return [(actor["node_id"], actor["state"])
            for actor in ray_list(dashboard, "actors", "--detail", "--filter", "class_name=RayTrainWorker")]


@pytest.mark.slow
def test_ray_job_submit_on_two_nodes_puts_one_worker_on_each(synthetic_dir, tmp_path):
    """A head and a second node joined with `ray start --address`, 1 CPU each, run a 2-worker job.
    4 to 7 minutes on a shared, busy 2-core machine (most of it Ray starting its processes)."""
    head_dir = tempfile.mkdtemp(prefix="vpnray", dir="/tmp")
    node_dir = None
    try:
        gcs, dashboard = start_head(head_dir, num_cpus=1)
        node_dir = join_node(gcs)
        nodes = ray_list(dashboard, "nodes")
        assert len(nodes) == 2 and all(node["state"] == "ALIVE" and node["node_ip"] == "127.0.0.1" for node in nodes)
        out = tmp_path / "two-nodes"
        job = submit(dashboard, "train", *two_node_run(synthetic_dir, out))
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert_console_once(job.stdout + job.stderr, epochs=3)
        workers = worker_nodes(dashboard)
        assert sorted(node for node, _ in workers) == sorted(node["node_id"] for node in nodes), \
            f"one worker on each node: {workers}"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["epochs_completed"] == 3 and metrics["worker_restarts"] == 0
        assert [(a["world_size"], a["master_addr"]) for a in metrics["attempts"]] == [(2, "127.0.0.1")]
        assert metrics["test_acc_no_noise"] > 0.3  # chance is 0.25
        assert sorted(path.name for path in (out / "checkpoints").glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
        assert (out / "checkpoints" / "epoch_0003" / "state.pt").is_file()
        assert list((out / "tb").rglob("events.out.tfevents.*"))
    finally:
        remove_nodes(node_dir, head_dir)


@pytest.mark.slow
def test_a_run_outlives_a_lost_node_when_another_joins(synthetic_dir, tmp_path):
    """The second node's processes are killed mid-epoch; with train.max_failures=1 and a new node joining, Ray Train
    restarts the workers from the last checkpoint. 2 to 4 minutes on a shared, busy 2-core machine."""
    head_dir = tempfile.mkdtemp(prefix="vpnray", dir="/tmp")
    node_dirs = []
    try:
        gcs, dashboard = start_head(head_dir, num_cpus=1)
        node_dirs.append(join_node(gcs))
        out = tmp_path / "drill"
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(submit, dashboard, "train", *two_node_run(synthetic_dir, out),
                                  "--set", "train.max_failures=1")
            done = lose_node_mid_epoch(node_dirs[0], out)
            node_dirs.append(join_node(gcs))  # the replacement: the head alone has 1 CPU for 2 workers
            job = running.result()
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["epochs_completed"] == 3 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
        assert metrics["worker_restarts"] == 1
        assert [(a["reason"], a["start_epoch"]) for a in metrics["attempts"]] == [("start", 0), ("recovery", done)], \
            "the restart began at the last checkpoint: only the interrupted epoch was redone"
        assert all(a["world_size"] == 2 and a["master_addr"] == "127.0.0.1" for a in metrics["attempts"])
        lost = [node for node in ray_list(dashboard, "nodes") if node["state"] == "DEAD"]
        assert len(lost) == 1, lost
        workers = worker_nodes(dashboard)
        assert (lost[0]["node_id"], "DEAD") in workers and len({node for node, _ in workers}) == 3, \
            f"the lost node, the head and the replacement each ran a worker: {workers}"
    finally:
        remove_nodes(*node_dirs, head_dir)


@pytest.mark.slow
def test_a_lost_node_without_replacement_stops_the_run_naming_it_and_resume_finishes(synthetic_dir, tmp_path):
    """train.max_failures=0: losing the second node stops the job with one error naming that node and the --resume
    command; following it once a node has joined again finishes the run. About 2.5 minutes on a shared, busy
    2-core machine."""
    head_dir = tempfile.mkdtemp(prefix="vpnray", dir="/tmp")
    node_dirs = []
    try:
        gcs, dashboard = start_head(head_dir, num_cpus=1)
        node_dirs.append(join_node(gcs))
        second = [node["node_id"] for node in ray_list(dashboard, "nodes") if not node["is_head_node"]]
        out = tmp_path / "lost"
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(submit, dashboard, "train", *two_node_run(synthetic_dir, out))
            done = lose_node_mid_epoch(node_dirs[0], out)
            job = running.result()
        text = job.stdout + job.stderr
        assert job.returncode != 0 and "failed" in job.stdout.lower(), text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("vpn-dist train: error:")]
        assert errors and errors[-1].startswith(
            f"vpn-dist train: error: the Ray Train run failed: node 127.0.0.1 (id {second[0]}) was lost"), text[-3000:]
        assert f"continue with `vpn-dist train --resume {out}`" in text, text[-3000:]

        node_dirs.append(join_node(gcs))  # the suggestion, once the cluster has 2 CPUs again
        resumed = submit(dashboard, "train", "--resume", str(out))
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["epochs_completed"] == 3 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
        assert metrics["resumed"] and metrics["resumed_from_epoch"] == done and metrics["worker_restarts"] == 0
    finally:
        remove_nodes(*node_dirs, head_dir)
