"""smoke: 4 tiny trials (1 data set) to try the sweep machinery in a minute or two on a laptop.

Two architectures on a grid x 2 random draws of m, lr and the bound; 2 epochs, ASHA may stop after 1.
"""
from ray import tune

SPACE = {
    "description": "4 tiny trials per data set (dnn3/sr base, dnn3 generator, 2 epochs): a first try and the tests",
    "data": None,
    "axes": {
        "arch": tune.grid_search([("dnn3", "dnn3"), ("sr", "dnn3")]),
        "vpn.gamma_scale": tune.choice([1.0]),
        "vpn.m": tune.choice([1, 2]),
        "train.lr": tune.loguniform(5e-4, 3e-3),
        "vpn.bound_C": tune.choice([("none", None), ("elementwise", 0.5)]),
    },
    "fixed": {
        "vpn.mode": "joint",
        "train.epochs": 2,
        "train.batch_size": 128,
        "train.eval_batch_size": 256,
        "train.figure_every": 100,
        "data.num_workers": 1,
    },
    "samples": 2,
    "grace_period": 1,
    "reduction_factor": 2,
    "metric": "val_acc",
}
