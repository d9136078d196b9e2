"""`vpn-dist bench eval`: what one evaluation pass costs, rule by rule, measured side by side in one run.

Algorithm 2 runs both networks K times per image. The DNN3 generator's first layer is linear in x + gamma*Y,
so it can run once per image instead of once per class (`AbsDNN3.sigma_per_class`); this times Algorithm 2 with
and without that shortcut on the same draws, checks their predictions agree, and times the no-noise rule.
Weights are random: the cost does not depend on them. Figures are medians over --repeats.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from vpn_dist.config import paper_gamma
from vpn_dist.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="1x28x28", help="CxHxW of the images (default 1x28x28, Fashion-MNIST)")
    p.add_argument("--classes", type=int, default=10, help="K (default 10)")
    p.add_argument("--base", default="dnn3")
    p.add_argument("--generator", default="dnn3")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=512, help="evaluation batch (train.eval_batch_size)")
    p.add_argument("--repeats", type=int, default=5)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    from vpn_dist.method import alg2_predict, predict_no_noise
    from vpn_dist.models import build_base, build_generator

    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--shape {args.shape!r}: give CxHxW, e.g. 3x32x32")
    if args.classes < 2 or args.images < 1 or args.batch_size < 1 or args.repeats < 1:
        raise UserError("--classes must be >= 2, and --images, --batch-size, --repeats >= 1")
    torch.manual_seed(0)
    base, generator = build_base(args.base, shape, args.classes).eval(), build_generator(args.generator, shape).eval()
    x = torch.rand(args.images, *shape)
    e = torch.randn(args.images, args.classes, *shape)
    gamma = paper_gamma(args.classes)
    plain = lambda inputs: generator(inputs)  # noqa: E731 - the same generator, without the shortcut
    batches = [(slice(i, i + args.batch_size)) for i in range(0, args.images, args.batch_size)]

    def alg2(gen):
        return torch.cat([alg2_predict(base, gen, x[s], args.classes, gamma, "none", None, e=e[s]) for s in batches])

    no_noise = _timed(lambda: [predict_no_noise(base, x[s]) for s in batches], args.repeats)
    direct = _timed(lambda: alg2(plain), args.repeats)
    agree = float((alg2(plain) == alg2(generator)).float().mean())
    shared = _timed(lambda: alg2(generator), args.repeats) if hasattr(generator, "sigma_per_class") else direct
    n = args.images
    print(f"device cpu, {torch.get_num_threads()} threads; base {args.base}, generator {args.generator}, "
          f"{args.shape}, K = {args.classes}, {n} images, median of {args.repeats}")
    print(f"| rule | images/s | time vs no noise |\n|---|---|---|")
    print(f"| no noise | {n / no_noise:,.0f} | 1.00x |")
    print(f"| Algorithm 2, generator per class | {n / direct:,.0f} | {direct / no_noise:.1f}x |")
    print(f"| Algorithm 2, first layer shared across classes | {n / shared:,.0f} | {shared / no_noise:.1f}x |")
    print(f"shortcut speed-up {direct / shared:.2f}x; predictions identical on {100 * agree:.2f}% of images "
          f"(same draws)")
    return 0
