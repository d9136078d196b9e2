"""Named search spaces for `vpn-dist tune --space NAME`: plain Python data to copy and edit.

A space is a dict (see `smoke.py` for a small, commented one):

    SPACE = {
        "description": "one line shown by `vpn-dist tune --list`",
        "data": None,            # None: every --data dir given; or a list of data set names to keep
        "axes": {                # what varies; Ray Tune primitives (tune.choice, tune.loguniform, tune.grid_search)
            "arch": tune.grid_search([("dnn3", "dnn3"), ("sr", "dnn3")]),  # (model.base, model.generator)
            "vpn.gamma_scale": tune.choice([0.1, 1.0, 10.0]),  # gamma = scale * 0.01 / K, K from the data set
            "vpn.bound_C": tune.choice([("none", None), ("elementwise", 0.5), ("norm", 10.0)]),
            "vpn.m": tune.choice([1, 2, 4, 8]),
            "train.lr": tune.loguniform(3e-4, 3e-3),
            # ... any other RunConfig dotted key (train.batch_size, vpn.mode, ...)
        },
        "fixed": {"train.epochs": 40, "train.batch_size": 256, "vpn.mode": "joint"},  # RunConfig dotted keys
        "samples": 8,            # Ray Tune num_samples: random draws per grid point (--samples overrides)
        "grace_period": 5,       # ASHA: epochs every trial runs before it can be stopped
        "reduction_factor": 3,   # ASHA: keep the top 1/3 at each rung
        "metric": "val_acc",     # selection metric (validation only; never a test metric)
    }

Besides RunConfig keys, three axis keys are understood: `arch` (a (base, generator) pair), `vpn.bound_C`
(a (bound, C) pair, since C only means something with its bound) and `vpn.gamma_scale` (gamma relative to the
number of classes K, which differs per data set; the authors' 0.01/(K-1) is scale K/(K-1)). The `data` axis is
added by the driver: a grid over the given --data dirs, so every data set gets the same trials.

The `study_*.py` files here are not spaces but `vpn-dist study` specs (the baseline and VPN tuned with one budget;
docs/tuning-study.md), their shared arms in `study_axes.py`.

Every space is checked before any trial starts: each grid value and each choice, and a few draws of every
continuous axis, are resolved into a RunConfig and validated.
"""
from __future__ import annotations

import importlib

from vpn_dist.errors import UserError

SPACES = ("smoke", "paper", "multi")


def get_space(name: str) -> dict:
    """The SPACE dict of `tune_spaces/<name>.py` (a copy, so callers may edit it)."""
    if name not in SPACES:
        raise UserError(f"unknown search space {name!r}; spaces are {', '.join(SPACES)} (tune_spaces/<name>.py)")
    module = importlib.import_module(f"tune_spaces.{name}")
    return dict(module.SPACE)
