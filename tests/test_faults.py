"""Faults an operator meets, injected on purpose: a full disk, a read-only mount, a second process on the same
directory, a killed process's lock, a GPU that is not there, a Ray address that answers nothing, Ctrl-C and SIGTERM,
data that is not what a command assumes.

The rule for each (docs/faults.md): one line `vpn-dist <command>: error: <cause and the way on>`, soon, never a hang
and never a traceback; what was whole before the fault is whole after it, no temporary file stays, a refusal changes
nothing on disk; and the way on, followed, works.

Full disks and read-only mounts are real file systems (a small tmpfs, a read-only bind mount): they need root, which
CI has; elsewhere those tests skip. Each mount is removed by the test that made it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from vpn_dist.checkpoint import TrainState
from vpn_dist.cli import main
from vpn_dist.run_dir import RunDir

ERROR_LINE = re.compile(r"^vpn-dist [a-z]+: error: \S")
FAST = [arg for key in ("train.batch_size=64", "train.figure_every=100", "data.num_workers=1",
                        "train.epoch_eval_images=0") for arg in ("--set", key)]


# ---------------------------------------------------------------- data, runs, commands

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small prepared set: 4 classes, 3x16x16, 120 train / 40 val / 40 test."""
    out = tmp_path_factory.mktemp("faults") / "data"
    assert main(["prep", "synthetic", "--out", str(out), "--train-size", "160", "--test-size", "40", "--val", "40",
                 "--size", "16x16", "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    """A finished 1-epoch run on `data` (copy it before changing it)."""
    run = tmp_path_factory.mktemp("faults_run") / "run"
    assert main(train_argv(data, run)) == 0
    return run


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """A baseline softmax regression: checkpoints of a few KB, seconds per epoch."""
    return ["train", "--data", str(data), "--base", "sr", "--generator", "none", "--mode", "baseline",
            "--epochs", "1", "--out", str(out), *FAST, *extra]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr), after checking stderr holds no traceback."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Exception in thread" not in err, err
    return rc, out, err


def error_line(err: str, command: str) -> str:
    """The last stderr line, which must be `vpn-dist <command>: error: ...`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and ERROR_LINE.match(lines[-1]) and lines[-1].startswith(f"vpn-dist {command}:"), err
    return lines[-1]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[Path]:
    return [p for pattern in ("*.tmp", "*.partial") for p in root.rglob(pattern)]


def shared_memory() -> set[str]:
    """Python's shared memory segments (FFCV's writer keeps its samples' metadata in one)."""
    return {p.name for p in Path("/dev/shm").glob("psm_*")} if Path("/dev/shm").is_dir() else set()


# A process started in the background by a non-interactive shell inherits SIGINT ignored, and Python then leaves it
# ignored: the child gets Ctrl-C's handler back, as when started from a terminal, whoever started the tests.
AS_FROM_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
CLI_MAIN = "import sys; from vpn_dist.cli import main; sys.exit(main(sys.argv[1:]))"


def vpn_dist_process(*args: str, env: dict | None = None, script: str | None = None) -> subprocess.Popen:
    """`vpn-dist ARGS` (or a script ending in main(sys.argv[1:])) in a session of its own, output in pipes."""
    command = [sys.executable, "-c", AS_FROM_A_TERMINAL + (script or CLI_MAIN), *args]
    return subprocess.Popen(command, cwd=REPO, env=env or os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for proc; a process still running at the deadline is killed (with its session) and fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (a hang):\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended before {what}:\n{proc.stdout.read()[-2000:]}\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


# ---------------------------------------------------------------- real file systems: a small disk, a read-only mount

def _mount(*argv: str) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a test file system needs root (CI runs as root)")
    proc = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a test file system here: {proc.stderr.strip()}")


def _unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)  # never leave a mount behind


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at path."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _unmount(path)


@contextlib.contextmanager
def read_only(path: Path):
    """path, bind-mounted read-only over itself (chmod does not stop root)."""
    _mount("--bind", str(path), str(path))
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode:
            pytest.skip("cannot remount a bind mount read-only here")
        yield path
    finally:
        _unmount(path)


def fill(disk: Path) -> Path:
    """Fill the file system at disk to the last byte with one file; returns it (unlink it to make room)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


# ---------------------------------------------------------------- a full disk

def fill_before(write: str):
    """(object, attribute) whose second call (epoch 2's) finds the disk full."""
    from vpn_dist import run_dir
    from vpn_dist.observe import RunLog

    return {"checkpoint": (TrainState, "save"), "tensorboard": (RunLog, "epoch"),
            "metrics.json": (run_dir, "write_json_atomic")}[write]


@pytest.mark.parametrize("write", ["checkpoint", pytest.param("tensorboard", marks=pytest.mark.slow),
                                   pytest.param("metrics.json", marks=pytest.mark.slow)])
def test_a_disk_that_fills_during_training_stops_the_run_whole_and_resume_finishes_it(write, data, tmp_path,
                                                                                      monkeypatch, capsys):
    owner, name = fill_before(write)
    real = getattr(owner, name)
    with small_disk(tmp_path / "disk", "4m") as disk:
        run, calls, filled = disk / "run", [], []

        def at_epoch_2_the_disk_is_full(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                filled.append(fill(disk))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, at_epoch_2_the_disk_is_full)
        rc, _, err = run_main(train_argv(data, run, "--epochs", "2"), capsys)
        monkeypatch.undo()
        assert filled, "the fault fired"
        line = error_line(err, "train")
        assert rc == 1 and "no space left on device" in line and "free space" in line, line
        assert "checkpoints up to epoch 1 are whole" in line and f"`vpn-dist train --resume {run}`" in line, line
        assert not temporaries(run), temporaries(run)
        assert [p.name for p in RunDir(run).checkpoint_dirs()] == ["epoch_0001"]
        assert not (run / "checkpoints" / "epoch_0002").exists(), "no empty or partial epoch directory"
        TrainState.load(run / "checkpoints" / "epoch_0001")  # whole
        json.loads((run / "metrics.json").read_text())  # whole
        filled[0].unlink()  # make room, then the way on
        rc, _, err = run_main(["train", "--resume", str(run)], capsys)
        assert rc == 0, err
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["epochs_completed"] == 2 and metrics["resumed_from_epoch"] == 1


PREP_WITH_ROOM_CLAIMED = """
import sys
import data_prep.write as write
write.free_space = lambda path: 1 << 40  # past the up-front check: the disk fills while the files are written
from vpn_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""
BIG_SET = ["prep", "synthetic", "--train-size", "3000", "--test-size", "100", "--size", "32x32", "--workers", "2"]


def test_a_disk_that_fills_while_ffcv_writes_stops_prep_at_once_and_leaves_nothing(tmp_path):
    """FFCV's writer processes die of ENOSPC; their parent used to wait for them for ever."""
    with small_disk(tmp_path / "disk", "6m") as disk:
        out = disk / "out"
        before = shared_memory()
        rc, _, err = finish(vpn_dist_process(*BIG_SET, "--out", str(out), script=PREP_WITH_ROOM_CLAIMED), 300)
        assert "Traceback" not in err, err
        line = error_line(err, "prep")
        assert rc == 1 and "no space left on device" in line and str(out) in line, line
        assert not out.exists() or not [p for p in out.iterdir() if p.name != ".vpn-dist.lock"], list(out.iterdir())
        assert shared_memory() <= before, "the writer's shared memory was freed"


def test_prep_refuses_a_set_larger_than_the_free_space_before_writing(tmp_path, capsys):
    with small_disk(tmp_path / "disk", "3m") as disk:
        out = disk / "out"
        rc, _, err = run_main([*BIG_SET, "--out", str(out)], capsys)
        line = error_line(err, "prep")
        assert rc == 2 and "need about" in line and "free" in line and "choose another --out" in line, line
        assert not out.exists()


def test_a_full_disk_while_reproduce_writes_its_report_keeps_the_grid(data, tmp_path, capsys):
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "grid"
        out.mkdir()
        plan = {"tables": [1], "data": {"synthetic": str(data)}, "seeds": 1, "bases": ["sr"], "generators": ["dnn3"],
                "modes": None, "epochs": 1}
        (out / "reproduce.json").write_text(json.dumps(plan))
        before = snapshot(out)
        filler = fill(disk)
        rc, _, err = run_main(["reproduce", "--out", str(out), "--report-only"], capsys)
        line = error_line(err, "reproduce")
        assert rc == 1 and "no space left on device" in line, line
        assert not temporaries(out)
        assert {k: v for k, v in snapshot(out).items() if k != ".vpn-dist.lock"} == \
            {k: v for k, v in before.items() if k != ".vpn-dist.lock"}, "what was there stays whole"
        filler.unlink()
        rc, _, err = run_main(["reproduce", "--out", str(out), "--report-only"], capsys)
        assert rc == 0 and (out / "report.md").is_file(), err


# ---------------------------------------------------------------- read-only mounts

def test_a_finished_run_on_a_read_only_mount_evaluates_and_refuses_resume_in_one_line(finished_run, tmp_path,
                                                                                       capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with read_only(run):
        before = snapshot(run)
        rc, out, err = run_main(["eval", "--run", str(run)], capsys)
        assert rc == 0 and "test_acc_no_noise" in json.loads(out), err
        assert "eval.json was not written" in err and "the results are printed only" in err, err
        rc, _, err = run_main(["train", "--resume", str(run), "--epochs", "2"], capsys)
        line = error_line(err, "train")
        assert rc == 2 and "read-only file system" in line, line
        assert snapshot(run) == before


def test_training_reads_a_read_only_data_directory(data, tmp_path, capsys):
    ro = tmp_path / "data"
    shutil.copytree(data, ro)
    with read_only(ro):
        rc, _, err = run_main(train_argv(ro, tmp_path / "run"), capsys)
        assert rc == 0, err


def test_prep_into_a_read_only_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        rc, _, err = run_main(["prep", "synthetic", "--out", str(out), "--train-size", "20", "--test-size", "8"],
                              capsys)
        line = error_line(err, "prep")
        assert rc == 2 and "read-only file system" in line, line


# ---------------------------------------------------------------- one process per run directory

HOLD = """
import sys, time
from vpn_dist.lock import hold_directory
with hold_directory(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_directory_in_use_is_refused_and_a_killed_holder_leaves_no_lock(data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = vpn_dist_process(str(run), script=HOLD)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        rc, _, err = run_main(train_argv(data, run), capsys)
        line = error_line(err, "train")
        assert rc == 2 and f"is in use by process {holder.pid}" in line, line
        assert [p.name for p in run.iterdir()] == [".vpn-dist.lock"], "the refused run wrote nothing"
        holder.kill()  # SIGKILL: no cleanup of its own; the kernel drops its lock
        holder.wait()
        rc, _, err = run_main(train_argv(data, run), capsys)
        assert rc == 0, err
    finally:
        stop(holder)


@pytest.mark.slow
def test_two_trains_on_one_out_at_once_leave_one_whole_run(data, tmp_path):
    out = tmp_path / "run"
    procs = [vpn_dist_process(*train_argv(data, out, "--set", f"train.seed={seed}")) for seed in (1, 2)]
    try:
        results = [finish(proc, 600) for proc in procs]
    finally:
        for proc in procs:
            stop(proc)
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    refused = next(err for rc, _, err in results if rc == 2)
    line = error_line(refused, "train")
    assert "is in use by" in line or "already holds a run" in line, line
    seed = int(re.search(r"seed: (\d+)", (out / "config.yaml").read_text())[1])
    state = TrainState.load(RunDir(out).latest_checkpoint())
    assert state.config["train"]["seed"] == seed, "config.yaml and the checkpoint are the same run's"
    attempts = json.loads((out / "metrics.json").read_text())["attempts"]
    assert len(attempts) == 1, "metrics.json is that one run's, started once"


# ---------------------------------------------------------------- a refused --resume changes nothing

@pytest.mark.parametrize("override", ["model.base=dnn3", "train.amp=fp16"])
def test_a_resume_override_that_does_not_fit_the_checkpoint_changes_nothing(override, finished_run, tmp_path,
                                                                            capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    rc, _, err = run_main(["train", "--resume", str(run), "--epochs", "2", "--set", override], capsys)
    line = error_line(err, "train")
    assert rc == 2 and "does not fit" in line, line
    assert snapshot(run) == before, "config.yaml and every other file as they were"
    rc, _, err = run_main(["eval", "--run", str(run)], capsys)
    assert rc == 0, err
    rc, _, err = run_main(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------- devices and clusters

@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_request_on_a_machine_without_one_is_refused_at_once(data, tmp_path, capsys, no_cluster):
    cases = {
        "in process": train_argv(data, tmp_path / "a", "--gpu"),
        "on Ray": train_argv(data, tmp_path / "b", "--workers", "1", "--gpu"),
        "tune": ["tune", "--space", "smoke", "--data", str(data), "--out", str(tmp_path / "c"), "--gpu"],
        "reproduce": ["reproduce", "--table", "1", "--data", str(data), "--seeds", "1", "--bases", "sr",
                      "--generators", "dnn3", "--epochs", "1", "--gpus-per-trial", "0.5", "--out", str(tmp_path / "d")],
    }
    for case, argv in cases.items():
        rc, _, err = run_main(argv, capsys)
        line = error_line(err, argv[0])
        assert rc == 2 and "GPU" in line and ("no GPU" in line or "has 0 GPU" in line), (case, line)
        assert not (tmp_path / argv[argv.index("--out") + 1]).exists(), f"{case}: the refusal wrote nothing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("form", ["host:port", "ray://host:port", "http://host:port"])
def test_a_ray_address_that_names_no_cluster_is_refused_within_seconds(form, data, tmp_path, monkeypatch, capsys):
    from vpn_dist import launch

    address = form.replace("host:port", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(launch, "CLUSTER_WAIT_S", 1.0)
    for argv in (train_argv(data, tmp_path / "run", "--workers", "1"),
                 ["tune", "--space", "smoke", "--data", str(data), "--out", str(tmp_path / "sweep")]):
        start = time.monotonic()
        rc, _, err = run_main(argv, capsys)
        line = error_line(err, argv[0])
        assert rc == 2 and f"RAY_ADDRESS={address}" in line and "unset RAY_ADDRESS" in line, line
        assert time.monotonic() - start < 60, "refused within seconds, not after Ray's own minute-long retries"
        assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


# ---------------------------------------------------------------- data a command does not expect

@pytest.fixture(scope="module")
def one_left_over(tmp_path_factory) -> Path:
    """65 train images: with batches of 64 the last batch of each epoch holds one image."""
    out = tmp_path_factory.mktemp("one_left_over") / "data"
    assert main(["prep", "synthetic", "--out", str(out), "--train-size", "65", "--test-size", "16", "--size", "16x16",
                 "--seed", "0"]) == 0
    return out


def test_a_batchnorm_generator_trains_through_a_last_batch_of_one(one_left_over, tmp_path, capsys):
    argv = ["train", "--data", str(one_left_over), "--base", "sr", "--generator", "resnet18", "--mode", "joint",
            "--epochs", "1", "--out", str(tmp_path / "run"), *FAST]
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    rc, _, err = run_main([*argv[:-len(FAST)], "--out", str(tmp_path / "ones"), "--set", "train.batch_size=1"],
                          capsys)
    line = error_line(err, "train")
    assert rc == 2 and "BatchNorm" in line and "train.batch_size=2" in line, line
    assert not (tmp_path / "ones").exists()


def save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from data_prep.sources import read_imagefolder
    from vpn_dist.errors import UserError

    grey16 = lambda value: Image.fromarray(np.full((4, 4), value, np.uint16))  # noqa: E731 - mode I;16
    save(tmp_path / "src" / "train" / "a" / "0.png", grey16(32768))  # mid-grey
    save(tmp_path / "src" / "train" / "b" / "0.png", grey16(65535))
    save(tmp_path / "src" / "test" / "a" / "0.png", grey16(0))
    save(tmp_path / "src" / "test" / "b" / "0.tif", Image.fromarray(np.full((4, 4), 0.5, np.float32)))  # mode F
    got = read_imagefolder(tmp_path / "src", workers=1)
    first_pixels = lambda images: [int(images[i][0, 0, 0]) for i in range(len(images))]  # noqa: E731
    assert first_pixels(got.train_x) == [128, 255] and first_pixels(got.test_x) == [0, 128]
    save(tmp_path / "src" / "test" / "b" / "1.tif", Image.fromarray(np.full((4, 4), 100000, np.int32)))  # mode I
    with pytest.raises(UserError, match=r"1\.tif: 32-bit integer pixels"):
        read_imagefolder(tmp_path / "src", workers=1)


def test_reproduce_refuses_a_set_prepared_as_a_paper_data_set_that_is_not_it(tmp_path, capsys):
    data = tmp_path / "cifar10"
    assert main(["prep", "synthetic", "--out", str(data), "--classes", "3", "--size", "32x32", "--train-size", "30",
                 "--test-size", "9"]) == 0
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps(meta | {"source_kind": "cifar10"}))  # what `prep cifar10` writes
    rc, _, err = run_main(["reproduce", "--table", "1", "--data", str(data), "--seeds", "1",
                           "--out", str(tmp_path / "grid")], capsys)
    line = error_line(err, "reproduce")
    assert rc == 2 and "prepared as cifar10 but holds 3 classes" in line and "10 classes" in line, line
    assert not (tmp_path / "grid").exists()


# ---------------------------------------------------------------- Ctrl-C and SIGTERM

@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_run_stops_it_in_one_line_and_the_way_on_works(signum, data, tmp_path, capsys):
    run = tmp_path / "run"
    proc = vpn_dist_process(*train_argv(data, run, "--epochs", "100000"))  # still training when the signal comes
    try:
        wait_for(lambda: RunDir(run).latest_checkpoint() is not None, 600, proc, "a first checkpoint")
        proc.send_signal(signum)
        rc, _, err = finish(proc, 120)
    finally:
        stop(proc)
    assert "Traceback" not in err, err
    line = error_line(err, "train")
    assert rc == 128 + signum, (rc, err)
    assert ("interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGTERM)") in line, line
    assert f"`vpn-dist train --resume {run}`" in line, line
    assert not temporaries(run)
    done = RunDir(run).latest_state()[0].epoch
    rc, _, err = run_main(["train", "--resume", str(run), "--epochs", str(done + 1)], capsys)
    assert rc == 0, err


INTERRUPT_WHILE_WRITING = """
import os, signal, sys, time
import data_prep.write as write

real_write, real_sleep = write.write_beton, time.sleep
command_pid = os.getpid()

def write_beton(*args, **kwargs):  # the signal arrives while FFCV's writer processes run
    def sleep(seconds):
        if os.getpid() == command_pid:  # the command's own first wait (a forked writer inherits this function)
            time.sleep = real_sleep
            os.kill(command_pid, int(os.environ["SIGNAL"]))
        real_sleep(seconds)
    time.sleep = sleep
    return real_write(*args, **kwargs)

write.write_beton = write_beton
from vpn_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_while_prep_writes_leaves_no_partial_file(signum, tmp_path):
    out = tmp_path / "out"
    before = shared_memory()
    proc = vpn_dist_process(*BIG_SET, "--out", str(out), script=INTERRUPT_WHILE_WRITING,
                            env=os.environ | {"SIGNAL": str(int(signum))})
    rc, _, err = finish(proc, 300)
    assert "Traceback" not in err, err
    line = error_line(err, "prep")
    assert rc == 128 + signum and ("interrupted" in line or "terminated" in line), (rc, err)
    assert not temporaries(out) and not (out / "meta.json").exists()
    assert shared_memory() <= before


@pytest.mark.ray
@pytest.mark.slow  # a sweep, its fault and its resume: minutes on 2 cores
def test_a_disk_that_fills_during_a_sweep_stops_it_in_one_line_and_resume_finishes_it(data, tmp_path):
    """Tune writes its experiment state and trial files with plain writes: a full disk used to cut them short, end the
    sweep in Tune's traceback, and leave a state that no longer resumed."""
    with small_disk(tmp_path / "disk", "400m") as disk:  # (a trial keeps two checkpoints of 53 MB)
        out, log = disk / "sweep", tmp_path / "sweep.log"
        argv = ["tune", "--space", "smoke", "--data", str(data), "--out", str(out), "--samples", "1", "--epochs", "3"]
        with open(log, "w") as sink:  # (Ray's output can outgrow a pipe nobody reads while the test waits)
            proc = subprocess.Popen([sys.executable, "-m", "vpn_dist.cli", *argv], cwd=REPO, stdout=sink,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                wait_for(lambda: any(out.glob("trials/*/metrics.json")), 300, proc, "a trial's first epoch")
                filler = fill(disk)
                rc = proc.wait(timeout=300)
            finally:
                stop(proc)
        line = error_line(log.read_text(), "tune")
        assert rc == 1 and "no space left on device" in line, line
        assert f"`vpn-dist tune --space smoke --out {out} --resume`" in line, line
        assert not temporaries(disk), temporaries(disk)
        filler.unlink()  # make room, then the way on
        resumed = subprocess.run([sys.executable, "-m", "vpn_dist.cli", "tune", "--space", "smoke", "--out", str(out),
                                  "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        rows = (out / "results.csv").read_text().splitlines()[1:]
        assert len(rows) == 2 and not any(",error" in row for row in rows), rows
