"""The controls the reproduction's verdict needs: the isotropic-noise mode, and its grid row matched, seed by seed,
to the noise scale VPN learned."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vpn_dist.cli import main
from vpn_dist.reproduce.grid import Plan, check_plan, grid, run_config

FAST = ["--set", "train.batch_size=100", "--set", "data.num_workers=1"]


@pytest.mark.integration
def test_isotropic_mode_trains_with_the_given_scale_and_reports_no_alg2(synthetic_dir, tmp_path):
    out = tmp_path / "iso"
    assert main(["train", "--data", str(synthetic_dir), "--base", "dnn3", "--generator", "none", "--mode",
                 "isotropic", "--epochs", "1", "--out", str(out), "--set", "vpn.noise_std=0.05", *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_acc_alg2"] is None and 0 <= metrics["test_acc_no_noise"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["--mode", "isotropic", "--generator", "none"], "vpn.noise_std"),
    (["--mode", "isotropic", "--generator", "dnn3", "--set", "vpn.noise_std=0.1"], "trains no generator"),
    (["--mode", "joint", "--generator", "dnn3", "--set", "vpn.noise_std=0.1"], "null unless vpn.mode is isotropic"),
    (["--mode", "isotropic", "--generator", "none", "--set", "vpn.noise_std=-1"], "a number >= 0"),
])
def test_isotropic_settings_that_make_no_sense_are_refused(tmp_path, capsys, argv, message):
    assert main(["train", "--data", str(tmp_path), "--base", "dnn3", "--epochs", "1", "--out", str(tmp_path / "r"),
                 *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def write_reference_grid(root: Path, sigmas: dict[int, float]) -> Path:
    """A committed grid's runs.csv holding finished DNN3 joint runs with their learned mean sigma."""
    root.mkdir(parents=True)
    fields = ["table", "data", "base", "generator", "mode", "seed", "status", "sigma_mean"]
    with open(root / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for seed, sigma in sigmas.items():
            writer.writerow(dict(table=1, data="synthetic", base="dnn3", generator="dnn3", mode="joint", seed=seed,
                                 status="finished", sigma_mean=sigma))
            writer.writerow(dict(table=1, data="synthetic", base="sr", generator="dnn3", mode="joint", seed=seed,
                                 status="finished", sigma_mean=99.0))  # another base: never matched
    return root


def test_isotropic_grid_row_matches_each_seeds_learned_sigma(synthetic_dir, tmp_path):
    reference = write_reference_grid(tmp_path / "adam", {0: 0.0223, 1: 0.0157})
    plan = Plan(tables=[1], data={"synthetic": str(synthetic_dir)}, seeds=2, bases=["dnn3"], generators=["dnn3"],
                modes=["baseline", "isotropic"], sigma_from=str(reference))
    check_plan(plan)
    runs = grid(plan)
    assert sorted((r.mode, r.generator, r.seed) for r in runs) == [
        ("baseline", "none", 0), ("baseline", "none", 1), ("isotropic", "none", 0), ("isotropic", "none", 1)]
    scales = {r.seed: run_config(plan, r, tmp_path / "runs").vpn.noise_std for r in runs if r.mode == "isotropic"}
    assert scales == {0: 0.0223, 1: 0.0157}
    assert "--modes baseline,isotropic --sigma-from" in plan.command("OUT")


def test_isotropic_row_is_opt_in_and_old_plans_keep_their_fingerprint(synthetic_dir, tmp_path):
    plain = Plan(tables=[1], data={"synthetic": str(synthetic_dir)}, seeds=1, bases=["dnn3"], generators=["dnn3"])
    assert "isotropic" not in {r.mode for r in grid(plain)}  # the paper's rows only, unless --modes names it
    committed = json.loads((Path(__file__).parents[1] / "reproduction/fashion-mnist-adam/reproduce.json").read_text())
    with open(Path(__file__).parents[1] / "reproduction/fashion-mnist-adam/runs.csv", newline="") as f:
        assert Plan.from_dict(committed).fingerprint() == next(csv.DictReader(f))["plan"]


@pytest.mark.parametrize("sigmas, plan_extra, message", [
    ({0: 0.02}, {}, "no finished joint run of synthetic, dnn3 base, dnn3 generator, seed 1"),
    (None, {}, "give --sigma-from GRID_DIR"),
    ({0: 0.02, 1: 0.02}, {"generators": ["dnn3", "resnet18"]}, "matches one generator's sigma"),
])
def test_isotropic_grid_without_a_matching_reference_is_refused(synthetic_dir, tmp_path, sigmas, plan_extra,
                                                                 message):
    from vpn_dist.errors import UserError

    reference = str(write_reference_grid(tmp_path / "ref", sigmas)) if sigmas else None
    plan = Plan(tables=[1], data={"synthetic": str(synthetic_dir)}, seeds=2, bases=["dnn3"],
                modes=["baseline", "isotropic"], sigma_from=reference, **{"generators": ["dnn3"], **plan_extra})
    with pytest.raises(UserError, match=message):
        check_plan(plan)
