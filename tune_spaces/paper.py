"""paper: the paper's settings (section 4.1) with the knobs it leaves open swept around them.

gamma around the paper's 0.01/K (x0.1, x1, x10); m in {1, 2, 4, 8}; lr log-uniform around 1e-3; the bound C
from none (the authors' code) to tight; 40 epochs, batch 256, joint training, ASHA on validation accuracy.
The architecture is DNN3/DNN3 (Fashion-MNIST) and ResNet-18/ResNet-18 (CIFAR-10, Tiny ImageNet): both are on
the grid, so a sweep over one data set runs both; edit `arch` to keep one.
"""
from ray import tune

SPACE = {
    "description": "the paper's settings: gamma x{0.1,1,10} of 0.01/K, m in {1,2,4,8}, lr ~1e-3, C none..tight, "
                   "40 epochs, ASHA",
    "data": None,
    "axes": {
        "arch": tune.grid_search([("dnn3", "dnn3"), ("resnet18", "resnet18")]),
        "vpn.gamma_scale": tune.choice([0.1, 1.0, 10.0]),
        "vpn.m": tune.choice([1, 2, 4, 8]),
        "train.lr": tune.loguniform(3e-4, 3e-3),
        "vpn.bound_C": tune.choice([
            ("none", None),
            ("elementwise", 1.0), ("elementwise", 0.3), ("elementwise", 0.1),
            ("norm", 30.0), ("norm", 10.0), ("norm", 3.0),
        ]),
    },
    "fixed": {
        "preset": "paper",  # the authors' SGD, cosine, 40 epochs, batch 256, fp32; the axes vary the rest
        "vpn.mode": "joint",
    },
    "samples": 10,
    "grace_period": 5,
    "reduction_factor": 3,
    "metric": "val_acc",
}
