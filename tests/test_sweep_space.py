"""vpn_dist.sweep.space and the driver's arithmetic, without starting Ray: ASHA's max_t covers every trial's
epochs, the settings survive sweep.json, and --gpus-per-trial reaches each worker's GPU share."""
from __future__ import annotations

import json

import pytest
from ray import tune

from vpn_dist.errors import UserError
from vpn_dist.sweep.driver import default_concurrency
from vpn_dist.sweep.space import Space, SweepSettings, max_epochs, resolve_trial


@pytest.mark.parametrize("axis,expected", [
    (tune.randint(1, 5), 4),  # upper exclusive
    (tune.lograndint(1, 9), 8),
    (tune.qrandint(3, 10, 3), 9),  # quantized: upper inclusive, on the q grid
    (tune.qrandint(2, 10, 2), 10),
    (tune.choice([2, 7, 3]), 7),
    (tune.grid_search([5, 1]), 5),
    (tune.uniform(1, 4.2), 5),
    (6, 6),
])
def test_max_epochs_is_the_exact_upper_bound_of_the_epochs_axis(axis, expected):
    space = Space(axes={"train.epochs": axis})
    assert max_epochs(space) == expected
    if hasattr(axis, "sample"):  # no draw exceeds it (a few draws once could come out lower than a trial's epochs)
        assert max(axis.sample(size=500, random_state=0)) <= expected


def test_max_epochs_from_flag_fixed_or_default():
    assert max_epochs(Space(axes={"train.epochs": tune.randint(1, 50)}), epochs=3) == 3
    assert max_epochs(Space(fixed={"train.epochs": 12})) == 12
    assert max_epochs(Space()) >= 1
    with pytest.raises(UserError, match="train.epochs"):
        max_epochs(Space(axes={"train.epochs": tune.sample_from(lambda spec: 3)}))


def test_settings_round_trip_through_json():
    settings = SweepSettings(space="smoke", out="/o", datasets={"syn": {"path": "/d", "num_classes": 4, "name": "s"}},
                             fixed={"train.epochs": 2}, overrides=["train.amp=bf16"], gpu=True, gpus_per_trial=0.5,
                             max_epochs=2)
    assert SweepSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_gpus_per_trial_is_shared_by_the_trials_workers():
    settings = SweepSettings(space="s", out="/o", datasets={"syn": {"path": "/d", "num_classes": 4, "name": "s"}},
                             fixed={"vpn.mode": "joint"}, workers=2, gpu=True, gpus_per_trial=0.5)
    cfg = resolve_trial({"data": "syn", "arch": ("dnn3", "dnn3")}, settings, "/o/trials/t")
    assert cfg.dist.gpu and cfg.dist.gpus_per_worker == 0.25 and cfg.dist.workers == 2


def test_default_concurrency_counts_what_each_trials_workers_reserve():
    assert default_concurrency({"CPU": 16.0, "GPU": 1.0}, {"CPU": 1, "GPU": 0.25}) == 4
    assert default_concurrency({"CPU": 16.0, "GPU": 1.0}, {"CPU": 1, "GPU": 0.1}) == 10  # (1 // 0.1 is 9.0)
    assert default_concurrency({"CPU": 8.0}, {"CPU": 3}) == 2
    assert default_concurrency({"CPU": 2.0, "GPU": 8.0}, {"CPU": 4, "GPU": 1}) == 1  # at least one


def test_the_paper_space_sweeps_around_the_paper_preset_and_the_others_around_the_defaults():
    from vpn_dist.sweep.space import load_space

    datasets = {"syn": {"path": "/d", "num_classes": 4, "name": "s"}}
    trial = {"data": "syn", "arch": ("dnn3", "dnn3"), "train.lr": 2e-3}
    optimizers = {}
    for name in ("paper", "smoke"):
        space = load_space(name)
        settings = SweepSettings(space=name, out="/o", datasets=datasets, fixed=space.fixed)
        cfg = resolve_trial(trial, settings, "/o/trials/t")
        optimizers[name] = (cfg.train.optimizer, cfg.train.lr_schedule, cfg.train.amp, cfg.train.lr)
    assert optimizers == {"paper": ("sgd", "cosine", "off", 2e-3), "smoke": ("adam", "constant", "auto", 2e-3)}


def test_one_resolver_places_every_commands_trials_alike():
    """tune, reproduce and study resolve a trial through sweep.trial: values < --set < --epochs < placement, and
    each trial reserves what its config's dist section asks for."""
    from vpn_dist.config import preset
    from vpn_dist.reproduce.grid import Plan
    from vpn_dist.study.spec import Plan as StudyPlan
    from vpn_dist.sweep.trial import TrialResources, resolve_config

    shared = TrialResources.one_worker(cpus_per_trial=3, gpus_per_trial=0.25)
    assert shared.reserved() == {"CPU": 3, "GPU": 0.25}
    assert TrialResources.one_worker(cpus_per_trial=1, gpus_per_trial=0.0).reserved() == {"CPU": 1}
    assert TrialResources(workers=2, cpus_per_worker=2, gpu=True).reserved() == {"CPU": 4, "GPU": 2}
    cfg = resolve_config({"vpn.m": 2, "train.epochs": 9}, base=preset("paper"), overrides=["train.lr=0.01"], epochs=3,
                         run_dir="/runs/r", data_path="/data", resources=shared)
    assert (cfg.vpn.m, cfg.train.lr, cfg.train.epochs, cfg.train.optimizer, cfg.out, cfg.data.path) == \
        (2, 0.01, 3, "sgd", "/runs/r", "/data")
    assert (cfg.dist.workers, cfg.dist.cpus_per_worker, cfg.dist.gpu, cfg.dist.gpus_per_worker) == (1, 3, True, 0.25)
    two = resolve_config({}, base=None, overrides=[], epochs=None, run_dir="/r", data_path="/d",
                         resources=TrialResources(workers=2, cpus_per_worker=1, gpu=True, gpus_per_trial=1.0))
    assert (two.dist.workers, two.dist.gpus_per_worker) == (2, 0.5)  # the trial's GPU shared by its workers
    grid = Plan(tables=[1], data={"fashion-mnist": "/data/fm"}, seeds=1, cpus_per_trial=3, gpus_per_trial=0.25)
    study = StudyPlan(spec="s", data="/d", data_label="d", num_classes=10, base="sr", epochs=1, trials=1,
                      cpus_per_trial=3, gpus_per_trial=0.25)
    sweep = SweepSettings(space="s", out="/o", datasets={}, workers=1, cpus_per_worker=3, gpu=True,
                          gpus_per_trial=0.25)
    assert grid.resources() == study.resources() == sweep.resources() == shared
