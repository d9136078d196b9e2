"""RunDir (every path of a run directory, and reading them back) and TrainState (what a checkpoint holds), without
training: states are made by hand."""
from __future__ import annotations

import pytest
import torch

from vpn_dist.checkpoint import STATE_FILE, TrainState
from vpn_dist.compat import RAY_CHECKPOINT_SNAPSHOT
from vpn_dist.config import RunConfig, from_dict, save_yaml
from vpn_dist.errors import UserError
from vpn_dist.models import build_models
from vpn_dist.run_dir import RunDir

META = {"shape": [1, 4, 4], "num_classes": 3, "splits": {"train": 8, "test": 4}}
# the keys every checkpoint has held on disk; committed runs and users' runs must keep loading
ON_DISK = {"epoch", "base", "generator", "optimizer", "scheduler", "scaler", "scaler_skipped", "history", "config",
           "gamma", "meta"}


def a_run(tmp_path, epochs=(1, 2)) -> tuple[RunDir, RunConfig]:
    """A run directory with config.yaml and a checkpoint per epoch; epoch e's base weights are all e."""
    run_dir = RunDir(tmp_path / "run")
    cfg = from_dict({"out": str(run_dir), "data.path": str(tmp_path / "data"), "model.base": "sr",
                     "model.generator": "dnn3"})
    run_dir.path.mkdir()
    save_yaml(cfg, run_dir.config)
    for epoch in epochs:
        base, generator = build_models(cfg, META, torch.device("cpu"))
        torch.nn.init.constant_(base[-1].weight, float(epoch))
        optimizer = torch.optim.Adam([*base.parameters(), *generator.parameters()])
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        TrainState.capture(epoch=epoch, base=base, generator=generator, optimizer=optimizer, scheduler=scheduler,
                           scaler=torch.amp.GradScaler("cpu", enabled=False), scaler_skipped=0,
                           history=[{"epoch": e} for e in range(1, epoch + 1)], cfg=cfg, meta=META
                           ).save(run_dir.checkpoint(epoch))
    return run_dir, cfg


def test_a_checkpoint_keeps_its_on_disk_keys_and_reads_back(tmp_path):
    run_dir, cfg = a_run(tmp_path, epochs=(1,))
    raw = torch.load(run_dir.checkpoint(1) / STATE_FILE, weights_only=False)
    assert set(raw) == ON_DISK
    assert raw["gamma"] == pytest.approx(0.01 / 3) and raw["config"] == cfg.to_dict()
    state = TrainState.load(run_dir.checkpoint(1))
    assert state.epoch == 1 and state.meta == META and torch.equal(state.base["1.weight"], raw["base"]["1.weight"])


def test_a_checkpoint_from_before_config_and_gamma_were_kept_still_loads(tmp_path):
    run_dir, _ = a_run(tmp_path, epochs=(1,))
    path = run_dir.checkpoint(1) / STATE_FILE
    raw = torch.load(path, weights_only=False)
    del raw["config"], raw["gamma"]
    torch.save(raw, path)
    state = TrainState.load(run_dir.checkpoint(1))
    assert state.config is None and state.gamma is None and state.epoch == 1


def test_a_dict_that_is_no_checkpoint_is_refused_naming_what_it_lacks(tmp_path):
    (tmp_path / "epoch_0001").mkdir()
    torch.save({"epoch": 1, "base": {}}, tmp_path / "epoch_0001" / STATE_FILE)
    with pytest.raises(UserError, match="not a vpn-dist checkpoint .*generator"):
        TrainState.load(tmp_path / "epoch_0001")


def test_the_newest_whole_checkpoint_is_read_back_and_a_cut_one_skipped(tmp_path, capsys):
    run_dir, _ = a_run(tmp_path, epochs=(1, 2, 3))
    newest = run_dir.checkpoint(3) / STATE_FILE
    newest.write_bytes(newest.read_bytes()[:100])
    assert [p.name for p in run_dir.checkpoint_dirs()] == ["epoch_0001", "epoch_0002", "epoch_0003"]
    assert run_dir.latest_checkpoint() == run_dir.checkpoint(3)  # complete: its file is there
    state, where = run_dir.latest_state()
    assert state.epoch == 2 and where == run_dir.checkpoint(2)
    told = capsys.readouterr().out
    assert f"skipping checkpoint {run_dir.checkpoint(3)}" in told and f"reading {run_dir.checkpoint(2)} instead" in told
    trained = run_dir.trained()
    assert trained.checkpoint == run_dir.checkpoint(2) and bool((trained.base[-1].weight == 2).all())
    assert trained.gamma == pytest.approx(0.01 / 3) and trained.generator is not None


def test_set_aside_moves_the_unreadable_ones_and_forgets_rays_snapshot(tmp_path):
    run_dir, _ = a_run(tmp_path, epochs=(1, 2))
    (run_dir.checkpoint(2) / STATE_FILE).write_bytes(b"cut")
    (run_dir.checkpoints / RAY_CHECKPOINT_SNAPSHOT).write_text("{}")
    run_dir.set_aside_unreadable()
    assert [p.name for p in run_dir.checkpoint_dirs()] == ["epoch_0001"]
    assert (run_dir.checkpoints / "unreadable-epoch_0002").is_dir()
    assert not (run_dir.checkpoints / RAY_CHECKPOINT_SNAPSHOT).exists()


def test_drop_unreadable_removes_them_only_when_none_reads_back(tmp_path):
    run_dir, _ = a_run(tmp_path, epochs=(1, 2))
    (run_dir.checkpoint(2) / STATE_FILE).write_bytes(b"cut")
    assert not run_dir.drop_unreadable() and len(run_dir.checkpoint_dirs()) == 2
    (run_dir.checkpoint(1) / STATE_FILE).write_bytes(b"cut")
    assert not run_dir.has_readable_checkpoint()
    assert run_dir.drop_unreadable() and run_dir.checkpoint_dirs() == []
    with pytest.raises(UserError, match="has no checkpoint"):
        run_dir.trained()


def test_prune_keeps_the_newest(tmp_path):
    run_dir, _ = a_run(tmp_path, epochs=(1, 2, 3))
    run_dir.prune_checkpoints(2)
    assert [p.name for p in run_dir.checkpoint_dirs()] == ["epoch_0002", "epoch_0003"]


def test_restore_refuses_a_checkpoint_of_other_models(tmp_path):
    run_dir, cfg = a_run(tmp_path, epochs=(1,))
    cfg.model.base = "dnn3"
    with pytest.raises(UserError, match="does not fit the run's models"):
        run_dir.trained(cfg)


def test_what_is_no_run_directory_is_told_apart(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RunDir(tmp_path / "missing").read_config()
    with pytest.raises(UserError, match=r"not a run directory \(no config.yaml\)"):
        RunDir(tmp_path).read_config()
    assert RunDir(tmp_path).read_metrics() is None and RunDir(tmp_path).read_attempts() == []


def test_metrics_and_attempts_read_back_what_was_written(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.write_metrics({"epochs_completed": 1})
    run_dir.record_attempt({"reason": "start"})
    run_dir.record_attempt({"reason": "resume"})
    assert run_dir.read_metrics() == {"epochs_completed": 1}
    assert [a["reason"] for a in run_dir.read_attempts()] == ["start", "resume"]
    assert run_dir.metrics.name == "metrics.json" and run_dir.lock.name == ".vpn-dist.lock"
