"""`vpn-dist bench subnormal --run DIR`: a run's training step on the CPU, from its newest checkpoint (models and
optimizer state), with IEEE subnormal floats and with them flushed to zero, measured side by side on one thread
(a 1-CPU trial; the flush is per thread, and an OpenMP team keeps the setting its threads started with).

Adam's moments of weights that see no gradient (Fashion-MNIST's blank border pixels, dead units) decay into the
subnormal range (< 1.2e-38), where CPU arithmetic takes a slow path. vpn-dist's training thread flushes them
(`torch.set_flush_denormal`, as GPUs do); this shows what that is worth on a given run. Each timed block starts
from the checkpoint's state again, so both settings see the same subnormals.
"""
from __future__ import annotations

import argparse
import statistics
import time

from vpn_dist.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a run directory with a checkpoint (e.g. an Adam run past epoch 5)")
    p.add_argument("--steps", type=int, default=20, help="training steps per timed block (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per setting, interleaved (default 5)")


def subnormals(tensors) -> tuple[int, int]:
    """(subnormal entries, all entries) over float tensors."""
    import torch

    tiny = torch.finfo(torch.float32).tiny
    floats = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return (sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in floats), sum(t.numel() for t in floats))


def run(args: argparse.Namespace) -> int:
    import torch

    from vpn_dist.run_dir import RunDir
    from vpn_dist.trainer import TrainStep, make_optimizer

    if args.steps < 1 or args.repeats < 1:
        raise UserError("--steps and --repeats must be >= 1")
    torch.set_num_threads(1)
    trained = RunDir(args.run).trained()
    cfg, state, base, generator = trained.cfg, trained.state, trained.base, trained.generator
    if cfg.vpn.mode == "generator-only":
        base.requires_grad_(False)
    trainable = [mod for mod in (base, generator) if mod is not None and any(p.requires_grad for p in mod.parameters())]
    optimizer, _ = make_optimizer(cfg, [p for mod in trainable for p in mod.parameters()])
    step = TrainStep(base, generator, cfg.vpn, trained.gamma, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    x = torch.rand(cfg.train.batch_size, *state.meta["shape"])
    y = torch.randint(0, state.meta["num_classes"], (cfg.train.batch_size,))

    def restore() -> None:  # the checkpoint's weights and moments, subnormals included
        state.restore_models(base, generator, where=trained.checkpoint)
        optimizer.load_state_dict(state.optimizer)

    restore()
    moments = subnormals(v for s in optimizer.state.values() for v in s.values())
    weights = subnormals(p.detach() for p in optimizer.param_groups[0]["params"])
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for flush in (False, True):
            restore()
            torch.set_flush_denormal(flush)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            rates[flush].append(args.steps * len(y) / (time.perf_counter() - start))
    torch.set_flush_denormal(False)
    ieee, flushed = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"{args.run}: epoch {state.epoch}, {cfg.model.base} base, {cfg.model.generator} generator, "
          f"{cfg.train.optimizer}, batch {len(y)}, {torch.get_num_threads()} threads")
    print(f"subnormal entries: optimizer state {moments[0]:,} of {moments[1]:,}; weights {weights[0]:,} of "
          f"{weights[1]:,}")
    print("| floats | train images/s (median) | range |")
    print("|---|---|---|")
    for name, flush in (("IEEE subnormals", False), ("flushed to zero (vpn-dist)", True)):
        print(f"| {name} | {statistics.median(rates[flush]):,.0f} | {min(rates[flush]):,.0f}-{max(rates[flush]):,.0f} |")
    print(f"\nflushed / IEEE: {flushed / ieee:.2f}x")
    return 0
