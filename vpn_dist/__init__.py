"""vpn-dist: Variational Positive-incentive Noise (VPN) at scale.

The public API: the method (any PyTorch classifier), the paper's models, the run config and the trainer.
(Ray and FFCV load only when a run starts.)
"""
from vpn_dist.config import RunConfig
from vpn_dist.data import Loader, read_meta
from vpn_dist.method import (alg2_predict, alg2_scores, bound_sigma, condition, generate_sigma, predict_no_noise,
                             random_pixel_noise, sample_noise, vpn_loss)
from vpn_dist.models import build_base, build_generator
from vpn_dist.evaluation import evaluate
from vpn_dist.launch import train

__all__ = [
    "condition", "bound_sigma", "generate_sigma", "sample_noise", "vpn_loss", "random_pixel_noise",
    "alg2_scores", "alg2_predict", "predict_no_noise", "build_base", "build_generator",
    "RunConfig", "train", "evaluate", "Loader", "read_meta",
]
