"""vpn-dist: Variational Positive-incentive Noise (VPN) at scale.

The public API: the method (any PyTorch classifier), the paper's models, the run config and the trainer.
Each name loads its module on first use, so importing a light module of the package (`vpn_dist.errors`,
`vpn_dist.config`) or running `vpn-dist --help` loads no torch, torchvision, Ray or FFCV.
"""
import importlib

# public name -> the module that defines it
_HOMES = {
    **dict.fromkeys(("condition", "bound_sigma", "generate_sigma", "sample_noise", "vpn_loss", "random_pixel_noise",
                     "alg2_scores", "alg2_predict", "predict_no_noise"), "vpn_dist.method"),
    "build_base": "vpn_dist.models", "build_generator": "vpn_dist.models",
    "RunConfig": "vpn_dist.config", "train": "vpn_dist.launch", "evaluate": "vpn_dist.evaluation",
    "Loader": "vpn_dist.data", "read_meta": "vpn_dist.data",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'vpn_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
