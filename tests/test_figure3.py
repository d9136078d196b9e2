"""reproduction/figure3-m/draw.py: Figure 3's statistics from grids' runs.csv and curves.csv."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("figure3", REPO / "reproduction" / "figure3-m" / "draw.py")
figure3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figure3)

RUN_COLUMNS = ["table", "data", "base", "generator", "mode", "seed", "run_id", "status", "test_acc_alg2",
               "test_acc_no_noise", "wall_time_s", "train_images_per_sec"]
CURVE_COLUMNS = ["run_id", "epoch", "train_loss", "test_acc_alg2", "eval_images"]


def write_grid(folder: Path, m: int, final: list[float], early: list[float], baseline: list[float] | None = None):
    """A finished grid: the DNN3 joint run of each seed with `final` % test accuracy and a per-epoch subset curve
    flat at `early` % for 12 epochs (then a whole-split point), and optionally the seeds' baselines."""
    folder.mkdir()
    overrides = ["train.optimizer=adam"] + ([f"vpn.m={m}"] if m != 1 else [])
    (folder / "reproduce.json").write_text(json.dumps({"overrides": overrides}))
    runs, curves = [], []
    for seed, (acc, early_acc) in enumerate(zip(final, early)):
        run_id = f"fashion-mnist/dnn3-dnn3-joint/seed{seed}"
        runs.append(["1", "fashion-mnist", "dnn3", "dnn3", "joint", seed, run_id, "finished", acc / 100, acc / 100,
                     600, 4000])
        curves += [[run_id, e, 0.5, early_acc / 100, 500] for e in range(1, 13)] + [[run_id, 13, 0.4, 0.9, "all"]]
    for seed, acc in enumerate(baseline or []):
        run_id = f"fashion-mnist/dnn3-none-baseline/seed{seed}"
        runs.append(["1", "fashion-mnist", "dnn3", "none", "baseline", seed, run_id, "finished", "", acc / 100, 300,
                     9000])
    for name, columns, rows in (("runs.csv", RUN_COLUMNS, runs), ("curves.csv", CURVE_COLUMNS, curves)):
        with open(folder / name, "w", newline="") as f:
            csv.writer(f).writerows([columns] + rows)


def test_the_effect_of_m_is_judged_against_m1_on_the_same_seeds(tmp_path):
    write_grid(tmp_path / "m1", 1, final=[88.0, 88.5, 89.0], early=[80.0, 81.0, 82.0], baseline=[87.0, 88.0, 88.0])
    write_grid(tmp_path / "m2", 2, final=[88.0, 88.6, 88.9], early=[85.0, 86.1, 86.9])  # the same; converges sooner
    write_grid(tmp_path / "m8", 8, final=[86.0, 86.4, 87.1], early=[80.1, 80.9, 82.0])  # about 2 points lower
    folders = {1: tmp_path / "m1", 2: tmp_path / "m2", 8: tmp_path / "m8"}
    grids = {m: figure3.load(m, folder) for m, folder in folders.items()}
    assert figure3.paper_gain() == pytest.approx(81.79 - 81.57)  # the paper's Table 1, Fashion-MNIST DNN3

    # m = 2 minus m = 1 per seed: 0, +0.1, -0.1: mean 0, sd 0.1; TOST against ±0.22 on 2 degrees of freedom:
    # t = 0.22 / (0.1 / √3) = 3.8105, one-sided p = 0.03124 both ways
    p = figure3.equivalence_p(figure3.final_accuracy(grids[2]), figure3.final_accuracy(grids[1]), 0.22)
    assert p == pytest.approx(0.03124, abs=5e-5)
    # the per-epoch curve reads the subset's points only: the last epoch's whole-split point is another measurement
    assert sorted(figure3.subset_curve(grids[2]["curves"][0])) == list(range(1, 13))
    assert figure3.early_accuracy(grids[2]) == pytest.approx({0: 85.0, 1: 86.1, 2: 86.9})  # epochs 1-10

    text = figure3.report(grids, folders)
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if line.startswith("| 2 | +")
            or line.startswith("| 8 | -")}
    assert rows["| 2"][1] == "+0.00 [-0.25, +0.25] (3)"
    # Holm over 2 equivalence tests: m = 8's p is ~1, so m = 2's 0.0312 doubles past 0.05: not shown equivalent
    assert rows["| 2"][5] == "inconclusive" and rows["| 2"][8] == "faster |"
    assert rows["| 8"][1].startswith("-2.00") and rows["| 8"][5] == "different"
    assert rows["| 8"][8] == "no difference detected |"
    # sd 0.1 against ±0.22: (t(.95, 3) + t(.90, 3))·0.1/√4 = (2.353 + 1.638)·0.05 = 0.200 <= 0.22, and 3 seeds give
    # (2.920 + 1.886)·0.1/√3 = 0.277: 4 seeds
    assert rows["| 2"][4] == rows["| 8"][4] == "4"
    # every m against the m = 1 grid's baselines: m = 1 minus baseline per seed 1.0, 0.5, 1.0
    m1_row = "| 1 | `m1` | 3 | 88.50 ± 0.50 (3) | 88.50 ± 0.50 (3) | +0.83 [+0.12, +1.55] (3) | 10.0 min | 4,000 |"
    assert m1_row in text

    figure3.draw(grids, tmp_path / "figure3.png")
    assert (tmp_path / "figure3.png").stat().st_size > 10_000


def test_the_seeds_an_equivalence_test_needs_by_hand():
    # sd equal to the margin: 10 seeds give (t(.95, 9) + t(.90, 9))/√10 = (1.833 + 1.383)/3.162 = 1.017 > 1,
    # 11 give (1.812 + 1.372)/3.317 = 0.960
    assert figure3.seeds_for_equivalence(0.22, 0.22) == 11
    assert figure3.seeds_for_equivalence(0.44, 0.22) > figure3.seeds_for_equivalence(0.22, 0.22)  # ~4x as many
    assert figure3.seeds_for_equivalence(0.0, 0.22) is None  # no spread: nothing to size


def test_a_grid_given_as_the_wrong_m_is_refused_naming_it(tmp_path):
    write_grid(tmp_path / "m4", 4, final=[88.0, 88.5], early=[80.0, 81.0])
    with pytest.raises(SystemExit, match="m4 trained with m = 4, not the m = 2"):
        figure3.load(2, tmp_path / "m4")


def test_seeds_that_all_differ_by_the_same_nonzero_amount_are_not_called_faster(tmp_path):
    # the subset accuracy moves in steps of 1/500: two seeds can each gain exactly 0.1 points by coincidence, which
    # is no spread to test against, not p = 0
    write_grid(tmp_path / "m1", 1, final=[88.0, 88.5], early=[83.6, 83.3], baseline=[87.0, 88.0])
    write_grid(tmp_path / "m2", 2, final=[88.1, 88.6], early=[83.7, 83.4])
    folders = {1: tmp_path / "m1", 2: tmp_path / "m2"}
    grids = {m: figure3.load(m, folder) for m, folder in folders.items()}
    assert figure3.equivalence_p(figure3.final_accuracy(grids[2]), figure3.final_accuracy(grids[1]), 0.22) is None
    row = next(line for line in figure3.report(grids, folders).splitlines() if line.startswith("| 2 | +"))
    assert row == "| 2 | +0.10 (2) | - | - | - | inconclusive | +0.10 (2) | - | - |"
