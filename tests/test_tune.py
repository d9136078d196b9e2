"""`vpn-dist tune` end to end on a tiny synthetic set: smoke sweep, best config retrains, Ctrl-C + --resume,
a trial that fails at run time, and spaces that are refused before any trial starts.

Sweeps run as subprocesses (each starts and stops its own local Ray on 127.0.0.1), so nothing outlives a test.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from polling import poll_until

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


def vpn(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vpn_dist.cli", *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def vpn_here(capsys, *argv: str) -> tuple[int, str]:
    """The CLI in this process, for commands that stop before starting Ray: (exit code, stderr)."""
    from vpn_dist.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tune_data") / "syn"
    result = vpn("prep", "synthetic", "--out", str(out), "--train-size", "1300", "--test-size", "300",
                 "--val", "300", "--classes", "4", "--size", "16x16", "--seed", "0")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(autouse=True, scope="module")
def no_ray_left():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def write_space(path: Path, body: str) -> Path:
    path.write_text("from ray import tune\n\n" + textwrap.dedent(body))
    return path


def test_smoke_sweep_end_to_end_and_best_config_trains(data_dir, tmp_path):
    out = tmp_path / "sweep"
    result = vpn("tune", "--space", "smoke", "--data", str(data_dir), "--out", str(out), "--samples", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = _rows(out)
    assert len(rows) == 2 and {r["arch"] for r in rows} == {"dnn3-dnn3", "sr-dnn3"}
    for row in rows:
        assert row["status"] in ("completed", "early-stopped"), row
        assert row["stop_reason"].startswith(("completed", "early-stopped (ASHA)")), row
        for key in ("val_acc", "val_acc_alg2", "val_acc_no_noise", "test_acc_alg2", "test_acc_no_noise"):
            assert 0.0 <= float(row[key]) <= 1.0, (key, row)
        for key in ("vpn.m", "train.lr", "vpn.bound_C", "gamma", "epochs_run"):
            assert row[key] != "", (key, row)
        run_dir = out / "trials" / row["trial_id"]
        assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
        assert (run_dir / "tb" / "hparams").is_dir(), "every trial shows up in TensorBoard's HParams view"
        attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
        assert all(a["world_size"] == 1 and a["master_addr"] is None for a in attempts), \
            "a one-worker trial trains in its trial's process: no Ray Train worker group, no process group"
    md = (out / "results.md").read_text()
    assert "Best trial per data set x architecture" in md and "tensorboard --logdir" in md

    best = sorted((out / "best").glob("*.yaml"))
    assert [p.name for p in best] == ["syn__dnn3-dnn3.yaml", "syn__sr-dnn3.yaml"]
    assert not (out / "best_config.yaml").exists(), "two groups: no single top-level best config"
    cfg = yaml.safe_load(best[1].read_text())
    chosen = max((r for r in rows if r["arch"] == "sr-dnn3"), key=lambda r: float(r["val_acc"]))
    assert cfg["model"] == {"base": "sr", "generator": "dnn3", "generator_init_std": None}
    assert cfg["train"]["lr"] == pytest.approx(float(chosen["train.lr"]))
    assert Path(cfg["data"]["path"]) == data_dir.resolve()

    # The best config trains as it is, here on one Ray Train worker: the numbers its trial had (in the trial's own
    # process) come again, epoch by epoch, so runs of the two ways compare like with like.
    again = vpn("train", "--config", str(best[1]), "--out", str(tmp_path / "retrain"), "--workers", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    in_trial, on_worker = _numbers(out / "trials" / chosen["trial_id"]), _numbers(tmp_path / "retrain")
    assert len(on_worker) == 2 and 1 <= len(in_trial) and in_trial == on_worker[:len(in_trial)]


def _numbers(run_dir: Path) -> list[dict]:
    """Each epoch's metrics but its timings."""
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    return [{k: v for k, v in epoch.items() if not k.endswith(("_s", "_per_sec"))} for epoch in history]


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM],
                         ids=["ctrl-c", "sigterm"])
def test_interrupted_sweep_resumes_and_records_a_failing_trial(data_dir, tmp_path, signum):
    # inception_v3 is a valid torchvision classifier (so the space passes its checks) that cannot take
    # 16x16 images: its trial fails at run time, is recorded with its error, and the others go on.
    space = write_space(tmp_path / "space.py", """
        SPACE = {
            "axes": {"arch": tune.grid_search([("sr", "dnn3"), ("inception_v3", "dnn3"), ("dnn3", "dnn3")])},
            "fixed": {"train.epochs": 1, "train.batch_size": 200, "data.num_workers": 1},
            "grace_period": 1,
        }
    """)
    out = tmp_path / "sweep"
    argv = ["tune", "--space", str(space), "--data", str(data_dir), "--out", str(out), "--max-concurrent", "2"]
    driver = subprocess.Popen([sys.executable, "-m", "vpn_dist.cli", *argv], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        finished_first = _wait_for_finished_trial(out, driver)
        driver.send_signal(signum)  # Tune saves its state and stops the running trials
        log, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 130, log[-4000:]
    last = log.rstrip().splitlines()[-1]  # the command's own closing line (the errored trial's traceback is above)
    assert last.startswith("the sweep stopped with") and last.endswith("the same command and --resume"), log[-4000:]

    resumed = vpn("tune", "--space", str(space), "--data", str(data_dir), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = {r["arch"]: r for r in _rows(out)}
    assert set(rows) == {"sr-dnn3", "inception_v3-dnn3", "dnn3-dnn3"}
    assert rows["sr-dnn3"]["status"] == rows["dnn3-dnn3"]["status"] == "completed"
    failed = rows["inception_v3-dnn3"]
    assert failed["status"] == "error" and "inception_v3" in failed["stop_reason"], failed
    assert "does not accept" in failed["stop_reason"], failed

    # the trial that had finished before Ctrl-C was not trained again
    attempts = (out / "trials" / finished_first / "attempts.jsonl").read_text().splitlines()
    assert len(attempts) == 1 and json.loads(attempts[0])["reason"] == "start", attempts
    assert (out / "best_config.yaml").exists() is False  # two groups finished (sr, dnn3)
    assert len(list((out / "best").glob("*.yaml"))) == 2


def test_sigterm_during_the_trials_asks_tune_to_stop_and_a_second_one_stops_at_once():
    from vpn_dist.sweep.driver import sigterm_stops_like_ctrl_c

    heard = []
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))
    signal.signal(signal.SIGUSR1, lambda signum, frame: heard.append("tune's graceful stop"))
    signal.signal(signal.SIGTERM, lambda signum, frame: heard.append("the command's own stop"))
    try:
        with sigterm_stops_like_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            assert heard == ["tune's graceful stop"]
            os.kill(os.getpid(), signal.SIGTERM)
            assert heard == ["tune's graceful stop", "the command's own stop"]
        os.kill(os.getpid(), signal.SIGTERM)  # after the trials: the command's handler again
        assert heard[-1] == "the command's own stop" and len(heard) == 3
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGUSR1, before[1])


def _wait_for_finished_trial(out: Path, driver: subprocess.Popen) -> str:
    """The id of the first trial that Tune's saved experiment state records as terminated (its run finished), while
    the driver still runs."""
    terminated = poll_until(lambda: _terminated_on_disk(out / "tune"), driver)
    assert terminated and driver.poll() is None, driver.stdout.read()[-4000:]
    return terminated[0]


def _terminated_on_disk(state_dir: Path) -> list[str]:
    """The trials Tune's experiment state (which it saves every few seconds) holds as TERMINATED."""
    found = []
    for state in state_dir.glob("experiment_state-*.json"):
        try:
            trials = [json.loads(trial) for trial, _ in json.loads(state.read_text())["trial_data"]]
        except (OSError, ValueError, KeyError):  # being rewritten
            continue
        found += [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]
    return sorted(found)


@pytest.mark.parametrize("body,message", [
    ('SPACE = {"axes": {"vpn.gama": tune.choice([1.0])}}', "unknown config key 'vpn.gama'"),
    ('SPACE = {"axes": {"vpn.m": tune.choice([1, 0])}}', "vpn.m"),
    ('SPACE = {"axes": {"vpn.bound_C": tune.choice([("none", None), ("norm", -1.0)])}}', "vpn.C"),
    ('SPACE = {"axes": {"arch": tune.grid_search([("dnn3", "dnn3"), ("nosuchnet", "dnn3")])}}', "model.base"),
    ('SPACE = {"axes": {}, "metric": "test_acc"}', "validation metric"),
])
def test_bad_space_fails_before_any_trial(data_dir, tmp_path, capsys, body, message):
    space = write_space(tmp_path / "bad.py", body)
    out = tmp_path / "sweep"
    code, err = vpn_here(capsys, "tune", "--space", str(space), "--data", str(data_dir), "--out", str(out))
    assert code == 2 and message in err, err
    assert not (out / "trials").exists() and not (out / "tune").exists()


def test_data_without_val_split_and_unknown_space_are_refused(tmp_path, capsys):
    no_val = tmp_path / "noval"
    code, err = vpn_here(capsys, "prep", "synthetic", "--out", str(no_val), "--train-size", "200", "--test-size", "100",
                         "--classes", "2", "--size", "16x16")
    assert code == 0, err
    out = str(tmp_path / "o")
    code, err = vpn_here(capsys, "tune", "--space", "smoke", "--data", str(no_val), "--out", out)
    assert code == 2 and "--val N" in err, err
    code, err = vpn_here(capsys, "tune", "--space", "nosuch", "--data", str(no_val), "--out", out)
    assert code == 2 and "smoke" in err, err
    code, err = vpn_here(capsys, "tune", "--space", "smoke", "--data", str(no_val), "--out", out, "--resume")
    assert code == 2 and "no sweep to resume" in err, err
    assert not Path(out).exists()


def test_named_spaces_resolve_on_their_own_data(data_dir, tmp_path):
    """paper and multi are checked like any sweep (every choice, a few lr draws) without running a trial."""
    import argparse

    from vpn_dist import tune as tune_mod
    from vpn_dist.sweep.space import SweepSettings, check_space, dataset_table, load_space, resolve_trial

    for name in ("smoke", "paper", "multi"):
        space = load_space(name)
        settings = SweepSettings(space=name, out=str(tmp_path), fixed=space.fixed,
                                 datasets=dataset_table([str(data_dir)], space.data))
        assert check_space(space, settings, tmp_path) > 0
        cfg = resolve_trial({"data": "syn", "arch": ("dnn3", "dnn3"), "vpn.gamma_scale": 10.0},
                            settings, str(tmp_path / "t"))
        assert cfg.vpn.gamma == pytest.approx(10 * 0.01 / 4)  # gamma relative to K = 4 classes
    parser = argparse.ArgumentParser()
    tune_mod.add_arguments(parser)
    args = parser.parse_args(["--space", "paper", "--data", "a", "--data", "b", "--out", "o", "--gpu"])
    assert args.data == ["a", "b"] and args.workers_per_trial == 1
