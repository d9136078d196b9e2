"""What a person sees: one line per epoch, progress within an epoch, and a clear stop when a worker cannot see
RUN_DIR or a node is lost."""
import io
import re
import sys

import pytest

from conftest import assert_console_once
from vpn_dist import observe
from vpn_dist.cli import main
from vpn_dist.errors import UserError
from vpn_dist import launch
from vpn_dist.launch import check_storage_marker, write_storage_marker
from vpn_dist.run_dir import RunDir

FAST = ["--set", "train.batch_size=100", "--set", "data.num_workers=1", "--set", "train.optimizer=adam",
        "--set", "train.lr_schedule=constant"]




def test_in_process_run_prints_each_epoch_once_with_plain_progress_off_a_terminal(synthetic_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.setattr(observe, "PLAIN_PROGRESS_EVERY_S", 0.0)  # a progress line every step
    assert main(["train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "dnn3", "--mode", "joint",
                 "--epochs", "2", "--out", str(tmp_path / "run"), *FAST]) == 0
    out = capsys.readouterr().out
    assert_console_once(out, 2)
    steps = 800 // 100  # 800 training images
    assert re.search(rf"^epoch   2 \| step {steps}/{steps} \| \d+ img/s$", out, flags=re.MULTILINE), out
    assert "\r" not in out, "no redrawn bar in a log"


def test_progress_is_a_tqdm_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    progress = observe.EpochProgress(epoch=3, steps=4, world_size=2)
    for _ in range(4):
        progress.update(100)
    bar = str(progress.bar)  # tqdm redraws at most every 0.1 s: read its last state directly
    progress.close()
    assert "\r" in screen.getvalue() and "epoch   3" in screen.getvalue()
    assert "4/4" in bar and "img/s" in bar, bar


def test_a_worker_that_cannot_see_the_drivers_marker_stops_naming_node_and_path(tmp_path):
    run_dir = RunDir(tmp_path)
    marker = re.escape(str(run_dir.storage_marker))
    with pytest.raises(UserError, match=rf"node .* does not see .*: {marker} is missing.*cluster/README.md"):
        check_storage_marker(run_dir, "call-1")
    write_storage_marker(run_dir, "call-0")  # a marker left by another call (same path, another disk's run)
    with pytest.raises(UserError, match="another run's marker"):
        check_storage_marker(run_dir, "call-1")
    write_storage_marker(run_dir, "call-1")
    check_storage_marker(run_dir, "call-1")


def _node(node_id: str, alive: bool, reason: int = 0, message: str = "") -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "10.0.3.7", "DeathReason": reason,
            "DeathReasonMessage": message}


def test_a_lost_node_is_named_once_ray_declares_it_dead(monkeypatch):
    """Workers see a lost peer before Ray's health checks declare its node dead: the error waits for that verdict
    and names the node by address and id; nodes dead before the run and nodes removed for being idle are not named."""
    import ray

    views = iter([[_node("old", False, 2), _node("idle", False, 4, "idle"), _node("lost", True)],  # still alive
                  [_node("old", False, 2), _node("idle", False, 4, "idle"),
                   _node("lost", False, 2, "health check failed due to missing too many heartbeats")]])
    monkeypatch.setattr(ray, "nodes", lambda: next(views))
    monkeypatch.setattr(launch.time, "sleep", lambda s: None)
    assert launch._lost_nodes({"old"}, wait_s=60) == (
        "node 10.0.3.7 (id lost) was lost: health check failed due to missing too many heartbeats; ")
    monkeypatch.setattr(ray, "nodes", lambda: [_node("lost", True)])
    assert launch._lost_nodes(set(), wait_s=0) == "", "no node lost: nothing named, no wait past wait_s"


def test_a_failure_from_our_own_checks_needs_no_node_verdict():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    def failed(*errors):
        return WorkerGroupError("", {rank: UserExceptionWithTraceback(e, "traceback") for rank, e in enumerate(errors)})

    assert launch._stopped_by_our_checks(failed(FloatingPointError("non-finite loss"), UserError("RUN_DIR")))
    assert not launch._stopped_by_our_checks(failed(FloatingPointError("x"), RuntimeError("Connection closed by peer")))
    assert not launch._stopped_by_our_checks(WorkerGroupError("", {}))


def test_the_resume_hint_needs_a_checkpoint_that_reads_back_whole(tmp_path, capsys):
    """A node lost while Ray Train copied a checkpoint into RUN_DIR leaves it cut short: no --resume suggested then
    (the same command starts the run again); once a whole one is there, it is."""
    import torch

    from vpn_dist.checkpoint import STATE_FILE, TrainState

    run_dir = RunDir(tmp_path)
    cut = run_dir.checkpoint(1)
    cut.mkdir(parents=True)
    (cut / STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    assert launch._resume_hint(run_dir) == ""
    assert "cannot be read" in capsys.readouterr().out  # said where the run stands
    TrainState(epoch=2, base=torch.nn.Linear(2, 2).state_dict(), generator=None, optimizer={}, scheduler={},
               scaler={}, scaler_skipped=0, history=[], meta={"shape": [3, 32, 32], "num_classes": 4}
               ).save(run_dir.checkpoint(2))
    assert launch._resume_hint(run_dir) == (
        f"\nits checkpoints are kept: continue with `vpn-dist train --resume {tmp_path}`")
