"""vpn-dist: Variational Positive-incentive Noise (VPN) at scale.

The public API: the method (any PyTorch classifier), the paper's models, the run config and the trainer.
"""
from vpn_dist.method import (alg2_predict, alg2_scores, bound_sigma, condition, generate_sigma, predict_no_noise,
                             random_pixel_noise, sample_noise, vpn_loss)
from vpn_dist.models import build_base, build_generator

__all__ = [
    "condition", "bound_sigma", "generate_sigma", "sample_noise", "vpn_loss", "random_pixel_noise",
    "alg2_scores", "alg2_predict", "predict_no_noise", "build_base", "build_generator",
    "RunConfig", "train", "evaluate", "Loader", "read_meta",
]


def __getattr__(name):  # the trainer pulls in FFCV and Ray: import it only when asked for
    if name == "RunConfig":
        from vpn_dist.config import RunConfig
        return RunConfig
    if name == "train":
        from vpn_dist.launch import train
        return train
    if name == "evaluate":
        from vpn_dist.evaluate import evaluate
        return evaluate
    if name in ("Loader", "read_meta"):
        from vpn_dist import data
        return getattr(data, name)
    raise AttributeError(name)
