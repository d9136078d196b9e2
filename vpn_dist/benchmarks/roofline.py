"""`vpn-dist bench roofline`: a training step and an evaluation pass against this device's own peak.

FLOPs are counted by torch.utils.flop_counter (matmuls and convolutions, forward and backward), not by hand. The
peak is measured on the spot at the run's dtype: a GEMM and a 3x3 convolution, each the best of a few sizes.
The roofline time of a workload is its matmul FLOPs at the GEMM peak plus its convolution FLOPs at the conv peak;
the achieved fraction is that time over the measured one. Batches are in memory on the device (no loader), so the
figures are the compute path's; `vpn-dist bench train` adds the loader. Times are medians over --steps.

Where the rest goes: the step's own matmuls are recorded (shapes, strides, dtype) and replayed alone. Their time
splits the gap to the roofline into matmuls slower at the step's shapes than the square-GEMM peak, and time spent
outside matmuls (optimizer, elementwise ops, noise draws, Python).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from vpn_dist.config import choices_of
from vpn_dist.errors import UserError

CONV_OPS = ("convolution",)  # aten.convolution and aten.convolution_backward; every other counted op is a matmul


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="1x28x28", help="CxHxW (default 1x28x28, Fashion-MNIST; 3x32x32: CIFAR-10)")
    p.add_argument("--classes", type=int, default=10, help="K (default 10)")
    p.add_argument("--base", default="dnn3")
    p.add_argument("--generator", default="dnn3", choices=choices_of("model.generator"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--amp", default="auto", choices=choices_of("train.amp"))
    p.add_argument("--device", default="auto", choices=choices_of("train.device"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the step's models")
    p.add_argument("--optimizer", default="sgd", choices=choices_of("train.optimizer"))
    p.add_argument("--m", type=int, default=1, help="noise draws per image (vpn.m, default 1)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn) -> tuple[float, float]:
    """(matmul FLOPs, convolution FLOPs) of one call, by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    matmul = conv = 0.0
    for op, flops in counter.get_flop_counts()["Global"].items():
        if any(name in str(op) for name in CONV_OPS):
            conv += flops
        else:
            matmul += flops
    return matmul, conv


MATMUL_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


class RecordMatmuls(TorchDispatchMode):
    """Records every matmul a call runs as (op, [(shape, stride, dtype) or value per argument]), below autograd and
    autocast, so the backward's transposed operands and autocast's dtypes are what is recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMUL_OPS:
            self.calls.append((func, [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                                      for a in args]))
        return func(*args, **(kwargs or {}))


def matmul_replay(calls, device: torch.device):
    """A function that runs the recorded matmuls again, on random operands with the same shapes, strides and dtypes."""
    def operand(spec):
        if not isinstance(spec, tuple):
            return spec
        shape, stride, dtype = spec
        extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
        return torch.randn(extent, device=device).to(dtype).as_strided(shape, stride)

    replays = [(func, [operand(a) for a in specs]) for func, specs in calls]
    return lambda: [func(*operands) for func, operands in replays]


def measure_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(GEMM, 3x3 conv) FLOP/s at `dtype`, each the best of a few sizes (and of both memory formats for the conv),
    measured now."""
    gemm = 0.0
    for n in (1024, 2048, 4096 if device.type == "cuda" else 1536):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        gemm = max(gemm, 2 * n**3 / median_time(lambda: a @ b, device, steps=5, warmup=2))
    conv = 0.0
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for channels, size, batch in ((64, 32, 128), (128, 16, 256), (256, 8, 256), (512, 4, 256)):
            layer = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype,
                                                                                      memory_format=memory_format)
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).to(memory_format=memory_format)
            flops = 2 * batch * channels * channels * 9 * size * size
            with torch.no_grad():
                conv = max(conv, flops / median_time(lambda: layer(x), device, steps=3, warmup=1))
    return gemm, conv


def run(args: argparse.Namespace) -> int:
    from vpn_dist.benchmarks.evaluation import parse_shape
    from vpn_dist.config import RunConfig, paper_gamma
    from vpn_dist.method import alg2_predict
    from vpn_dist.models import build_base, build_generator
    from vpn_dist.trainer import TrainStep, autocast_for, make_optimizer, resolve_amp

    shape = parse_shape(args.shape)
    if args.classes < 2 or args.batch_size < 1 or args.eval_batch_size < 1 or args.steps < 1 or args.m < 1:
        raise UserError("--classes must be >= 2, and --batch-size, --eval-batch-size, --steps, --m >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    amp = resolve_amp(args.amp, device)
    dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    cfg = RunConfig()
    cfg.train.optimizer = args.optimizer
    cfg.vpn.mode = "joint" if args.generator != "none" else "baseline"
    cfg.vpn.m = args.m
    base = build_base(args.base, shape, args.classes).to(device, memory_format=memory_format)
    generator = None if args.generator == "none" else build_generator(args.generator, shape).to(
        device, memory_format=memory_format)
    models = [m for m in (base, generator) if m is not None]
    optimizer, _ = make_optimizer(cfg, [p for m in models for p in m.parameters()])
    autocast = autocast_for(amp, device)
    gamma = paper_gamma(args.classes)
    eager = TrainStep(base, generator, cfg.vpn, gamma, optimizer,
                      torch.amp.GradScaler(device.type, enabled=amp == "fp16"), autocast)
    compiled = torch.compile if args.compile else (lambda mod: mod)
    step = dataclasses.replace(eager, base=compiled(base),
                               generator=compiled(generator) if generator is not None else None)
    # the same optimizer as a loop of per-parameter ops (PyTorch's CPU default)
    looped = dataclasses.replace(step, optimizer=type(optimizer)(
        optimizer.param_groups[0]["params"], **{**optimizer.defaults, "fused": False, "foreach": False}))
    x = torch.rand(args.batch_size, *shape, device=device).to(memory_format=memory_format)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)
    x_eval = torch.rand(args.eval_batch_size, *shape, device=device).to(memory_format=memory_format)

    def forward_backward(train_step: TrainStep = step):
        train_step.backward(train_step.forward(x, y)[1])

    def eval_pass():  # one evaluation batch by both rules, as `evaluate` runs them
        with torch.no_grad(), autocast:
            base(x_eval).argmax(dim=1)
            if generator is not None:
                alg2_predict(base, generator, x_eval, args.classes, gamma, "none", None)

    for m in models:
        m.train()
    step_mm, step_conv = count_flops(lambda: forward_backward(eager))  # eager: the counter's hooks
    with RecordMatmuls() as recorded:
        forward_backward(eager)
    step_s = median_time(lambda: step(x, y), device, args.steps)
    eager_s = median_time(lambda: eager(x, y), device, args.steps) if args.compile else None  # the same run's baseline
    matmuls_alone_s = median_time(matmul_replay(recorded.calls, device), device, args.steps)
    looped_s = median_time(lambda: looped(x, y), device, args.steps)
    fwd_bwd_s = median_time(forward_backward, device, args.steps)
    for m in models:
        m.eval()
    eval_mm, eval_conv = count_flops(eval_pass)
    eval_s = median_time(eval_pass, device, max(3, args.steps // 4))
    gemm_peak, conv_peak = measure_peaks(device, dtype)

    name = torch.cuda.get_device_name() if device.type == "cuda" else (
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; {args.base} base, {args.generator} "
          f"generator, m = {args.m}, {args.shape}, K = {args.classes}, batch {args.batch_size} (eval "
          f"{args.eval_batch_size}), {args.optimizer}, channels_last {args.channels_last}, compile {args.compile}")
    print(f"measured peak: GEMM {gemm_peak / 1e9:,.0f} GFLOP/s, 3x3 conv {conv_peak / 1e9:,.0f} GFLOP/s")
    print("| workload | FLOPs per image (matmul + conv) | images/s | achieved GFLOP/s | fraction of roofline |")
    print("|---|---|---|---|---|")
    for label, mm, cv, seconds, images in (
            ("training step (forward, backward, fused optimizer)", step_mm, step_conv, step_s, args.batch_size),
            ("training step, optimizer as a per-parameter loop", step_mm, step_conv, looped_s, args.batch_size),
            ("training step without the optimizer", step_mm, step_conv, fwd_bwd_s, args.batch_size),
            ("evaluation (no noise + Algorithm 2)", eval_mm, eval_conv, eval_s, args.eval_batch_size)):
        roofline_s = mm / gemm_peak + cv / conv_peak
        print(f"| {label} | {(mm + cv) / images / 1e6:,.1f} M ({mm / images / 1e6:,.1f} + {cv / images / 1e6:,.1f}) "
              f"| {images / seconds:,.0f} | {(mm + cv) / seconds / 1e9:,.0f} | {roofline_s / seconds:.0%} |")
    if eager_s is not None:
        print(f"compiled step {eager_s / step_s:.2f}x the eager one ({args.batch_size / eager_s:,.0f} images/s eager)")
    print(f"optimizer share of the step: {1 - fwd_bwd_s / step_s:.0%} fused, {1 - fwd_bwd_s / looped_s:.0%} looped; "
          f"fused step {looped_s / step_s:.2f}x the looped one")
    print(f"where the step's time goes: its {len(recorded.calls)} matmuls, replayed alone at their own shapes and "
          f"layouts, take {matmuls_alone_s / step_s:.0%} of it and run at {step_mm / gemm_peak / matmuls_alone_s:.0%} "
          f"of the GEMM peak; the other {max(0.0, 1 - matmuls_alone_s / step_s):.0%} is outside matmuls "
          f"({'convolutions, ' if step_conv else ''}optimizer, elementwise ops, noise draws, Python)")
    return 0

