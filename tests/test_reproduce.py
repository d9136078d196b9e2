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
from pathlib import Path

import numpy as np
import pytest

from polling import poll_until
from vpn_dist.reproduce.grid import Plan, check_plan, grid, paper_numbers
from vpn_dist.reproduce.report import mean_std, metric_rows, summary, write_report
from vpn_dist.reproduce.stats import compare

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


def test_grid_shares_baselines_between_tables_one_and_two(tiny_synthetic_dir):
    plan = Plan(tables=[1, 2], data={"synthetic": str(tiny_synthetic_dir)}, seeds=2, bases=["sr", "dnn3"],
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
def test_bad_grids_fail_before_anything_starts(tiny_synthetic_dir, tmp_path, capsys, argv, message):
    from vpn_dist.cli import main

    out = tmp_path / "grid"
    argv = ["reproduce", "--data", str(tiny_synthetic_dir), "--out", str(out), *argv]
    if "--seeds" not in argv:
        argv += ["--seeds", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vpn-dist reproduce: error: ") and message in err
    assert not out.exists()


def test_resume_takes_the_starting_flags_again_and_refuses_different_ones(tiny_synthetic_dir, tmp_path):
    import argparse

    from vpn_dist.errors import UserError
    from vpn_dist.reproduce.command import _new_plan, _resumed_plan, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "grid"
    start = ["--table", "2", "--table", "1", "--data", str(tiny_synthetic_dir), "--seeds", "2", "--out", str(out),
             "--bases", "sr", "--generators", "dnn3", "--set", "train.epochs=1"]
    _new_plan(parser.parse_args(start), out)
    again = _resumed_plan(parser.parse_args([*start, "--resume", "--seeds", "3"]), out)
    assert again.tables == [1, 2] and again.seeds == 3 and again.overrides == ["train.epochs=1"]
    with pytest.raises(UserError, match="--bases, --set differ"):
        _resumed_plan(parser.parse_args([*start[:-4], "--bases", "dnn3", "--set", "train.epochs=2", "--resume"]), out)


def test_a_new_grid_has_its_report_before_any_run_ends(tiny_synthetic_dir, tmp_path, monkeypatch):
    from vpn_dist.cli import main
    from vpn_dist.reproduce import command

    out = tmp_path / "grid"
    seen = {}

    def no_runs(*args, **kwargs):  # the trials would start here: what is on disk already
        seen["report"] = (out / "report.md").read_text()
        seen["rows"] = {r["status"] for r in _runs_csv(out)}
        return []

    monkeypatch.setattr(command.driver, "run_trials", no_runs)
    main(["reproduce", "--table", "1", "--data", str(tiny_synthetic_dir), "--seeds", "2", "--out", str(out),
          "--bases", "sr", "--modes", "baseline", "--epochs", "1"])
    assert seen["rows"] == {"pending"} and seen["report"].startswith("# Reproduction")


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
    paired = compare(vpn, baseline)
    d = np.array([vpn[s] - baseline[s] for s in range(5)])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert paired.n == 5 and paired.mean == pytest.approx(d.mean())
    assert paired.p == pytest.approx(_t_two_sided_p(t, 4), rel=1e-4)
    assert (compare({0: 1.0}, {0: 0.5}).mean, compare({0: 1.0}, {0: 0.5}).p) == (0.5, None)
    # one seed has no spread to show; nothing measured (σ's AUROC without masks) is said, not printed as nan
    assert summary([0.5]) == "0.50 (1)" and summary([None, math.nan]) == "n/a" and summary([1.0, 2.0]) == "1.50 ± 0.71 (2)"


def _row(table, base, generator, mode, seed, alg2, plain, status="finished", **more):
    return {"table": table, "data": "fashion-mnist", "base": base, "generator": generator, "mode": mode, "seed": seed,
            "test_acc_alg2": alg2, "test_acc_no_noise": plain, "status": status,
            "run_id": f"fashion-mnist/{base}-{generator}-{mode}/seed{seed}", **more}


def test_aggregation_and_report_against_a_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    base_acc, vpn_alg2, vpn_plain = rng.uniform(0.7, 0.8, 4), rng.uniform(0.7, 0.8, 4), rng.uniform(0.7, 0.8, 4)
    rows = [_row(1, "sr", "none", "baseline", s, None, base_acc[s], wall_time_s=900, device="unknown")
            for s in range(4)]
    rows += [_row(1, "sr", "dnn3", "joint", s, vpn_alg2[s], vpn_plain[s], wall_time_s=1800, device="Test CPU",
                  train_images_per_sec=100 * (s + 1)) for s in range(4)]
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

    # Statistics: against the paper's own gain, 76.34 - 74.97 = +1.37; Holm over the 2 rows (Algorithm 2, no noise)
    from scipy import stats

    stats_line = next(ln for ln in report.splitlines() if ln.startswith("| 1 | fashion-mnist | sr | dnn3 |"))
    half_width = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    p_excl = stats.t.cdf((d.mean() - 1.37) / (d.std(ddof=1) / 2), 3)
    d_plain = 100 * (vpn_plain - base_acc)
    p_plain = _t_two_sided_p(d_plain.mean() / (d_plain.std(ddof=1) / 2), 3)
    p_excl_plain = stats.t.cdf((d_plain.mean() - 1.37) / (d_plain.std(ddof=1) / 2), 3)
    p_holm = min(1, 2 * _t_two_sided_p(t, 3)) if _t_two_sided_p(t, 3) < p_plain else \
        max(min(1, 2 * p_plain), _t_two_sided_p(t, 3))
    p_excl_holm = min(1, 2 * p_excl) if p_excl < p_excl_plain else max(min(1, 2 * p_excl_plain), p_excl)
    verdict = "excluded" if p_excl_holm < 0.05 else "reproduced" if p_holm < 0.05 and d.mean() > 0 else "inconclusive"
    assert stats_line == (
        f"| 1 | fashion-mnist | sr | dnn3 | {d.mean():+.2f} "
        f"[{d.mean() - half_width:+.2f}, {d.mean() + half_width:+.2f}] (4) | {_t_two_sided_p(t, 3):.3g} ({p_holm:.3g}) | +1.37 | {p_excl:.3g} ({p_excl_holm:.3g}) | "
        f"{compare(cells['dnn3'], cells['baseline']).mde:.2f} | {verdict} |")
    assert "over the 2 paired tests" in report and "over the 2 exclusion tests" in report
    # compute: each run once (8 runs: 4 x 900 s + 4 x 1800 s = 3 run-hours), images/s where recorded
    assert "3.0 run-hours" in report and "of the grid's 8 runs" in report
    assert "| fashion-mnist | sr | dnn3 | joint | 4 | 2.00 | 250 |" in report
    assert "| fashion-mnist | sr | none | baseline | 4 | 1.00 | not recorded |" in report
    assert "- device: Test CPU (4 runs), unknown (4 runs)" in report


def test_the_isotropic_control_pairs_each_seeds_vpn_run_with_noise_of_its_size(tmp_path):
    from vpn_dist.reproduce.report import RUN_COLUMNS, write_csv

    rng = np.random.default_rng(1)
    vpn_alg2, vpn_plain, isotropic = (rng.uniform(0.85, 0.9, 3) for _ in range(3))
    vpn_grid = tmp_path / "vpn"
    vpn_grid.mkdir()
    write_csv(vpn_grid / "runs.csv", [_row(1, "dnn3", "dnn3", "joint", s, vpn_alg2[s], vpn_plain[s]) for s in range(3)],
              RUN_COLUMNS)
    rows = [_row(1, "dnn3", "none", "baseline", s, None, 0.8) for s in range(3)]
    rows += [_row(1, "dnn3", "none", "isotropic", s, None, isotropic[s]) for s in range(3)]
    out = tmp_path / "control"
    write_report(out, Plan(tables=[1], data={}, seeds=3, modes=["baseline", "isotropic"], sigma_from=str(vpn_grid)),
                 rows, [])
    report = (out / "report.md").read_text()
    section = report.split("## The isotropic control")[1].split("## Compute")[0]
    for name, vpn in (("dnn3", vpn_alg2), ("dnn3 (no noise)", vpn_plain)):
        d = 100 * (vpn - isotropic)
        line = next(ln for ln in section.splitlines() if ln.startswith(f"| fashion-mnist | dnn3 | {name} |"))
        assert f"| {d.mean():+.2f} [" in line and f"(3) | {_t_two_sided_p(d.mean() / (d.std(ddof=1) / 3 ** 0.5), 2):.3g} |" \
            in line, line
    # A grid without the control has no such section
    write_report(tmp_path / "plain", Plan(tables=[1], data={}, seeds=3), rows[:3], [])
    assert "isotropic control" not in (tmp_path / "plain" / "report.md").read_text()


def test_figure2_shows_the_baseline_beside_joint_runs_and_the_full_test_point_apart(tmp_path):
    from vpn_dist.reproduce.report import _figure2_cells, write_figures

    rows = [_row(1, base, generator, mode, s, None if generator == "none" else 0.8, 0.8) for s in range(2)
            for base, generator, mode in (("sr", "none", "baseline"), ("sr", "dnn3", "joint"),
                                          ("sr", "none", "random"), ("dnn3", "none", "baseline"))]
    curves = [{"run_id": r["run_id"], "epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "test_acc_alg2": 0.7,
               "test_acc_no_noise": 0.7 + 0.01 * e, "eval_images": "all" if e == 3 else 500} for r in rows
              for e in (1, 2, 3)]
    cells = _figure2_cells(rows, curves)
    # the joint runs and their base's baseline; not random, not a baseline of a base without joint runs
    assert set(cells["fashion-mnist"]) == {("sr", "none", "baseline"), ("sr", "dnn3", "joint")}
    assert all(len(runs) == 2 for runs in cells["fashion-mnist"].values())
    written = write_figures(tmp_path, rows, curves, {})
    assert (tmp_path / "figure2_fashion-mnist.png") in written


def test_ids_of_hex_digits_read_back_as_text(tmp_path):
    """A config id or plan fingerprint that happens to be all digits (or digits around an e) is an id, not a number:
    read back as one, a finished trial's row would no longer match its config, and its trial would train again."""
    from vpn_dist.reproduce.report import read_csv, write_csv

    rows = [{"config_id": "5804269877", "plan": "0123e4567890", "seed": "7"}]
    write_csv(tmp_path / "rows.csv", rows, ("config_id", "plan", "seed"))
    assert read_csv(tmp_path / "rows.csv") == [{"config_id": "5804269877", "plan": "0123e4567890", "seed": 7}]


def test_the_committed_grids_keep_their_plan_fingerprints_and_name_no_machine_path():
    """Rows of another plan are never taken as finished: the fingerprint of every committed grid must not move."""
    from vpn_dist.reproduce.report import read_csv

    grids = sorted((REPO / "reproduction").glob("*/reproduce.json"))
    assert grids
    for saved in grids:
        plan = Plan.from_dict(json.loads(saved.read_text()))
        assert {row["plan"] for row in read_csv(saved.parent / "runs.csv")} == {plan.fingerprint()}, saved
        assert Plan.from_dict(plan.to_dict()).fingerprint() == plan.fingerprint()
        assert all(isinstance(entry, dict) for entry in json.loads(saved.read_text())["data"].values()), \
            f"{saved} names its data by a path of the machine that ran it"


def test_every_committed_report_recomputes_byte_for_byte_from_its_runs_csv(tmp_path, monkeypatch):
    """report.md of every committed grid is what its runs.csv and curves.csv give today: a change to the report code
    that moves a committed number, or a hand edit of a report, fails here."""
    from vpn_dist.reproduce.report import read_csv

    monkeypatch.chdir(REPO)  # a control's --sigma-from names its grid from the repository root
    for saved in sorted((REPO / "reproduction").glob("*/reproduce.json")):
        grid_dir = saved.parent
        out = tmp_path / grid_dir.name
        out.mkdir()
        write_report(out, Plan.from_dict(json.loads(saved.read_text())), read_csv(grid_dir / "runs.csv"),
                     read_csv(grid_dir / "curves.csv"))
        assert (out / "report.md").read_text() == (grid_dir / "report.md").read_text(), grid_dir


def _parser():
    import argparse

    from vpn_dist.reproduce.command import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_a_grid_resumes_on_another_machine_with_the_same_data_elsewhere(tiny_synthetic_dir, tmp_path):
    import shutil

    from vpn_dist.errors import UserError
    from vpn_dist.reproduce.command import _new_plan, _resumed_plan
    from vpn_dist.reproduce.grid import data_fingerprint

    out = tmp_path / "grid"
    start = ["--table", "1", "--data", str(tiny_synthetic_dir), "--seeds", "1", "--out", str(out), "--bases", "sr"]
    started = _new_plan(_parser().parse_args(start), out)
    saved = json.loads((out / "reproduce.json").read_text())
    assert saved["data"] == {"synthetic": {"meta_fingerprint": data_fingerprint(tiny_synthetic_dir)}}
    assert str(tiny_synthetic_dir) not in (out / "reproduce.json").read_text()
    assert _resumed_plan(_parser().parse_args(["--out", str(out), "--resume"]), out).data == {
        "synthetic": str(tiny_synthetic_dir)}  # this machine remembers where its data is

    # another machine: the committed files only, the same preparation somewhere else
    (out / "runs" / "data-paths.json").unlink()
    with pytest.raises(UserError, match=r"synthetic \(not known on this machine\); give --data DIR"):
        _resumed_plan(_parser().parse_args(["--out", str(out), "--resume"]), out)
    moved = tmp_path / "elsewhere" / "syn"
    shutil.copytree(tiny_synthetic_dir, moved)
    resumed = _resumed_plan(_parser().parse_args(["--out", str(out), "--resume", "--data", str(moved)]), out)
    assert resumed.data == {"synthetic": str(moved)} and resumed.fingerprint() == started.fingerprint()

    other = tmp_path / "other" / "syn"  # prepared differently (another validation seed): not the grid's data
    shutil.copytree(tiny_synthetic_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "val_seed": meta.get("val_seed", 0) + 1}))
    with pytest.raises(UserError, match="is not the grid's synthetic: its meta.json differs"):
        _resumed_plan(_parser().parse_args(["--out", str(out), "--resume", "--data", str(other)]), out)


def test_a_plan_saved_with_data_paths_still_loads_and_resumes(tiny_synthetic_dir, tmp_path):
    from vpn_dist.errors import UserError
    from vpn_dist.reproduce.command import _resumed_plan
    from vpn_dist.reproduce.grid import data_fingerprint

    out = tmp_path / "grid"
    out.mkdir()
    old = {"tables": [1], "data": {"synthetic": str(tiny_synthetic_dir)}, "seeds": 1, "bases": ["sr"],
           "generators": ["dnn3"], "modes": None, "epochs": None, "overrides": [], "gpus_per_trial": 0.0,
           "cpus_per_trial": 1}
    (out / "reproduce.json").write_text(json.dumps(old))
    plan = Plan.from_dict(old)
    before = plan.fingerprint()
    assert plan.data == {"synthetic": str(tiny_synthetic_dir)} and plan.data_fingerprints == {"synthetic": None}
    resumed = _resumed_plan(_parser().parse_args(["--out", str(out), "--resume"]), out)  # the saved path is a hint
    assert resumed.fingerprint() == before
    assert json.loads((out / "reproduce.json").read_text())["data"] == {
        "synthetic": {"meta_fingerprint": data_fingerprint(tiny_synthetic_dir)}}  # pinned from now on
    (out / "reproduce.json").write_text("{\"tables\": [1]}")
    with pytest.raises(UserError, match="is not a reproduction plan"):
        _resumed_plan(_parser().parse_args(["--out", str(out), "--resume"]), out)


def test_a_finished_run_trained_again_is_counted_once_and_old_rows_say_unknown(tmp_path):
    from vpn_dist.reproduce.command import Results
    from vpn_dist.reproduce.report import read_csv, run_rows

    plan = Plan(tables=[1], data={"synthetic": ""}, seeds=1, bases=["sr"], modes=["baseline", "joint"],
                generators=["dnn3"])
    runs = grid(plan)
    baseline, joint = (next(r for r in runs if r.mode == mode) for mode in ("baseline", "joint"))
    old_rows = {(r.run_id, 1): {**row, "test_acc_no_noise": 0.5}
                for r in (baseline, joint) for row in run_rows(r, None, "finished", plan.fingerprint())}
    attempts = [{"reason": "start"}, {"reason": "resume"}]
    for run in (baseline, joint):
        run_dir = tmp_path / "runs" / run.run_id
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps({
            "epochs_completed": 40, "epochs_planned": 40, "test_acc_no_noise": 0.6, "device": "Test CPU",
            "torch_version": "2.10", "precision": "fp32", "flush_denormal": "on", "attempts": attempts,
            "history": []}))
    state = Results(tmp_path, plan, runs, {k: v for k, v in old_rows.items() if k[0] == joint.run_id},
                    retraining={baseline.run_id})
    assert state.rows[(joint.run_id, 1)]["device"] == "unknown"  # finished before the column existed
    state.rows[(baseline.run_id, 1)] = {**old_rows[(baseline.run_id, 1)], "retrains": 0}
    for _ in range(2):  # its trial's end is reported twice (the callback, then the driver's loop)
        state.record(baseline, "TERMINATED", report=False)
    row = {r["run_id"]: r for r in read_csv(tmp_path / "runs.csv")}[baseline.run_id]
    assert (row["retrains"], row["resumes"], row["test_acc_no_noise"]) == (1, 1, 0.6)
    assert (row["device"], row["torch_version"], row["precision"], row["flush_denormal"]) == (
        "Test CPU", "2.10", "fp32", "on")  # a version is text, not the number 2.1


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
def test_tiny_grid_end_to_end_and_resume_after_a_kill_reruns_nothing_finished(tiny_synthetic_dir, tmp_path):
    out = tmp_path / "grid"
    argv = ["reproduce", "--table", "1", "--table", "2", "--data", str(tiny_synthetic_dir), "--seeds", "2", "--out", str(out),
            "--bases", "sr", "--generators", "dnn3", "--modes", "baseline,joint,generator-only", "--epochs", "1",
            "--max-concurrent", "2",
            "--set", "train.batch_size=100", "--set", "data.num_workers=1", "--set", "train.figure_every=100"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "vpn_dist.cli", *argv], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        finished_before = poll_until(lambda: sorted({r["run_id"] for r in _runs_csv(out) if r["status"] == "finished"})
                                     if (out / "runs.csv").is_file() else [], first)
    finally:  # the driver and its local Ray, at once; also when this test fails, so no grid outlives it
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert finished_before, (tmp_path / "first.log").read_text()[-3000:]

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

    from vpn_dist.run_dir import RunDir

    for seed in (0, 1):  # Table 2 trains the generator on the same seed's trained baseline, which stays fixed
        base_run = RunDir(out / "runs" / f"synthetic/sr-none-baseline/seed{seed}").latest_state()[0]
        gen_run = RunDir(out / "runs" / f"synthetic/sr-dnn3-generator-only/seed{seed}").latest_state()[0]
        assert gen_run.config["train"]["init_from"].endswith(f"sr-none-baseline/seed{seed}")
        assert all(torch.equal(gen_run.base[k], v) for k, v in base_run.base.items())
    report = (out / "report.md").read_text()
    assert "## Table 1" in report and "## Table 2" in report
    assert (out / "figures" / "figure2_synthetic.png").is_file()
    with open(out / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == len({r["run_id"] for r in rows})  # 1 epoch per run
