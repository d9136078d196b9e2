"""`vpn-dist bench eval`: what one evaluation pass costs, rule by rule, measured side by side in one run.

Algorithm 2 runs both networks K times per image. Two ways to pay less, each checked against exact Algorithm 2 on
the same draws:
- the DNN3 generator's first layer is linear in x + gamma*Y, so it runs once per image instead of once per class
  (`AbsDNN3.sigma_per_class`; exact);
- top-k Algorithm 2 scores only the k classes most probable under h(x) (`train.alg2_top_k`; approximate): it
  saves 1 - k/K of the rows and costs one no-noise pass.

Models: a trained run (`--run DIR`, its test split), or else a toy trained here for `--toy-steps` steps of
Algorithm 1 on K Gaussian clusters (any K, e.g. 200, as Tiny ImageNet has), so agreement is measured on models
that learned something. Times are medians over --repeats.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from vpn_dist.config import paper_gamma
from vpn_dist.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="a trained run directory (VPN with a generator): its models and test images")
    p.add_argument("--data", help="with --run: the data directory (default: the run's)")
    p.add_argument("--shape", default="1x28x28", help="toy: CxHxW of the images (default 1x28x28)")
    p.add_argument("--classes", type=int, default=10, help="toy: K (default 10)")
    p.add_argument("--base", default="dnn3", help="toy: base model")
    p.add_argument("--generator", default="dnn3", help="toy: generator")
    p.add_argument("--toy-spread", type=float, default=0.1,
                   help="toy: class means are 0.5 + U(-spread/2, spread/2) per pixel; larger is easier (default 0.1)")
    p.add_argument("--toy-steps", type=int, default=300, help="toy: Algorithm-1 steps before measuring (default 300)")
    p.add_argument("--top-k", default="1,2,3,5", help="comma-separated k of top-k Algorithm 2 (default 1,2,3,5)")
    p.add_argument("--images", type=int, default=2000, help="images evaluated (default 2000)")
    p.add_argument("--batch-size", type=int, default=512, help="evaluation batch (train.eval_batch_size)")
    p.add_argument("--repeats", type=int, default=3)


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up (the roofline benchmark's timer, on the CPU)."""
    from vpn_dist.benchmarks.roofline import median_time

    return median_time(fn, torch.device("cpu"), repeats, warmup=1)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--shape {text!r}: give CxHxW, e.g. 3x32x32")
    return shape


def trained_run(run_dir: str, data_dir: str | None, images: int):
    """The run's base and generator at their newest checkpoint, and up to `images` of its test split."""
    from vpn_dist.data import Loader, check_data
    from vpn_dist.run_dir import RunDir

    run = RunDir(run_dir)
    cfg = run.read_config()
    if cfg.model.generator == "none":
        raise UserError(f"--run {run_dir} has no generator: Algorithm 2 needs one")
    data = data_dir or cfg.data.path
    meta = check_data(data)
    trained = run.trained(cfg)
    trained.check_data(meta, data)
    xs, ys, n = [], [], 0
    for x, y in Loader(data, "test", batch_size=512, train=False, device=torch.device("cpu"), num_workers=1):
        xs.append(x)
        ys.append(y)
        n += len(y)
        if n >= images:
            break
    x, y = torch.cat(xs)[:images], torch.cat(ys)[:images]
    return trained.base.eval(), trained.generator.eval(), x, y, meta["num_classes"], trained.gamma


def toy_run(shape: tuple[int, int, int], classes: int, base_name: str, generator_name: str, steps: int,
            images: int, spread: float):
    """K overlapping Gaussian clusters in [0, 1]^d (class means 0.5 + U(-spread/2, spread/2) per pixel, pixel noise
    0.3), and
    a base and generator trained on them by Algorithm 1 (Adam, lr 1e-3, batch 256): a K-class problem of any K
    that is not solved perfectly, with no data set needed."""
    from vpn_dist.config import VPNConfig
    from vpn_dist.models import build_base, build_generator
    from vpn_dist.trainer import TrainStep

    g = torch.Generator().manual_seed(0)
    means = 0.5 + spread * (torch.rand(classes, *shape, generator=g) - 0.5)

    def draw(n: int):
        y = torch.randint(0, classes, (n,), generator=g)
        return (means[y] + 0.3 * torch.randn(n, *shape, generator=g)).clamp(0, 1), y

    torch.manual_seed(0)
    base, generator = build_base(base_name, shape, classes), build_generator(generator_name, shape)
    gamma = paper_gamma(classes)
    optimizer = torch.optim.Adam([*base.parameters(), *generator.parameters()], lr=1e-3)
    step = TrainStep(base, generator, VPNConfig(mode="joint", m=1, bound="none", C=None), gamma, optimizer,
                     torch.amp.GradScaler("cpu", enabled=False))
    for _ in range(steps):
        step(*draw(256))
    x, y = draw(images)
    return base.eval(), generator.eval(), x, y, classes, gamma


def run(args: argparse.Namespace) -> int:
    from vpn_dist.method import alg2_predict, predict_no_noise

    try:
        ks = sorted({int(k) for k in args.top_k.split(",") if k.strip()})
    except ValueError:
        ks = [0]
    if not ks or min(ks) < 1:
        raise UserError(f"--top-k {args.top_k!r}: give comma-separated integers >= 1")
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1 or args.toy_steps < 0:
        raise UserError("--images, --batch-size and --repeats must be >= 1, --toy-steps >= 0")
    if args.run:
        base, generator, x, y, k_all, gamma = trained_run(args.run, args.data, args.images)
        source = f"run {args.run}"
    else:
        if args.classes < 2:
            raise UserError(f"--classes {args.classes} must be >= 2")
        shape = parse_shape(args.shape)
        base, generator, x, y, k_all, gamma = toy_run(shape, args.classes, args.base, args.generator,
                                                      args.toy_steps, args.images, args.toy_spread)
        source = (f"toy: {args.classes} Gaussian clusters {args.shape} (spread {args.toy_spread}), {args.base} base, "
                  f"{args.generator} generator, {args.toy_steps} steps of Algorithm 1")
    n = len(y)
    e = torch.randn(n, k_all, *x.shape[1:])  # one draw per (image, class), shared by every variant
    batches = [slice(i, i + args.batch_size) for i in range(0, n, args.batch_size)]
    plain = _without_shortcut(generator)

    def alg2(gen: nn.Module, top_k: int = 0) -> torch.Tensor:
        return torch.cat([alg2_predict(base, gen, x[s], k_all, gamma, "none", None, e=e[s], top_k=top_k)
                          for s in batches])

    exact = alg2(generator)
    no_noise_pred = torch.cat([predict_no_noise(base, x[s]) for s in batches])
    no_noise = _timed(lambda: [predict_no_noise(base, x[s]) for s in batches], args.repeats)
    exact_s = _timed(lambda: alg2(generator), args.repeats)
    print(f"device cpu, {torch.get_num_threads()} threads; {source}; K = {k_all}, {n} images, "
          f"median of {args.repeats}")
    print(f"exact Algorithm 2 accuracy {float((exact == y).float().mean()):.4f}, no noise "
          f"{float((no_noise_pred == y).float().mean()):.4f}")
    print("| rule | rows per image | images/s | time vs exact Alg. 2 | accuracy | agrees with exact Alg. 2 |")
    print("|---|---|---|---|---|---|")
    print(f"| no noise | 1 | {n / no_noise:,.0f} | {no_noise / exact_s:.2f}x | "
          f"{float((no_noise_pred == y).float().mean()):.4f} | {_share(no_noise_pred, exact)} |")
    if plain is not None:
        direct = _timed(lambda: alg2(plain), args.repeats)
        print(f"| Algorithm 2, generator per class | {k_all} | {n / direct:,.0f} | {direct / exact_s:.2f}x | "
              f"{float((alg2(plain) == y).float().mean()):.4f} | {_share(alg2(plain), exact)} |")
    print(f"| Algorithm 2 (exact{', first layer shared' if plain is not None else ''}) | {k_all} | "
          f"{n / exact_s:,.0f} | 1.00x | {float((exact == y).float().mean()):.4f} | 100.00% |")
    for k in (k for k in ks if k < k_all):
        approx = alg2(generator, k)
        t = _timed(lambda: alg2(generator, k), args.repeats)
        print(f"| top-{k} Algorithm 2 | {k} + 1 no-noise pass ({1 - k / k_all:.1%} of rows saved) | {n / t:,.0f} | "
              f"{t / exact_s:.2f}x | {float((approx == y).float().mean()):.4f} | {_share(approx, exact)} |")
    return 0


def _share(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{100 * float((a == b).float().mean()):.2f}%"


def _without_shortcut(generator: nn.Module) -> nn.Module | None:
    """The same generator seen without `sigma_per_class` (None when it has no shortcut to compare against)."""
    if not hasattr(generator, "sigma_per_class"):
        return None
    return lambda inputs: generator(inputs)
