"""`vpn-dist study`: the expected-best estimator, the spec's seeded draws, the report from hand-made CSV files, resuming
from a partial trials.csv (with Ray Tune replaced by a stand-in that trains nothing), ASHA's replayed rungs, the
generator's init scale, and (slow) a tiny study end to end with a kill and --resume.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from polling import poll_until
from vpn_dist.cli import main
from vpn_dist.reproduce.report import read_csv
from vpn_dist.study import report as study_report
from vpn_dist.study.report import doubling_gains, expected_best, expected_best_band
from vpn_dist.study.spec import draw_params, load_study

REPO = Path(__file__).resolve().parents[1]


def write_spec(path: Path, trials: int = 3, baseline_lr: str = "tune.loguniform(1e-3, 1e-2)", extra: str = "") -> Path:
    """A small study: sgd/adam and lr in both arms, m and the bound in the VPN arm, 3 epochs, ASHA from epoch 1."""
    path.write_text(textwrap.dedent(f"""
        from ray import tune

        STUDY = {{
            "description": "a test study",
            "trials": {trials},
            "rerun_seeds": [100, 101, 102],
            "grace_period": 1,
            "reduction_factor": 2,
            "fixed": {{"model.base": "sr", "train.epochs": 3, "train.batch_size": 100, "train.amp": "off",
                       "train.epoch_eval_images": 0, "data.num_workers": 1{extra}}},
            "arms": {{
                "baseline": {{"fixed": {{"model.generator": "none", "vpn.mode": "baseline"}},
                              "axes": {{"optimizer": tune.choice(["sgd", "adam"]), "train.lr": {baseline_lr}}}}},
                "vpn": {{"fixed": {{"model.generator": "dnn3", "vpn.mode": "joint"}},
                         "axes": {{"optimizer": tune.choice(["sgd", "adam"]), "train.lr": tune.loguniform(1e-3, 1e-2),
                                   "vpn.m": tune.choice([1, 2]),
                                   "vpn.bound_C": tune.choice([("none", None),
                                                               ("norm", tune.loguniform(1.0, 10.0))])}}}},
            }},
        }}
    """))
    return path


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the estimator


def test_expected_best_matches_a_hand_computed_case_and_brute_force():
    # N = 3 values; n = 2: weights 1/9, 3/9, 5/9 (of the 9 ordered pairs, 1 has max 0.1, 3 have 0.2, 5 have 0.3)
    curve = expected_best([0.3, 0.1, 0.2])
    assert curve == pytest.approx([0.2, 2.2 / 9, 7.2 / 27])

    values = [0.61, 0.75, 0.75, 0.42, 0.9]  # unsorted, with a tie: every n-tuple drawn with replacement
    for n in range(1, 5):
        brute = np.mean([max(draw) for draw in itertools.product(values, repeat=n)])
        assert expected_best(values)[n - 1] == pytest.approx(brute)
    assert len(expected_best(values, n_max=12)) == 12 and expected_best(values, 12)[-1] < 0.9


def test_doubling_gains_and_the_more_trials_advice():
    curve = expected_best([0.3, 0.1, 0.2])  # [0.2, 2.2/9, 7.2/27], as above
    assert doubling_gains(curve, 3) == pytest.approx([7.2 / 27 - 0.2])  # 1 -> 3: integer halves
    four = expected_best([0.80, 0.86, 0.88, 0.89])
    assert doubling_gains(four, 4) == pytest.approx([four[3] - four[1], four[1] - four[0]])

    curves = {"baseline": expected_best([0.90] * 4), "vpn": four}  # VPN behind by 100 * (0.90 - four[3]) points
    gap, last = 100 * (four[3] - 0.90), 100 * (four[3] - four[1])
    assert last < -gap  # so the ranking holds
    (text, _) = study_report._more_trials_lines(curves, claimed=0.5, budget=4)
    assert f"raised the expected best by +0.00 points (baseline) and {last:+.2f} (VPN)" in text
    assert f"after +0.00 and {100 * (four[1] - four[0]):+.2f} over the doubling before it" in text
    assert f"{-gap:.2f} points apart at 4 trials, more than the trailing VPN arm's last doubling" in text
    assert f"puts VPN − baseline at {gap + last:+.2f} points on validation, short of the paper's +0.50" in text
    assert text.endswith("More trials would not change the answer.")
    (text, _) = study_report._more_trials_lines(curves, claimed=gap + last - 0.01, budget=4)
    assert text.endswith("Whether VPN reaches the paper's gain needs more trials (`--resume --trials 8`).")
    (text, _) = study_report._more_trials_lines(curves, claimed=0.5, budget=40)
    assert "has not reached its 40 trials per arm yet" in text and "paper" not in text
    swapped = study_report._more_trials_lines({"baseline": four, "vpn": curves["baseline"]}, None, 4)[0]
    assert "more than the trailing baseline arm's" in swapped and "paper" not in swapped
    close = {"baseline": expected_best([0.89] * 4), "vpn": four}  # within the VPN arm's last doubling
    (text, _) = study_report._more_trials_lines(close, None, 4)
    assert "the ranking on validation could change" in text
    assert text.endswith("Whether the ranking holds needs more trials (`--resume --trials 8`).")


def test_bootstrap_band_is_ordered_bounded_and_reproducible():
    rng = np.random.default_rng(3)
    values = list(rng.uniform(0.5, 0.9, size=25))
    low, high = expected_best_band(values, resamples=300)
    curve = expected_best(values)
    assert np.all(low <= high) and np.all(np.diff(low) >= 0) and np.all(np.diff(high) >= 0)
    assert min(values) <= low[0] and high[-1] <= max(values)
    assert low[0] < curve[0] < high[0]  # the mean of 25 uniforms: well inside its bootstrap interval
    assert np.array_equal(low, expected_best_band(values, resamples=300)[0])
    same = expected_best_band([0.7] * 6, resamples=50)
    assert np.allclose(same[0], 0.7) and np.allclose(same[1], 0.7)


# ---------------------------------------------------------------- the spec


def test_trial_parameters_are_seeded_per_axis_and_shared_between_arms():
    study = load_study("study_fashion_mnist_dnn3")
    draws = [draw_params(study, "vpn", i) for i in range(400)]
    assert draws[:5] == [draw_params(study, "vpn", i) for i in range(5)]  # the same in every session
    for i in range(20):  # trial i of both arms: the same optimizer, lr and weight decay
        baseline = draw_params(study, "baseline", i)
        assert baseline == {k: draws[i][k] for k in baseline}
    assert len({d["train.lr"] for d in draws}) == 400 and all(1e-4 <= d["train.lr"] <= 1e-1 for d in draws)
    zero_gamma = sum(d["vpn.gamma_scale"] == 0 for d in draws) / len(draws)
    assert 0.17 < zero_gamma < 0.33  # gamma = 0 in a quarter of the trials
    assert {d["vpn.m"] for d in draws} == {1, 2, 4, 8}
    assert {d["vpn.bound_C"][0] for d in draws} == {"none", "elementwise", "norm"}
    assert all((kind == "none") == (c is None) for kind, c in (d["vpn.bound_C"] for d in draws))
    inits = [d["model.generator_init_std"] for d in draws]
    assert None in inits and "pytorch" in inits and any(isinstance(v, float) and 2e-3 <= v <= 2e-2 for v in inits)
    assert {d["train.weight_decay"] for d in draws} >= {0.0, 5e-4}


def test_the_three_study_specs_resolve_to_valid_configs(tiny_synthetic_dir):
    from vpn_dist.study.spec import check_shared, trial_config
    from vpn_dist.sweep.space import dataset_table

    datasets = dataset_table([str(tiny_synthetic_dir)], None)
    for name in ("study_fashion_mnist_dnn3", "study_fashion_mnist_sr", "study_cifar10_dnn3"):
        study = load_study(name)
        assert study.trials >= 40 and len(study.rerun_seeds) == 5
        configs = {(arm, i): trial_config(study, arm, draw_params(study, arm, i), seed=i, run_dir=Path("/x"),
                                          datasets=datasets) for arm in ("baseline", "vpn") for i in range(40)}
        check_shared(configs)
        sgd = next(c for c in configs.values() if c.train.optimizer == "sgd")
        adam = next(c for c in configs.values() if c.train.optimizer == "adam")
        assert (sgd.train.momentum, sgd.train.lr_schedule, adam.train.lr_schedule) == (0.9, "cosine", "constant")
        assert {c.train.amp for c in configs.values()} == {"off"} and configs[("vpn", 3)].train.seed == 3
        assert {c.vpn.mode for (arm, _), c in configs.items() if arm == "vpn"} == {"joint"}


@pytest.mark.parametrize("extra_argv,spec_edit,message", [
    ([], lambda s: s.replace('"rerun_seeds": [100, 101, 102]', '"rerun_seeds": [1, 100]'),
     "rerun seed(s) [1] are also search trials' seeds"),
    ([], lambda s: s.replace('"vpn.mode": "joint"}', '"vpn.mode": "joint", "train.batch_size": 50}'),
     "the arms must train alike: train.batch_size differs"),
    ([], lambda s: s.replace('"train.lr": tune.loguniform(1e-3, 1e-2)}', '"train.lr": tune.grid_search([1e-3])}'),
     "a study draws every axis at random"),
    ([], lambda s: s.replace('"trials": 3,', '"trials": 3, "data": "cifar10",'), "is synthetic; study"),
    (["--trials", "0"], lambda s: s, "--trials must be at least 1"),
])
def test_bad_studies_stop_before_anything_runs(tiny_synthetic_dir, tmp_path, capsys, monkeypatch, extra_argv, spec_edit,
                                               message):
    import vpn_dist.study as study_cli

    monkeypatch.setattr(study_cli.driver, "run_trials", FakeTune(stop_after=0))  # never reached
    spec = write_spec(tmp_path / "spec.py")
    spec.write_text(spec_edit(spec.read_text()))
    out = tmp_path / "out"
    code = main(["study", "--spec", str(spec), "--data", str(tiny_synthetic_dir), "--out", str(out), *extra_argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vpn-dist study: error: ") and message in err and err.count("\n") == 1, err
    assert not (out / "study.json").exists()


def test_unknown_spec_missing_study_and_a_second_start_are_refused(tiny_synthetic_dir, tmp_path, capsys):
    assert main(["study", "--spec", "study_nope", "--data", str(tiny_synthetic_dir), "--out", str(tmp_path / "a")]) == 2
    assert "unknown study spec 'study_nope'; specs are study_cifar10_dnn3" in capsys.readouterr().err
    assert main(["study", "--out", str(tmp_path / "a"), "--resume"]) == 2
    assert "holds no study (no study.json)" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "study.json").write_text("{}")
    assert main(["study", "--spec", "study_smoke", "--data", str(tiny_synthetic_dir), "--out", str(tmp_path / "b")]) == 2
    assert "already holds a study; continue it with --resume" in capsys.readouterr().err


# ---------------------------------------------------------------- the generator's init scale


def test_generator_init_std_sets_the_dnn3_generators_start_and_is_validated():
    from vpn_dist.config import apply_overrides, from_dict, validate
    from vpn_dist.errors import UserError
    from vpn_dist.models import build_generator

    torch.manual_seed(0)
    shape = (1, 28, 28)
    weights = lambda gen: [m for m in gen.net if isinstance(m, torch.nn.Linear)]
    authors, wider, default = (build_generator("dnn3", shape, init) for init in (None, 0.01, "pytorch"))
    for layer in weights(authors):
        assert layer.weight.std().item() == pytest.approx(0.002, rel=0.02) and not layer.bias.any()
    for layer in weights(wider):
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.02) and not layer.bias.any()
    for layer in weights(default):  # PyTorch's own: uniform in +-1/sqrt(fan_in), biases too
        bound = 1 / layer.in_features ** 0.5
        assert layer.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.02) and layer.bias.abs().max() > 0

    cfg = from_dict({"out": "/x", "data.path": "/d"})
    assert cfg.model.generator_init_std is None
    assert apply_overrides(cfg, ["model.generator_init_std=pytorch"]).model.generator_init_std == "pytorch"
    assert apply_overrides(cfg, ["model.generator_init_std=0.005"]).model.generator_init_std == 0.005
    for bad in (["model.generator_init_std=banana"], ["model.generator_init_std=-1"],
                ["model.generator=resnet18", "model.generator_init_std=0.01"]):
        with pytest.raises(UserError, match="model.generator_init_std"):
            validate(apply_overrides(from_dict({"out": "/x", "data.path": "/d"}), bad))


def test_the_run_builds_its_generator_with_the_configured_init(tiny_synthetic_dir):
    from vpn_dist.config import from_dict
    from vpn_dist.data import read_meta
    from vpn_dist.models import build_models

    meta = read_meta(tiny_synthetic_dir)
    for init, std in ((None, 0.002), (0.02, 0.02)):
        cfg = from_dict({"out": "/x", "data.path": str(tiny_synthetic_dir), "model.generator_init_std": init})
        _, generator = build_models(cfg, meta, torch.device("cpu"))
        assert generator.net[1].weight.std().item() == pytest.approx(std, rel=0.05)


# ---------------------------------------------------------------- the report from hand-made files


def _hand_made_study(out: Path, spec: Path, data: Path) -> None:
    from vpn_dist.reproduce.report import write_csv
    from vpn_dist.study.spec import Plan

    out.mkdir()
    plan = Plan(spec=str(spec), data=str(data), data_label="synthetic", num_classes=4, base="sr", epochs=3, trials=4)
    (out / "study.json").write_text(json.dumps(plan.to_dict()))
    common = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0005, "seed": 0, "params": "{}", "config_id": "x"}
    vpn = {"gamma": 0.0025, "m": 2, "bound": "norm", "C": 3.0, "generator_init_std": "authors"}
    rows = [  # baseline: the early-stopped trial's 0.95 must not win; vpn: a diverged trial counts at chance (0.25)
        {"arm": "baseline", "trial": 0, "status": "completed", "epochs": 3, "val_acc": 0.80, "wall_time_s": 3600},
        {"arm": "baseline", "trial": 1, "status": "early-stopped", "epochs": 1, "val_acc": 0.95, "wall_time_s": 1200},
        {"arm": "baseline", "trial": 2, "status": "completed", "epochs": 3, "val_acc": 0.85, "wall_time_s": 3600},
        {"arm": "baseline", "trial": 3, "status": "error", "epochs": None, "val_acc": None, "error": "OSError: disk"},
        {"arm": "vpn", "trial": 0, "status": "completed", "epochs": 3, "val_acc": 0.82, "wall_time_s": 7200, **vpn},
        {"arm": "vpn", "trial": 1, "status": "diverged", "epochs": 1, "val_acc": 0.60, "wall_time_s": 600, **vpn},
        {"arm": "vpn", "trial": 2, "status": "completed", "epochs": 3, "val_acc": 0.83, "wall_time_s": 7200,
         **vpn | {"bound": "none", "C": None, "gamma": 0.0}},
        {"arm": "vpn", "trial": 3, "status": "early-stopped", "epochs": 1, "val_acc": 0.70, "wall_time_s": 600, **vpn},
    ]
    write_csv(out / "trials.csv", [common | r for r in rows], study_report.TRIAL_COLUMNS)
    write_csv(out / "curves.csv", [{"arm": r["arm"], "trial": r["trial"], "epoch": 1, "val_acc": r["val_acc"]}
                                   for r in rows], study_report.CURVE_COLUMNS)
    test = {"baseline": [0.851, 0.847, 0.853], "vpn": [0.856, 0.849, 0.861]}
    plain = [0.850, 0.848, 0.852]
    seeds = [{"arm": arm, "seed": 100 + k, "winner_trial": 2, "test_acc": test[arm][k], "status": "finished",
              "test_acc_no_noise": plain[k] if arm == "vpn" else test[arm][k], "wall_time_s": 3600, "epochs": 3,
              "test_acc_alg2": test[arm][k] if arm == "vpn" else None, "config_id": "y"}
             for arm in ("baseline", "vpn") for k in range(3)]
    write_csv(out / "seeds.csv", seeds, study_report.SEED_COLUMNS)


def test_report_from_hand_made_csv_files(tiny_synthetic_dir, tmp_path, capsys):
    out = tmp_path / "study"
    _hand_made_study(out, write_spec(tmp_path / "spec.py", trials=4), tiny_synthetic_dir)
    assert main(["study", "--out", str(out), "--report-only"]) == 0
    text = (out / "report.md").read_text()

    assert "| baseline | 2 | 0 | 85.00 | sgd lr 0.01 wd 0.0005 |" in text  # completed beats early-stopped 0.95
    assert "| vpn | 2 | 0 | 83.00 | sgd lr 0.01 wd 0.0005 γ 0 m 2 none init authors |" in text
    # Budget: finished = completed + early-stopped + diverged; the errored trial is counted apart
    assert "| baseline | 3 of 4 | 2 | 1 | 0 | 1 | 7 | 2.33 |" in text
    assert "| vpn | 4 of 4 | 2 | 1 | 1 | 0 | 8 | 4.33 |" in text
    assert "6.67 trial-hours of search and 6.00 of re-runs" in text

    baseline_values, vpn_values = [0.80, 0.95, 0.85], [0.82, 0.25, 0.83, 0.70]  # the diverged trial at 1/K
    for arm, values in (("baseline", baseline_values), ("vpn", vpn_values)):
        curve, (low, high) = expected_best(values), expected_best_band(values)
        assert (f"| {arm} | {len(values)} | {100 * curve[0]:.2f} [{100 * low[0]:.2f}, {100 * high[0]:.2f}] | "
                f"") in text
    assert "below the baseline's at every budget 1..3" in text
    common = [expected_best(values)[2] - expected_best(values)[0] for values in (baseline_values, vpn_values)]
    assert (f"The last doubling of the budget (1 → 3 trials) raised the expected best by {100 * common[0]:+.2f} points "
            f"(baseline) and {100 * common[1]:+.2f} (VPN). ") in text
    assert "has not reached its 4 trials per arm yet" in text  # the baseline arm has 3 of 4
    # the same compute: mean trial cost 3900 s (VPN) and 2800 s (baseline, the errored trial not a draw), so n VPN
    # trials buy floor(n · 39/28) baseline trials: 1 -> 1, 2 -> 2, 3 -> 4 (more than the 3 the baseline ran)
    assert ("A trial cost 1.083 trial-hours on average in the VPN arm and 0.778 in the baseline arm (1.4×)") in text
    vpn_curve, baseline_curve = expected_best(vpn_values), expected_best(baseline_values)
    resampled = {"baseline": study_report.bootstrap_expected_best(baseline_values, seed=0),
                 "vpn": study_report.bootstrap_expected_best(vpn_values, seed=1)}
    for n in (1, 2):
        low, high = 100 * np.quantile(resampled["vpn"][:, n - 1] - resampled["baseline"][:, n - 1], (0.025, 0.975))
        assert low < 100 * (vpn_curve[n - 1] - baseline_curve[n - 1]) < high
        assert (f"| {n} | {n * 3900 / 3600:.2f} | {n} | {100 * vpn_curve[n - 1]:.2f} | "
                f"{100 * baseline_curve[n - 1]:.2f} | {100 * (vpn_curve[n - 1] - baseline_curve[n - 1]):+.2f} "
                f"[{low:+.2f}, {high:+.2f}] |") in text
    assert "| 3 | 3.25 |" not in text and "budgets n = 1..2 (beyond" in text

    # paired by seed: the t interval and the paired t-test computed directly, Holm over the two tests (x2 here)
    alg2 = 100 * (np.array([0.856, 0.849, 0.861]) - np.array([0.851, 0.847, 0.853]))
    plain = 100 * (np.array([0.850, 0.848, 0.852]) - np.array([0.851, 0.847, 0.853]))
    low, high = stats.t.interval(0.95, 2, loc=alg2.mean(), scale=stats.sem(alg2))
    p_alg2, p_plain = stats.ttest_1samp(alg2, 0).pvalue, stats.ttest_1samp(plain, 0).pvalue
    smaller, larger = sorted([p_alg2, p_plain])
    holm = {smaller: min(1.0, 2 * smaller), larger: max(min(1.0, 2 * smaller), larger)}
    assert (f"| Algorithm 2 | {alg2.mean():+.2f} [{low:+.2f}, {high:+.2f}] (3) | {p_alg2:.3g} ({holm[p_alg2]:.3g}) | "
            f"no difference shown | — | - |") in text
    assert f"| no noise | {plain.mean():+.2f} [" in text and f"| {p_plain:.3g} ({holm[p_plain]:.3g}) |" in text
    assert f"**{alg2.mean():+.2f} points** (Algorithm 2; 95% CI [{low:+.2f}, {high:+.2f}]): no difference shown." \
        in text
    assert "| 100 | 85.10 | 85.60 | 85.00 | +0.50 | -0.10 |" in text
    # trial numbers completed in both arms (0 and 2): VPN against the base alone at the same shared settings
    assert "| 0 | sgd lr 0.01 wd 0.0005 | 80.00 | 82.00 | γ 0.0025 m 2 norm C 3 init authors | +2.00 |" in text
    assert "| 2 | sgd lr 0.01 wd 0.0005 | 85.00 | 83.00 | γ 0 m 2 none init authors | -2.00 |" in text
    half = stats.t.ppf(0.975, 1) * np.std([2.0, -2.0], ddof=1) / np.sqrt(2)
    assert f"VPN − baseline over these trials: +0.00 [{-half:+.2f}, {half:+.2f}] (2)" in text
    assert "Precision: `train.amp=off` in both arms. fp32, on purpose" in text
    assert f"Command: `vpn-dist study --spec {tmp_path / 'spec.py'} --data DATA/synthetic --out" in text
    for figure in ("expected_best.png", "sensitivity.png"):
        assert (out / "figures" / figure).stat().st_size > 10_000
    assert "report in" in capsys.readouterr().out


def test_asha_rungs_are_ray_asha_schedulers_milestones():
    from ray.tune.schedulers import ASHAScheduler

    for grace, reduction, epochs in ((5, 3, 40), (1, 2, 3), (1, 3, 9), (2, 4, 100), (5, 3, 5)):
        scheduler = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=epochs, grace_period=grace,
                                  reduction_factor=reduction)
        milestones = sorted(m for m, _ in scheduler._brackets[0]._rungs if m < epochs)
        assert study_report.asha_rungs(grace, reduction, epochs) == milestones
    assert study_report.asha_rungs(5, 3, 40) == [5, 15]


def test_the_rungs_section_counts_the_trials_within_one_and_two_standard_errors_of_each_rungs_best():
    study = SimpleNamespace(fixed={"train.epoch_eval_images": 100}, grace_period=1, reduction_factor=2)
    plan = SimpleNamespace(epochs=3)  # rungs at epochs 1 and 2
    ends = {0: ("completed", 3), 1: ("completed", 3), 2: ("early-stopped", 1), 3: ("early-stopped", 1)}
    at_epoch = {1: {0: 0.90, 1: 0.88, 2: 0.85, 3: 0.80}, 2: {0: 0.91, 1: 0.92}}
    rows = [{"arm": "baseline", "trial": n, "status": status, "epochs": epochs, "val_acc": at_epoch[min(epochs, 2)][n]}
            for n, (status, epochs) in ends.items()]
    curves = [{"arm": "baseline", "trial": n, "epoch": epoch, "val_acc": value}
              for epoch, values in at_epoch.items() for n, value in values.items()]
    lines = study_report._rungs_section(study, plan, rows, curves)
    # epoch 1: SE √(0.9 · 0.1 / 100) = 3 points; 88 is within one, 85 (stopped) within two, 80 (stopped) neither
    assert "| baseline | 1 | 4 | 90.00 | 3.00 | 2 (0) | 3 (1) |" in lines
    assert f"| baseline | 2 | 2 | 92.00 | {100 * np.sqrt(0.92 * 0.08 / 100):.2f} | 2 (0) | 2 (0) |" in lines
    assert not any(line.startswith("| vpn |") for line in lines)  # no VPN trial reached a rung
    # the verdict's account of a stopped baseline trial (the matched baseline's) places it among its rung's
    assert study_report._how_the_search_ended(study, rows, curves, 2) == (
        ", which ASHA stopped at epoch 1 with validation accuracy 85.00, 5.00 points (1.7 standard errors) behind the "
        "best trial there")
    assert study_report._rungs_section(study, plan, rows, []) == []  # no trial reached a rung yet: no section
    study.fixed["train.epoch_eval_images"] = 0  # the whole val split, of a size the report does not know
    assert study_report._rungs_section(study, plan, rows, curves) == []


def test_same_compute_budgets_give_the_baseline_the_trials_that_cost_no_more():
    budgets = study_report.same_compute_budgets({"vpn": 1.0, "baseline": 0.25}, n_vpn=40, n_baseline=40)
    assert budgets == [(n, 4 * n) for n in range(1, 11)]  # 4x the cost: 10 VPN trials buy the 40 baseline ones
    assert study_report.same_compute_budgets({"vpn": 0.3, "baseline": 0.1}, 5, 40)[-1] == (5, 15)  # no float floor
    assert study_report.same_compute_budgets({"vpn": 1.0, "baseline": 2.0}, 4, 40) == [(2, 1), (3, 1), (4, 2)]
    assert study_report.same_compute_budgets({"vpn": None, "baseline": 0.25}, 40, 40) == []


def test_rerun_groups_add_the_matched_baseline_only_where_the_winners_differ():
    same = {"baseline": {"trial": 3}, "vpn": {"trial": 3}}
    assert study_report.rerun_trials(same) == {"baseline": ("baseline", 3), "vpn": ("vpn", 3)}
    apart = {"baseline": {"trial": 3}, "vpn": {"trial": 7}}
    assert study_report.rerun_trials(apart)["matched"] == ("baseline", 7)  # the base alone at VPN's shared axes
    assert study_report.rerun_trials({"vpn": {"trial": 7}})["matched"] == ("baseline", 7)


def test_report_with_the_matched_baseline(tiny_synthetic_dir, tmp_path):
    """The VPN winner is trial 0, the baseline's trial 2: the matched baseline (the baseline arm's trial 0 re-run)
    gets a column, a third comparison in the Holm family, and the verdict's control sentence."""
    from vpn_dist.reproduce.report import write_csv

    out = tmp_path / "study"
    _hand_made_study(out, write_spec(tmp_path / "spec.py", trials=4), tiny_synthetic_dir)
    rows = read_csv(out / "trials.csv")
    for row in rows:
        if (row["arm"], row["trial"]) == ("vpn", 0):
            row["val_acc"] = 0.84
    write_csv(out / "trials.csv", rows, study_report.TRIAL_COLUMNS)
    seeds = read_csv(out / "seeds.csv")
    matched_test = [0.850, 0.846, 0.849]
    seeds += [dict(seeds[0], arm="matched", seed=100 + k, winner_trial=0, test_acc=acc, test_acc_no_noise=acc)
              for k, acc in enumerate(matched_test)]
    write_csv(out / "seeds.csv", seeds, study_report.SEED_COLUMNS)
    assert main(["study", "--out", str(out), "--report-only"]) == 0
    text = (out / "report.md").read_text()

    vpn, baseline = np.array([0.856, 0.849, 0.861]), np.array([0.851, 0.847, 0.853])
    plain = np.array([0.850, 0.848, 0.852])
    d = {"alg2": 100 * (vpn - baseline), "plain": 100 * (plain - baseline), "matched": 100 * (vpn - matched_test)}
    p = {k: stats.ttest_1samp(v, 0).pvalue for k, v in d.items()}
    smallest = min(p, key=p.get)
    low, high = stats.t.interval(0.95, 2, loc=d["matched"].mean(), scale=stats.sem(d["matched"]))
    assert "Status: baseline 3 of 4 trials finished, vpn 4 of 4 trials finished; 9 of 9 re-runs finished." in text
    assert f"| {p[smallest]:.3g} ({min(1.0, 3 * p[smallest]):.3g}) |" in text  # Holm over three tests
    assert f"| Algorithm 2 − matched baseline | {d['matched'].mean():+.2f} [{low:+.2f}, {high:+.2f}] (3) |" in text
    assert "| seed | baseline | matched baseline | VPN (Algorithm 2) |" in text
    assert f"| 100 | 85.10 | 85.00 | 85.60 | 85.00 | +0.50 | -0.10 | {d['matched'][0]:+.2f} |" in text
    assert (f"(the baseline arm's trial 0, which completed the search with validation accuracy 80.00), re-run with the "
            f"same seeds: VPN − matched baseline "
            f"**{d['matched'].mean():+.2f} points** (95% CI [{low:+.2f}, {high:+.2f}])") in text


# ---------------------------------------------------------------- resuming (Tune replaced by a stand-in)


class Killed(Exception):
    pass


class FakeTune:
    """Stands in for driver.run_trials: "trains" each requested trial by writing its metrics.json (val accuracy from
    the lr, so the winners are known), tells the study's callback, and can stop after `stop_after` trials as a
    killed process would (nothing after that is written)."""

    def __init__(self, stop_after: int | None = None, diverge: set[str] = frozenset(), ctrl_c_after: int | None = None):
        self.stop_after, self.diverge, self.ctrl_c_after = stop_after, diverge, ctrl_c_after
        self.calls: list[dict] = []
        self.trained: list[str] = []

    def __call__(self, trial, param_space, out, **kw):
        configs = trial.keywords["configs"]
        self.calls.append({"keys": [p["key"] for p, _ in kw["ordered"]], "history": kw.get("asha_history"),
                           "asha": kw.get("asha")})
        (callback,) = kw["callbacks"]
        trials = []
        for params, _ in kw["ordered"]:
            key = params["key"]
            if self.stop_after is not None and len(self.trained) >= self.stop_after:
                raise Killed  # the process dies: the rest never report
            if self.ctrl_c_after is not None and len(self.trained) >= self.ctrl_c_after:
                # Ctrl-C: Tune stops the running trial and calls it complete, its last result not done; the saved
                # statuses of it and of those not started are PENDING
                running = SimpleNamespace(config=params, status="RUNNING", trial_id=key, last_result={"epoch": 1})
                if not trials or trials[-1].status != "PENDING":
                    callback.on_trial_complete(0, [], running)
                trials.append(SimpleNamespace(config=params, status="PENDING", trial_id=key, last_result={}))
                continue
            cfg = configs[key]
            self.trained.append(key)
            epochs = cfg.train.epochs if cfg.train.lr > 0.003 or key.startswith("seeds") else 1  # "ASHA stops"
            val = 0.5 + 10 * cfg.train.lr + (0.01 if cfg.model.generator != "none" else 0)
            history = [{"epoch": e + 1, "val_acc": val - 0.01 * (epochs - e - 1), "train_loss": 1.0}
                       for e in range(epochs)]
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out) / "metrics.json").write_text(json.dumps({
                "epochs_completed": epochs, "epochs_planned": cfg.train.epochs, "val_acc": val,
                "val_acc_no_noise": val, "test_acc_no_noise": val - 0.02, "wall_time_s": 2.0 * epochs,
                "test_acc_alg2": val - 0.01 if cfg.model.generator != "none" else None, "history": history}))
            if key in self.diverge:
                # as Ray wraps it: the divergence is a line deep inside, not the last exception line
                t = SimpleNamespace(config=params, status="ERROR", trial_id=key, error_msg=(
                    "Traceback (most recent call last):\n  File x\nvpn_dist.errors.TrainingFailed: the Ray Train run "
                    "failed: rank 0: non-finite loss nan at epoch 0 step 3 (rank 0); lower train.lr\n\nDuring "
                    "handling:\nray.exceptions.RayTaskError(TrainingFailed): ray::ImplicitFunc.train() (pid=7)"))
                callback.on_trial_error(0, [], t)
            else:
                t = SimpleNamespace(config=params, status="TERMINATED", trial_id=key, last_result={"done": True})
                callback.on_trial_complete(0, [], t)
                t = SimpleNamespace(config=params, status="TERMINATED", trial_id=key, last_result={})  # as saved
            trials.append(t)
        return trials


def test_a_killed_study_resumes_from_trials_csv_without_rerunning_finished_trials(tiny_synthetic_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    import vpn_dist.study as study_cli

    spec = write_spec(tmp_path / "spec.py", trials=4)
    out = tmp_path / "study"
    argv = ["study", "--spec", str(spec), "--data", str(tiny_synthetic_dir), "--out", str(out)]
    first = FakeTune(ctrl_c_after=2)  # Ctrl-C while trial 2 runs
    monkeypatch.setattr(study_cli.driver, "run_trials", first)
    assert main(argv) == 130
    rows = {(r["arm"], r["trial"]): r["status"] for r in csv_rows(out / "trials.csv")}
    assert rows[("baseline", "2")] == "pending" and rows[("baseline", "3")] == "pending"
    assert {rows[("baseline", "0")], rows[("baseline", "1")]} <= {"completed", "early-stopped"}
    assert "interrupted" in capsys.readouterr().out

    second = FakeTune(stop_after=1, diverge={"search/vpn/1"})  # then killed after one more trial
    monkeypatch.setattr(study_cli.driver, "run_trials", second)
    with pytest.raises(Killed):
        main(["study", "--out", str(out), "--resume"])
    assert second.calls[0]["keys"] == ["search/baseline/2", "search/baseline/3"]
    before = {(r["arm"], r["trial"]): r for r in csv_rows(out / "trials.csv") if r["status"] != "pending"}
    assert sorted(before) == [("baseline", "0"), ("baseline", "1"), ("baseline", "2")]

    lines = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"study: (baseline|vpn) +#", ln)]
    assert len(lines) == 1  # one line per finished trial: its parameters, result and the best of each arm so far
    assert re.match(r"study: baseline #2 +(sgd|adam) lr \S+ wd \S+ seed 2 \| val 0\.\d{4} after [13]/3 epochs, "
                    r"(completed|early-stopped), \d+ s \| best: baseline (0\.\d{4} \(#\d\)|-), vpn -$", lines[0]), lines

    second = FakeTune(diverge={"search/vpn/1"})
    monkeypatch.setattr(study_cli.driver, "run_trials", second)
    assert main(["study", "--out", str(out), "--resume"]) == 0
    baseline_call, vpn_call, seeds_call = second.calls
    assert baseline_call["keys"] == ["search/baseline/3"]  # the finished three never run again
    finished_curves = [[{"epoch": int(p["epoch"]), "val_acc": float(p["val_acc"])} for p in csv_rows(out / "curves.csv")
                        if p["arm"] == "baseline" and p["trial"] == str(i)] for i in range(3)]
    assert baseline_call["history"] == finished_curves  # ASHA's rungs start with them
    assert baseline_call["asha"] == {"time_attr": "epoch", "max_t": 3, "grace_period": 1, "reduction_factor": 2}
    assert vpn_call["keys"] == [f"search/vpn/{i}" for i in range(4)] and vpn_call["history"] == []
    rows = {(r["arm"], r["trial"]): r for r in csv_rows(out / "trials.csv")}
    assert len(rows) == 8 and all(rows[key] == before[key] for key in before)  # finished rows kept as they were
    assert rows[("vpn", "1")]["status"] == "diverged" and "non-finite loss" in rows[("vpn", "1")]["error"]

    winners = study_report.winners(read_csv(out / "trials.csv"))
    assert sorted(seeds_call["keys"]) == [f"seeds/{arm}/{s}" for arm in ("baseline", "vpn") for s in (100, 101, 102)]
    seeds = csv_rows(out / "seeds.csv")
    assert {(r["arm"], int(r["winner_trial"])) for r in seeds} == {(arm, w["trial"]) for arm, w in winners.items()}
    assert {r["status"] for r in seeds} == {"finished"}
    assert (out / "report.md").is_file() and (out / "figures" / "expected_best.png").is_file()

    # another machine: only the committed files (no run directories): nothing runs again
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("study.json", "trials.csv", "curves.csv", "seeds.csv"):
        shutil.copy(out / name, moved / name)
    third = FakeTune()
    monkeypatch.setattr(study_cli.driver, "run_trials", third)
    assert main(["study", "--out", str(moved), "--resume", "--data", str(tiny_synthetic_dir)]) == 0
    assert third.trained == [] and csv_rows(moved / "trials.csv") == csv_rows(out / "trials.csv")

    # a changed spec: the baseline trials drawn from the new lr range run again, and the winners' re-runs with them
    write_spec(spec, trials=4, baseline_lr="tune.loguniform(2e-2, 3e-2)")
    fourth = FakeTune()
    monkeypatch.setattr(study_cli.driver, "run_trials", fourth)
    capsys.readouterr()
    assert main(["study", "--out", str(moved), "--resume"]) == 0
    assert fourth.calls[0]["keys"] == [f"search/baseline/{i}" for i in range(4)] and len(fourth.calls) == 2
    assert fourth.calls[1]["keys"] == [f"seeds/baseline/{s}" for s in (100, 101, 102)]  # vpn's winner stands
    assert "4 row(s) of trials.csv were run with other settings" in capsys.readouterr().out

    # more trials on --resume: only the new ones run
    fifth = FakeTune()
    monkeypatch.setattr(study_cli.driver, "run_trials", fifth)
    assert main(["study", "--out", str(moved), "--resume", "--trials", "5"]) == 0
    assert [c["keys"] for c in fifth.calls][:2] == [["search/baseline/4"], ["search/vpn/4"]]


def test_the_matched_baseline_runs_when_the_vpn_winner_is_another_trial(tiny_synthetic_dir, tmp_path, monkeypatch):
    import vpn_dist.study as study_cli

    spec = write_spec(tmp_path / "spec.py", trials=6)
    lrs = {i: draw_params(load_study(str(spec)), "baseline", i)["train.lr"] for i in range(6)}
    completing = sorted((lr, i) for i, lr in lrs.items() if lr > 0.003)  # FakeTune runs these to the end
    assert len(completing) >= 2
    (_, second), (_, best) = completing[-2:]
    fake = FakeTune(diverge={f"search/vpn/{best}"})  # VPN's best trial blows up: its winner is another trial
    monkeypatch.setattr(study_cli.driver, "run_trials", fake)
    out = tmp_path / "study"
    assert main(["study", "--spec", str(spec), "--data", str(tiny_synthetic_dir), "--out", str(out)]) == 0

    groups = ("baseline", "matched", "vpn")
    assert sorted(fake.calls[-1]["keys"]) == sorted(f"seeds/{g}/{seed}" for g in groups for seed in (100, 101, 102))
    seeds = csv_rows(out / "seeds.csv")
    assert [(r["arm"], int(r["winner_trial"])) for r in seeds] == \
        [("baseline", best)] * 3 + [("vpn", second)] * 3 + [("matched", second)] * 3
    for row in seeds:  # the stand-in's accuracy tells the base alone (no +0.01) at which lr
        lr = lrs[best if row["arm"] == "baseline" else second]
        expected = 0.5 + 10 * lr + (0.01 - 0.01 if row["arm"] == "vpn" else -0.02)
        assert float(row["test_acc"]) == pytest.approx(expected)
    assert "VPN − matched baseline" in (out / "report.md").read_text()


def test_asha_rungs_replayed_from_finished_trials_judge_new_ones():
    from vpn_dist.sweep.driver import _asha

    asha = {"time_attr": "epoch", "max_t": 9, "grace_period": 1, "reduction_factor": 3}
    history = [[{"epoch": e, "val_acc": v} for e, v in enumerate(values, 1)]
               for values in ([0.5, 0.6, 0.7], [0.8, 0.85, 0.9], [0.6, 0.7])]
    for replayed, expected in ((history, ["STOP", "CONTINUE"]), (None, ["CONTINUE", "CONTINUE"])):
        actions = []
        for value in (0.55, 0.79):
            scheduler = _asha(asha, replayed)
            scheduler.set_search_properties("val_acc", "max")
            new = SimpleNamespace(trial_id=f"new-{value}")
            scheduler.on_trial_add(None, new)
            actions.append(scheduler.on_trial_result(None, new, {"epoch": 1, "val_acc": value}))
        # with the replayed rung at epoch 1 (0.5, 0.8, 0.6: cutoff at its 2/3 quantile, 0.667) 0.55 stops, 0.79
        # goes on; an empty rung stops nothing
        assert actions == expected


def test_a_trial_resumed_from_its_checkpoint_reports_the_epochs_it_holds_first(tiny_synthetic_dir, tmp_path,
                                                                              monkeypatch):
    """ASHA judges a trial at its first report past each rung: a resumed trial must report its rung epochs again."""
    import ray.tune

    from vpn_dist.config import from_dict
    from vpn_dist.launch import train
    from vpn_dist.run_dir import RunDir
    from vpn_dist.sweep import driver

    cfg = from_dict({"out": str(tmp_path / "run"), "data.path": str(tiny_synthetic_dir), "model.base": "sr",
                     "model.generator": "none", "vpn.mode": "baseline", "train.epochs": 3, "train.batch_size": 100,
                     "train.keep_checkpoints": 2, "data.num_workers": 1})
    train(cfg)
    run_dir = RunDir(cfg.out)
    trained = run_dir.read_metrics()["history"]
    shutil.rmtree(run_dir.checkpoint(3))  # as if killed during epoch 3: the newest checkpoint is epoch 2's
    run_dir.metrics.unlink()
    reports = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **kw: reports.append(metrics))
    driver.train_in_trial(cfg)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert [r["val_acc"] for r in reports[:2]] == [h["val_acc"] for h in trained[:2]]  # replayed, not retrained
    assert json.loads(run_dir.attempts.read_text().splitlines()[-1])["start_epoch"] == 2


# ---------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_study_end_to_end_kill_and_resume(tiny_synthetic_dir, tmp_path):
    out = tmp_path / "study"
    argv = ["study", "--spec", "study_smoke", "--data", str(tiny_synthetic_dir), "--out", str(out), "--trials", "3",
            "--max-concurrent", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "vpn_dist.cli", *argv], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    done = ("completed", "early-stopped")
    finished = poll_until(lambda: [r for r in csv_rows(out / "trials.csv") if r["status"] in done]
                          if (out / "trials.csv").is_file() else [], first)
    assert finished, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its local Ray at once, mid-study
    first.wait()

    resumed = subprocess.run([sys.executable, "-m", "vpn_dist.cli", "study", "--out", str(out), "--resume"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    (tmp_path / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = csv_rows(out / "trials.csv")
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"completed", "early-stopped", "diverged"}
    for row in finished:  # started once, never again
        run_dir = next((out / "runs" / "search" / row["arm"]).glob(f"{int(row['trial']):03d}-{row['config_id']}"))
        attempts = (run_dir / "attempts.jsonl").read_text().splitlines()
        assert len(attempts) == 1 and json.loads(attempts[0])["reason"] == "start"
        assert not (run_dir / "checkpoints").exists() and (run_dir / "tb").is_dir()
    seeds = csv_rows(out / "seeds.csv")
    groups = study_report.rerun_trials(study_report.winners(read_csv(out / "trials.csv")))  # + matched if they differ
    assert sorted((r["arm"], int(r["winner_trial"])) for r in seeds) == sorted(
        (group, trial) for group, (_, trial) in groups.items() for _ in range(2))  # each group at both rerun seeds
    assert {r["status"] for r in seeds} == {"finished"}
    assert all(0 <= float(r["test_acc"]) <= 1 for r in seeds)
    printed = [ln for ln in resumed.stdout.splitlines() if re.match(r"study: (baseline|vpn) +#", ln)]
    assert len(printed) == 6 - len(finished)
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "n = 1" in report
    assert (out / "figures" / "expected_best.png").is_file() and (out / "figures" / "sensitivity.png").is_file()


def test_every_committed_study_report_recomputes_byte_for_byte(tmp_path, monkeypatch, capsys):
    """report.md of every committed study is what its CSV files give today (its command names OUT as given, so the
    copy sits at the same relative path)."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    for committed in sorted((repo / "reproduction").glob("tuned-*/study.json")):
        copy = Path("reproduction") / committed.parent.name
        copy.mkdir(parents=True)
        for name in ("study.json", "trials.csv", "curves.csv", "seeds.csv"):
            if (committed.parent / name).is_file():
                shutil.copy(committed.parent / name, copy / name)
        assert main(["study", "--out", str(copy), "--report-only"]) == 0
        assert (copy / "report.md").read_text() == (committed.parent / "report.md").read_text(), committed.parent
