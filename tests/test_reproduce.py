"""`vpn-dist reproduce`: the paper's tables as data, the grid, the statistics, the report, and a tiny grid end to
end (kill, then --resume reruns nothing that finished)."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vpn_dist.reproduce.grid import Plan, check_plan, grid, paper_numbers
from vpn_dist.reproduce.report import mean_std, metric_rows, paired_test, summary, write_report

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO.parent / "shared" / "reference" / "vpn-paper.md"


# ---------------------------------------------------------------- the paper's tables are transcribed exactly


def _paper_markdown_tables() -> dict[tuple[int, str, str, str], float]:
    text = PAPER.read_text()
    rows = {"Baseline": "baseline", "Random": "random", "DNN3": "dnn3", "DNN3 (No Noise)": "dnn3 (no noise)",
            "ResNet18": "resnet18", "ResNet18 (No Noise)": "resnet18 (no noise)", "Res18": "resnet18",
            "Res18 (No Noise)": "resnet18 (no noise)"}
    columns = [(d, b) for d in ("fashion-mnist", "cifar10") for b in ("sr", "dnn3", "resnet18", "resnet34")]
    found = {}
    for number in (1, 2, 3):
        block = text.split(f"Table {number}:")[1].split("\n\n", 2)[1]
        for line in block.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] not in rows:
                continue
            cols = [("tiny-imagenet", b) for b in ("resnet18", "resnet34", "resnet50")] if number == 3 else columns
            for (data, base), value in zip(cols, cells[1:]):
                found[(number, data, base, rows[cells[0]])] = float(value)
    return found


def test_paper_tables_are_the_papers_numbers():
    if not PAPER.is_file():
        assert not os.environ.get("CI"), f"CI runs with ../shared beside the repo, but {PAPER} is missing"
        pytest.skip("the paper's markdown is not beside the repo")
    assert paper_numbers() == _paper_markdown_tables()
    assert len(paper_numbers()) == 48 + 24 + 18


# ---------------------------------------------------------------- the grid


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    from vpn_dist.cli import main

    out = tmp_path_factory.mktemp("reproduce_data") / "syn"
    assert main(["prep", "synthetic", "--out", str(out), "--train-size", "600", "--test-size", "200", "--val", "100",
                 "--classes", "4", "--size", "16x16", "--seed", "0"]) == 0
    return out


def test_grid_shares_baselines_between_tables_one_and_two(synthetic_dir):
    plan = Plan(tables=[1, 2], data={"synthetic": str(synthetic_dir)}, seeds=2, bases=["sr", "dnn3"],
                generators=["dnn3"])
    runs = grid(plan)
    cells = {(r.base, r.generator, r.mode) for r in runs}
    assert cells == {(b, g, m) for b in ("sr", "dnn3") for g, m in (("none", "baseline"), ("none", "random"),
                                                                     ("dnn3", "joint"), ("dnn3", "generator-only"))}
    assert len(runs) == len(cells) * 2 and len({r.run_id for r in runs}) == len(runs)
    tables = {(r.base, r.mode): r.tables for r in runs if r.seed == 0}
    assert tables[("sr", "baseline")] == (1, 2) and tables[("sr", "joint")] == (1,)
    assert tables[("dnn3", "generator-only")] == (2,)
    check_plan(plan)


@pytest.mark.parametrize("argv, message", [
    (["--table", "1", "--bases", "sr,vgg99"], "unknown base 'vgg99'"),
    (["--table", "2", "--modes", "random"], "Table 2 has no random rows"),
    (["--table", "1", "--seeds", "0"], "at least 1 seed"),
    (["--table", "1", "--generators", "unet"], "unknown generator 'unet'"),
    (["--table", "1", "--set", "train.lr=-1"], "train.lr"),
])
def test_bad_grids_fail_before_anything_starts(synthetic_dir, tmp_path, capsys, argv, message):
    from vpn_dist.cli import main

    out = tmp_path / "grid"
    argv = ["reproduce", "--data", str(synthetic_dir), "--out", str(out), *argv]
    if "--seeds" not in argv:
        argv += ["--seeds", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vpn-dist reproduce: error: ") and message in err
    assert not out.exists()


def test_resume_takes_the_starting_flags_again_and_refuses_different_ones(synthetic_dir, tmp_path):
    import argparse

    from vpn_dist.errors import UserError
    from vpn_dist.reproduce import _new_plan, _resumed_plan, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "grid"
    start = ["--table", "2", "--table", "1", "--data", str(synthetic_dir), "--seeds", "2", "--out", str(out),
             "--bases", "sr", "--generators", "dnn3", "--set", "train.epochs=1"]
    _new_plan(parser.parse_args(start), out)
    again = _resumed_plan(parser.parse_args([*start, "--resume", "--seeds", "3"]), out)
    assert again.tables == [1, 2] and again.seeds == 3 and again.overrides == ["train.epochs=1"]
    with pytest.raises(UserError, match="--bases, --set differ"):
        _resumed_plan(parser.parse_args([*start[:-4], "--bases", "dnn3", "--set", "train.epochs=2", "--resume"]), out)


def test_a_paper_data_set_outside_its_table_is_refused(tmp_path, capsys):
    from vpn_dist.cli import main

    data = tmp_path / "fm"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"source_kind": "fashion-mnist", "num_classes": 10,
                                                "shape": [1, 28, 28], "splits": {"train": 1, "test": 1}}))
    assert main(["reproduce", "--table", "3", "--data", str(data), "--seeds", "1", "--out", str(tmp_path / "o")]) == 2
    assert "Table 3 does not show" in capsys.readouterr().err


# ---------------------------------------------------------------- statistics, against a direct computation


def _t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom, by integrating its density numerically."""
    x = np.linspace(abs(t), abs(t) + 400, 2_000_001)
    density = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x**2 / df) ** (
        -(df + 1) / 2)
    return float(2 * np.trapezoid(density, x))


def test_paired_test_equals_the_t_statistic_computed_directly():
    vpn = {0: 81.9, 1: 82.4, 2: 81.1, 3: 82.8, 4: 81.7, 7: 99.0}  # seed 7 has no baseline: not paired
    baseline = {0: 81.5, 1: 81.6, 2: 81.3, 3: 81.9, 4: 81.2}
    delta, p, n = paired_test(vpn, baseline)
    d = np.array([vpn[s] - baseline[s] for s in range(5)])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert n == 5 and delta == pytest.approx(d.mean())
    assert p == pytest.approx(_t_two_sided_p(t, 4), rel=1e-4)
    assert paired_test({0: 1.0}, {0: 0.5}) == (0.5, None, 1)
    # one seed has no spread to show; nothing measured (σ's AUROC without masks) is said, not printed as nan
    assert summary([0.5]) == "0.50 (1)" and summary([None, math.nan]) == "n/a" and summary([1.0, 2.0]) == "1.50 ± 0.71 (2)"


def _row(table, base, generator, mode, seed, alg2, plain, status="finished"):
    return {"table": table, "data": "fashion-mnist", "base": base, "generator": generator, "mode": mode, "seed": seed,
            "test_acc_alg2": alg2, "test_acc_no_noise": plain, "status": status,
            "run_id": f"fashion-mnist/{base}-{generator}-{mode}/seed{seed}"}


def test_aggregation_and_report_against_a_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    base_acc, vpn_alg2, vpn_plain = rng.uniform(0.7, 0.8, 4), rng.uniform(0.7, 0.8, 4), rng.uniform(0.7, 0.8, 4)
    rows = [_row(1, "sr", "none", "baseline", s, None, base_acc[s]) for s in range(4)]
    rows += [_row(1, "sr", "dnn3", "joint", s, vpn_alg2[s], vpn_plain[s]) for s in range(4)]
    rows += [_row(1, "sr", "dnn3", "joint", 4, 0.99, 0.99, status="failed")]  # never counted
    cells = {name: values for _key, name, values in metric_rows(rows)}
    assert set(cells) == {"baseline", "dnn3", "dnn3 (no noise)"}
    assert cells["dnn3"] == pytest.approx({s: 100 * vpn_alg2[s] for s in range(4)})
    mean, std, n = mean_std(list(cells["dnn3"].values()))
    assert (mean, std, n) == (pytest.approx(100 * vpn_alg2.mean()), pytest.approx(100 * vpn_alg2.std(ddof=1)), 4)

    write_report(tmp_path, Plan(tables=[1], data={}, seeds=4), rows, [])
    report = (tmp_path / "report.md").read_text()
    line = next(ln for ln in report.splitlines() if re.match(r"\| fashion-mnist \| sr \| dnn3 \|", ln))
    d = 100 * (vpn_alg2 - base_acc)
    assert f"{100 * vpn_alg2.mean():.2f} ± {100 * vpn_alg2.std(ddof=1):.2f} (4)" in line
    assert f"| 76.34 | {100 * vpn_alg2.mean() - 76.34:+.2f} | {d.mean():+.2f} (4) |" in line
    t = d.mean() / (d.std(ddof=1) / 2)
    assert line.rstrip(" |").endswith(f"{_t_two_sided_p(t, 3):.3g}")
    assert (tmp_path / "figures" / "table1_fashion-mnist.png").stat().st_size > 0


def test_demo_prints_what_the_committed_grids_found(tmp_path, capsys):
    from vpn_dist.demo import print_reproduction
    from vpn_dist.reproduce.report import RUN_COLUMNS, write_csv

    base_acc, vpn_alg2 = np.array([0.80, 0.82, 0.81]), np.array([0.81, 0.85, 0.80])
    rows = [_row(1, "sr", "none", "baseline", s, None, base_acc[s]) for s in range(3)]
    rows += [_row(1, "sr", "dnn3", "joint", s, vpn_alg2[s], base_acc[s]) for s in range(3)]
    (tmp_path / "grid-a").mkdir()
    write_csv(tmp_path / "grid-a" / "runs.csv", rows, RUN_COLUMNS)
    print_reproduction(tmp_path)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "| dnn3  " in ln)
    d = 100 * (vpn_alg2 - base_acc)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert line.startswith("| grid-a") and f"{d.mean():+6.2f} | {_t_two_sided_p(t, 2):>7.2g} | 3 |" in line


# ---------------------------------------------------------------- end to end on Ray


def _vpn(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "vpn_dist.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _runs_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "runs.csv") as f:
        return list(csv.DictReader(f))


def test_grid_order_starts_a_generator_only_run_as_soon_as_its_baseline_finishes_and_never_after_a_failure():
    from ray.tune.search import Searcher

    from vpn_dist.sweep.driver import _in_order

    # seed 0: baseline a, joint b, generator-only c (waits for a); seed 1: baseline d, generator-only e (waits for d)
    search = _in_order(tuple({"run_id": name} for name in "abcde"), (set(), set(), {0}, set(), {3}))

    def suggest(trial_id):  # the run a new trial starts, or None (wait) or FINISHED
        params = search.suggest(trial_id)
        return params["run_id"] if isinstance(params, dict) else params

    assert [suggest("t1"), suggest("t2")] == ["a", "b"]  # two free slots
    assert suggest("t3") == "d"  # c waits for a, so the next seed's baseline takes the slot
    search.on_trial_complete("t1")  # a finished: c, before anything later in the order
    assert suggest("t4") == "c"
    search.on_trial_complete("t3", error=True)  # d failed: e never starts ...
    assert suggest("t5") is None  # ... but b and c are still running
    search.on_trial_complete("t2")
    search.on_trial_complete("t4")
    assert suggest("t6") == Searcher.FINISHED


@pytest.mark.ray
def test_tiny_grid_end_to_end_and_resume_after_a_kill_reruns_nothing_finished(synthetic_dir, tmp_path):
    out = tmp_path / "grid"
    argv = ["reproduce", "--table", "1", "--table", "2", "--data", str(synthetic_dir), "--seeds", "2", "--out", str(out),
            "--bases", "sr", "--generators", "dnn3", "--modes", "baseline,joint,generator-only", "--epochs", "1",
            "--max-concurrent", "2",
            "--set", "train.batch_size=100", "--set", "data.num_workers=1", "--set", "train.figure_every=100"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "vpn_dist.cli", *argv], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    finished_before: list[str] = []
    while time.time() < deadline and first.poll() is None:
        if (out / "runs.csv").is_file():
            finished_before = sorted({r["run_id"] for r in _runs_csv(out) if r["status"] == "finished"})
            if finished_before:
                break
        time.sleep(0.5)
    assert finished_before, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its local Ray, at once
    first.wait()

    resumed = _vpn("reproduce", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = _runs_csv(out)
    # one row per cell x seed: Table 1 baseline, dnn3 joint; Table 2 baseline, dnn3 generator-only
    assert len(rows) == (2 + 2) * 2 and {r["status"] for r in rows} == {"finished"}
    assert {(r["table"], r["mode"]) for r in rows} == {("1", "baseline"), ("1", "joint"), ("2", "baseline"),
                                                       ("2", "generator-only")}
    for run_id in finished_before:  # started once, never again
        attempts = (out / "runs" / run_id / "attempts.jsonl").read_text().splitlines()
        assert len(attempts) == 1 and json.loads(attempts[0])["reason"] == "start", run_id
    for r in rows:
        assert r["epochs"] == "1" and 0 <= float(r["test_acc_no_noise"]) <= 1
        assert (r["test_acc_alg2"] != "") == (r["generator"] != "none")
    import torch

    from vpn_dist import checkpoint as ckpt

    for seed in (0, 1):  # Table 2 trains the generator on the same seed's trained baseline, which stays fixed
        base_run = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "runs" / f"synthetic/sr-none-baseline/seed{seed}"))
        gen_run = ckpt.load_checkpoint(ckpt.latest_checkpoint(
            out / "runs" / f"synthetic/sr-dnn3-generator-only/seed{seed}"))
        assert gen_run["config"]["train"]["init_from"].endswith(f"sr-none-baseline/seed{seed}")
        assert all(torch.equal(gen_run["base"][k], v) for k, v in base_run["base"].items())
    report = (out / "report.md").read_text()
    assert "## Table 1" in report and "## Table 2" in report
    assert (out / "figures" / "figure2_synthetic.png").is_file()
    with open(out / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == len({r["run_id"] for r in rows})  # 1 epoch per run
