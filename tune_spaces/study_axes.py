"""The two arms of every tuning study (`vpn-dist study`, docs/tuning-study.md), defined once so that each setting
(data set x base) searches the same spaces with the same budget.

Both arms search the optimizer (the authors' SGD: momentum 0.9, cosine over the epochs; or their Adam switch at a
constant lr), the learning rate (log-uniform over three decades, 1e-4..1e-1, around the paper's 1e-3: SGD trains
well near 1e-2, Adam near 1e-3) and the weight decay (0, the authors' 5e-4, or log-uniform 1e-5..1e-2, a third of the
trials each). The VPN arm (joint training, DNN3 generator) also searches
- gamma, in units of the paper's 0.01/K: 0 in a quarter of the trials, else log-uniform over four decades around 1;
- m, the noise draws per sample: 1, 2, 4 or 8;
- the bound: none, elementwise (sigma <= C, C log-uniform 0.01..1) or per-sample norm (||sigma||_2 <= C, C
  log-uniform 0.3..30), a third each;
- the generator's init scale: the authors' N(0, 0.002^2), N(0, s^2) with s log-uniform 0.002..0.02, or PyTorch's
  default, a third each (under SGD sigma can stay collapsed near its small start).

A choice picks each listed value equally often and draws any distribution it holds, so a value listed three times
is drawn three times as often. Trial i of both arms shares the optimizer, lr, weight decay and seed.
"""
from ray import tune

SHARED_AXES = {
    "optimizer": tune.choice(["sgd", "adam"]),
    "train.lr": tune.loguniform(1e-4, 1e-1),
    "train.weight_decay": tune.choice([0.0, 5e-4, tune.loguniform(1e-5, 1e-2)]),
}
GAMMA_SCALE = tune.loguniform(1e-2, 1e2)
VPN_AXES = {
    **SHARED_AXES,
    "vpn.gamma_scale": tune.choice([0.0, GAMMA_SCALE, GAMMA_SCALE, GAMMA_SCALE]),
    "vpn.m": tune.choice([1, 2, 4, 8]),
    "vpn.bound_C": tune.choice([("none", None), ("elementwise", tune.loguniform(1e-2, 1.0)),
                                ("norm", tune.loguniform(0.3, 30.0))]),
    "model.generator_init_std": tune.choice([None, tune.loguniform(2e-3, 2e-2), "pytorch"]),
}


def study(data: str | None, base: str, description: str, *, trials: int = 40, epochs: int = 40,
          fixed: dict | None = None, **fields) -> dict:
    """A STUDY dict: both arms on `data` with this base, `trials` per arm, `epochs` at most (ASHA stops trials
    early from epoch 5 on, keeping the best third at each rung)."""
    return {
        "description": description,
        "data": data,
        "trials": trials,
        "search_seed": 0,
        "trial_seed": 0,  # trial i trains with seed i in both arms
        "rerun_seeds": [1000, 1001, 1002, 1003, 1004],  # the winners' re-runs: seeds no search trial used
        "grace_period": 5,
        "reduction_factor": 3,
        "fixed": {
            "model.base": base,
            "train.epochs": epochs,
            "train.batch_size": 256,
            # fp32 in both arms: `auto` differs between machines (a resumed study could mix precisions), and bf16
            # rounds x + eps to ~3 digits, erasing the small-sigma noise of the VPN arm's trials
            "train.amp": "off",
            # ASHA compares per-epoch validation accuracy on one fixed subset, the same size in both arms
            "train.epoch_eval_images": 1000,
            "train.figure_every": 1000,  # Figure 4 at the last epoch only
            "train.keep_checkpoints": 1,
            **(fixed or {}),
        },
        "arms": {
            "baseline": {"fixed": {"model.generator": "none", "vpn.mode": "baseline"}, "axes": dict(SHARED_AXES)},
            "vpn": {"fixed": {"model.generator": "dnn3", "vpn.mode": "joint"}, "axes": dict(VPN_AXES)},
        },
        **fields,
    }
