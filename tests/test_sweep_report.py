"""vpn_dist.sweep.report on fabricated trials (plain objects with trial_id, config, last_result, status): no Ray.

Selection reads only the validation metric, results files are written whole (under a temporary name, then
renamed), and each trial's status comes from Tune's status plus the epochs it ran against the epochs planned.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vpn_dist.sweep import report


def trial(trial_id, status, epoch=None, arch=("dnn3", "dnn3"), data="syn", **metrics):
    last = {"epoch": epoch, **metrics} if epoch is not None else {}
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=last,
                           config={"data": data, "arch": arch, "vpn.m": 2, "vpn.bound_C": ("norm", 10.0)})


def run_dir(out: Path, trial_id: str, epochs: int, base="dnn3", generator="dnn3") -> Path:
    path = out / "trials" / trial_id
    path.mkdir(parents=True)
    cfg = {"out": str(path), "model": {"base": base, "generator": generator}, "vpn": {"gamma": 0.0025},
           "train": {"epochs": epochs, "fault": None}, "data": {"path": "/data/syn"}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def row(trial_id, status, val_acc, test_acc, data="syn", arch="dnn3-dnn3"):
    return {"trial_id": trial_id, "data": data, "arch": arch, "status": status, "val_acc": val_acc,
            "test_acc_alg2": test_acc, "test_acc_no_noise": test_acc}


def test_status_of_completed_early_stopped_error_and_pending_trials(tmp_path):
    for trial_id in ("done", "asha", "bad"):
        run_dir(tmp_path, trial_id, epochs=4)
    (tmp_path / "trials" / "bad" / "error.txt").write_text(
        "Traceback (most recent call last):\n  File x\nray.exceptions.RayTaskError: wrapped\n"
        "vpn_dist.errors.UserError: model inception_v3 does not accept 16x16 images\n")
    trials = [trial("done", "TERMINATED", epoch=4, val_acc=0.8),
              trial("asha", "TERMINATED", epoch=1, val_acc=0.5),
              SimpleNamespace(**vars(trial("bad", "ERROR", epoch=1)), path=str(tmp_path / "trials" / "bad")),
              trial("wait", "PENDING")]
    rows = {r["trial_id"]: r for r in report.collect_rows(trials, tmp_path, max_epochs=4)}

    assert rows["done"]["status"] == "completed" and rows["done"]["stop_reason"] == "completed"
    assert rows["asha"]["status"] == "early-stopped"
    assert rows["asha"]["stop_reason"] == "early-stopped (ASHA) at epoch 1"
    assert rows["bad"]["status"] == "error"
    assert rows["bad"]["stop_reason"] == "error: vpn_dist.errors.UserError: model inception_v3 does not accept 16x16 images"
    assert rows["wait"]["status"] == "pending" and rows["wait"]["stop_reason"] == "pending (sweep interrupted)"
    assert rows["wait"]["epochs_planned"] == 4  # no config.yaml yet: the sweep's max epochs
    assert rows["done"]["arch"] == "dnn3-dnn3" and rows["done"]["vpn.bound_C"] == '["norm", 10.0]'
    assert rows["done"]["gamma"] == 0.0025 and rows["done"]["val_acc"] == 0.8


def test_error_without_error_file_uses_the_error_message(tmp_path):
    failed = SimpleNamespace(**vars(trial("t", "ERROR")), error_msg="Traceback\nValueError: bad shape\n")
    (only,) = report.collect_rows([failed], tmp_path, max_epochs=2)
    assert only["stop_reason"] == "error: ValueError: bad shape"


def test_metrics_come_from_metrics_json_when_the_last_report_lacks_them(tmp_path):
    path = run_dir(tmp_path, "t", epochs=2)
    (path / "metrics.json").write_text('{"epochs_completed": 2, "val_acc": 0.7, "test_acc_alg2": 0.6}')
    (only,) = report.collect_rows([trial("t", "TERMINATED")], tmp_path, max_epochs=2)
    assert only["status"] == "completed" and only["epochs_run"] == 2
    assert only["val_acc"] == 0.7 and only["test_acc_alg2"] == 0.6


def test_best_rows_picks_highest_val_metric_per_group_never_test():
    rows = [row("a", "completed", val_acc=0.70, test_acc=0.99),  # best test, worse val: not chosen
            row("b", "completed", val_acc=0.80, test_acc=0.10),
            row("c", "early-stopped", val_acc=0.95, test_acc=0.95),  # stopped early: completed ones go first
            row("d", "error", val_acc=0.99, test_acc=0.99),
            row("e", "pending", val_acc=None, test_acc=None),
            row("f", "early-stopped", val_acc=0.40, test_acc=0.9, arch="sr-dnn3"),  # a group with none completed
            row("g", "completed", val_acc=0.50, test_acc=0.5, data="other")]
    best = report.best_rows(rows, "val_acc")
    assert {k: r["trial_id"] for k, r in best.items()} == {
        ("syn", "dnn3-dnn3"): "b", ("syn", "sr-dnn3"): "f", ("other", "dnn3-dnn3"): "g"}


def test_write_results_writes_each_file_atomically_with_every_row(tmp_path, monkeypatch):
    run_dir(tmp_path, "t1", epochs=2)
    run_dir(tmp_path, "t2", epochs=2)
    rows = report.collect_rows([trial("t1", "TERMINATED", epoch=2, val_acc=0.6, test_acc_alg2=0.9),
                                trial("t2", "TERMINATED", epoch=2, val_acc=0.7, test_acc_alg2=0.1)],
                               tmp_path, max_epochs=2)
    written = []
    real = report.write_text_atomic
    monkeypatch.setattr(report, "write_text_atomic", lambda path, text: (written.append(path.name), real(path, text)))
    report.write_results(rows, tmp_path, space="smoke", metric="val_acc")

    assert {"results.csv", "results.md", "syn__dnn3-dnn3.yaml", "best_config.yaml"} <= set(written)
    assert not list(tmp_path.rglob("*.tmp"))
    with open(tmp_path / "results.csv") as f:
        saved = list(csv.DictReader(f))
    assert [(r["trial_id"], r["status"], float(r["val_acc"])) for r in saved] == [
        ("t1", "completed", 0.6), ("t2", "completed", 0.7)]
    md = (tmp_path / "results.md").read_text()
    assert "# Sweep `smoke`" in md and "| syn | dnn3-dnn3 | t2 | 0.7 |" in md
    assert md.count("| t1 |") == 1 and md.count("| t2 |") == 2  # all trials; t2 also as the best
    best = yaml.safe_load((tmp_path / "best_config.yaml").read_text())
    assert best["out"] == str(tmp_path / "best_runs" / "syn__dnn3-dnn3")


def test_several_groups_drop_a_stale_single_best_config(tmp_path):
    (tmp_path / "best_config.yaml").write_text("stale")
    for trial_id, arch in (("t1", ("dnn3", "dnn3")), ("t2", ("sr", "dnn3"))):
        run_dir(tmp_path, trial_id, epochs=1, base=arch[0])
    rows = report.collect_rows([trial("t1", "TERMINATED", epoch=1, val_acc=0.5),
                                trial("t2", "TERMINATED", epoch=1, val_acc=0.5, arch=("sr", "dnn3"))],
                               tmp_path, max_epochs=1)
    report.write_results(rows, tmp_path, space="s", metric="val_acc")
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["syn__dnn3-dnn3.yaml", "syn__sr-dnn3.yaml"]
    assert not (tmp_path / "best_config.yaml").exists()


@pytest.mark.integration
def test_report_does_not_import_ray():
    code = "import sys, vpn_dist.sweep.report; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("text,expected", [
    ("Traceback\n  x\nKeyError: 'a'\n", "KeyError: 'a'"),
    ("no exception line here", "no exception line here"),
])
def test_short_error(text, expected):
    assert report._short_error(SimpleNamespace(error_msg=text)) == expected
