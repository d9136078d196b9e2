"""multi: one study over several data sets and base/generator architectures.

Give several --data dirs; every data set gets the same grid of architectures and random draws of the VPN knobs.
Results are grouped per data set x architecture, each group with its own best_config.
"""
from ray import tune

SPACE = {
    "description": "several data sets x (dnn3|sr|resnet18 base, dnn3 generator); results per data set x arch",
    "data": None,
    "axes": {
        "arch": tune.grid_search([("dnn3", "dnn3"), ("sr", "dnn3"), ("resnet18", "dnn3")]),
        "vpn.gamma_scale": tune.choice([0.1, 1.0, 10.0]),
        "vpn.m": tune.choice([1, 2, 4]),
        "train.lr": tune.loguniform(3e-4, 3e-3),
        "vpn.bound_C": tune.choice([("none", None), ("elementwise", 0.3), ("norm", 10.0)]),
    },
    "fixed": {
        "vpn.mode": "joint",
        "train.epochs": 20,
        "train.batch_size": 256,
    },
    "samples": 4,
    "grace_period": 3,
    "reduction_factor": 3,
    "metric": "val_acc",
}
