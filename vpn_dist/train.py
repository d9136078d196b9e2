"""The one train loop: Algorithm 1 with AMP, per-epoch evaluation, checkpoints and metrics.

`train_loop(cfg)` runs unchanged in this process (world size 1, no Ray) and as a Ray Train worker
(`torch.distributed` initialised by Ray, DDP over gloo or nccl). It is three steps: `setup_run`, then per epoch
`train_epoch` (Algorithm 1) and `end_epoch` (evaluation, Figure 4, checkpoint, metrics.json).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vpn_dist import checkpoint as ckpt
from vpn_dist.config import RunConfig, resolved_gamma
from vpn_dist.data import Loader, input_shape, read_meta
from vpn_dist.errors import UserError
from vpn_dist.evaluate import epoch_eval_images, eval_loaders, evaluate_splits
from vpn_dist.method import generate_sigma, isotropic_noise, random_pixel_noise, sample_noise, vpn_loss
from vpn_dist.models import build_base, build_generator
from vpn_dist.observe import RunLog, write_json_atomic

FIGURE_IMAGES = 6


def pick_device(cfg: RunConfig, using_ray: bool) -> torch.device:
    if using_ray and cfg.dist.gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device is cuda but no GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it; on a CPU, bf16 only where a quick probe finds its matmuls faster than
    fp32's (DNN3/DNN3 step: 1.9x on a Xeon with AMX, 3.3x on a Zen 5 with AVX-512 BF16, but 0.64x on
    issue 9's Xeon; docs/benchmarks.md)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "off"


BF16_MIN_SPEEDUP = 1.3  # below this, bf16's rounding is not worth it


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time over bf16 time of a 256x1024 by 1024x1024 matmul on this CPU: medians of 9 interleaved calls after
    10 warm-up calls each (a fresh thread pool runs its first calls several times slower); ~0.1 s, once per process."""
    operands = {dtype: (torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in operands}
    for call in range(19):
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            if call >= 10:
                times[dtype].append(time.perf_counter() - start)
    return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])


def autocast_for(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Noise is reseeded per (seed, epoch, rank): a resumed or recovered run replays the same draws."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{rank}".encode()).digest()[:8], "little")


def build_models(cfg: RunConfig, meta: dict[str, Any], device: torch.device):
    """The run's base model and generator (None without one), on the device in the configured memory format."""
    shape, num_classes = input_shape(meta, cfg.data.resolution), meta["num_classes"]
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    base = build_base(cfg.model.base, shape, num_classes).to(device, memory_format=memory_format)
    generator = None
    if cfg.model.generator != "none":
        generator = build_generator(cfg.model.generator, shape, cfg.model.generator_init_std)
        generator = generator.to(device, memory_format=memory_format)
    return base, generator


def trained_base(cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint generator-only starts from (paper Table 2): the last epoch of a finished run of this base."""
    trained = ckpt.load_checkpoint(ckpt.require_checkpoint(cfg.train.init_from))
    planned = trained["config"]["train"]["epochs"]
    if trained["epoch"] < planned:  # a base that stopped early would skew Table 2 silently
        raise UserError(f"--init-from {cfg.train.init_from} stopped at epoch {trained['epoch']} of {planned}: "
                        f"finish it first (`vpn-dist train --resume {cfg.train.init_from}`)")
    if trained["config"]["model"]["base"] != cfg.model.base:
        raise UserError(f"--init-from {cfg.train.init_from} holds base {trained['config']['model']['base']!r}, "
                        f"not {cfg.model.base!r}")
    return trained


def load_trained_base(cfg: RunConfig, base: nn.Module) -> None:
    """generator-only: the base comes trained from --init-from and stays fixed."""
    ckpt.restore_models(trained_base(cfg), base, where=f"--init-from {cfg.train.init_from}")
    base.requires_grad_(False)


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]):
    t = cfg.train
    # fused: one kernel per parameter for decay, momentum and update (CPU and GPU); the per-op loop measured
    # 1.18x slower per DNN3/DNN3 step on CPU (docs/benchmarks.md)
    if t.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    else:
        optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=True)
    if t.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return optimizer, scheduler


class Worker:
    """Where this process stands: rank, world size, and how checkpoints and metrics leave it."""

    def __init__(self, using_ray: bool):
        self.using_ray = using_ray
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, run_dir: Path, keep: int) -> None:
        """Save rank 0's checkpoint and publish the epoch's metrics (a barrier across workers under Ray)."""
        name = ckpt.checkpoint_name(metrics["epoch"])
        if not self.using_ray:
            if state is not None:
                ckpt.write_checkpoint(run_dir / "checkpoints" / name, state)
                ckpt.prune_checkpoints(run_dir, keep)
            return
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if state is not None:
                ckpt.write_checkpoint(Path(tmp), state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(_scalars(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def maybe_inject_fault(cfg: RunConfig, run_dir: Path, rank: int, epoch: int, step: int) -> None:
    """Drills: `train.fault = RANK:EPOCH:STEP` kills that rank's process once (a marker file records it)."""
    point = cfg.fault_point()
    marker = run_dir / ".fault_injected"
    if point == (rank, epoch, step) and not marker.exists():
        marker.write_text(f"rank {rank} exited at epoch {epoch} step {step}\n")
        print(f"fault injection: rank {rank} exits at epoch {epoch} step {step}", flush=True)
        os._exit(1)


def train_loop(cfg: RunConfig, *, using_ray: bool = False, invocation: str | None = None) -> dict[str, Any]:
    """Train one run; returns the final metrics (rank 0's are complete).

    using_ray: this process is a Ray Train worker (its device, checkpoints and metrics go through Ray Train).
    invocation: one id per `vpn-dist train` call, shared by the restarts Ray makes after a worker failure.
    """
    run = setup_run(cfg, using_ray, invocation)
    try:
        for epoch in range(run.start_epoch, cfg.train.epochs):
            epoch_start = time.perf_counter()
            metrics = train_epoch(run, epoch)
            end_epoch(run, metrics, epoch_start)
        final = summarize(cfg, run.history, run.run_dir)
        if run.worker.rank == 0:
            write_json_atomic(run.run_dir / "metrics.json", final)
            run.log.hparams(hparams_of(cfg, run.gamma), final)
    except BaseException:
        run.log.close(failing=True)  # its event file closed now, not at exit: the run directory can be unmounted
        raise
    run.log.close()
    return final


@dataclass
class Run:
    """One worker's training: what `setup_run` builds, and the counters each epoch advances."""

    cfg: RunConfig
    worker: Worker
    run_dir: Path
    device: torch.device
    meta: dict[str, Any]
    gamma: float
    base: nn.Module
    generator: nn.Module | None
    trainable: list[nn.Module]  # what the optimizer updates (not a generator-only run's fixed base)
    base_step: nn.Module  # the modules the training step calls: DDP-wrapped when they train on several workers
    generator_step: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    train_batches: Loader
    epoch_eval: dict[str, Loader]  # rank 0: per-epoch curves read a fixed subset of each split
    final_eval: dict[str, Loader]  # rank 0: the last epoch reads every image (the final metrics)
    log: RunLog
    start_epoch: int
    history: list[dict[str, Any]]
    scaler_skipped: int
    global_step: int
    figure_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # Figure 4's images, read once


def setup_run(cfg: RunConfig, using_ray: bool, invocation: str | None) -> Run:
    """Device, models, optimizer, the state to start from, loaders, and this start's line in attempts.jsonl."""
    worker = Worker(using_ray)
    run_dir = Path(cfg.out)
    device = pick_device(cfg, using_ray)
    if using_ray and device.type == "cpu":  # the CPUs Ray reserved for this worker: more threads only oversubscribe
        torch.set_num_threads(cfg.dist.cpus_per_worker)
    flush_denormal = False
    if device.type == "cpu":
        # Flush subnormal floats (< 1.2e-38) to zero, as GPUs do: Adam's moments of weights that see no gradient
        # (Fashion-MNIST's blank border) decay into that range, where CPU arithmetic is much slower
        # (docs/benchmarks.md). This thread's setting; the OpenMP threads it starts later inherit it.
        flush_denormal = torch.set_flush_denormal(True)  # False where the CPU cannot
    meta = read_meta(cfg.data.path)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    base, generator = build_models(cfg, meta, device)
    if cfg.vpn.mode == "generator-only":
        load_trained_base(cfg, base)
    trainable = [mod for mod in (base, generator) if mod is not None and any(p.requires_grad for p in mod.parameters())]
    optimizer, scheduler = make_optimizer(cfg, [p for mod in trainable for p in mod.parameters()])
    precision = resolve_amp(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # Where to start: the run directory's newest checkpoint. One rule serves --resume (a new invocation) and
    # recovery after a worker failure (Ray restarts this function in the same invocation), in and out of Ray.
    state = ckpt.load_latest(run_dir)
    start_epoch, history, scaler_skipped = 0, [], 0
    if state is not None:
        restore_state(state, ckpt.latest_checkpoint(run_dir), base, generator, optimizer, scheduler, scaler)
        start_epoch, history, scaler_skipped = state["epoch"], state["history"], state["scaler_skipped"]
    if cfg.vpn.mode == "generator-only":
        base.eval()  # frozen base: BatchNorm statistics stay those of the trained model too

    # DDP averages gradients of what trains; a frozen base needs no wrapper. torch.compile wraps what the step calls
    # (checkpoints and evaluation keep the plain modules).
    ddp = (lambda mod: DistributedDataParallel(mod) if worker.world_size > 1 and mod in trainable else mod)
    compiled = torch.compile if cfg.train.compile else (lambda mod: mod)
    base_step = compiled(ddp(base))
    generator_step = compiled(ddp(generator)) if generator is not None else None

    loader_args = dict(device=device, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                       os_cache=cfg.data.os_cache, channels_last=cfg.train.channels_last,
                       backend=cfg.data.loader, resolution=cfg.data.resolution)
    train_batches = Loader(cfg.data.path, "train", batch_size=cfg.train.batch_size, train=True,
                           distributed=worker.world_size > 1, augment=cfg.data.augment, **loader_args)
    epoch_eval, final_eval = ({}, {}) if worker.rank != 0 else (
        eval_loaders(cfg, meta, device, images=epoch_eval_images(cfg, meta, worker.world_size)),
        eval_loaders(cfg, meta, device))
    if worker.rank == 0:
        record_attempt(run_dir, invocation, resumed=state is not None, start_epoch=start_epoch,
                       world_size=worker.world_size,
                       provenance={"device": device_name(device), "torch_version": torch.__version__,
                                   "precision": "fp32" if precision == "off" else precision,
                                   "flush_denormal": "on" if flush_denormal else "off"})
    return Run(cfg=cfg, worker=worker, run_dir=run_dir, device=device, meta=meta,
               gamma=resolved_gamma(cfg, meta["num_classes"]), base=base, generator=generator, trainable=trainable,
               base_step=base_step, generator_step=generator_step,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast_for(cfg.train.amp, device),
               train_batches=train_batches, epoch_eval=epoch_eval, final_eval=final_eval,
               log=RunLog(run_dir, enabled=worker.rank == 0), start_epoch=start_epoch, history=history,
               scaler_skipped=scaler_skipped, global_step=start_epoch * len(train_batches))


def restore_state(state: dict[str, Any], where: Path | None, base: nn.Module, generator: nn.Module | None,
                  optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> None:
    """A checkpoint's weights and optimizer, scheduler and scaler state into a freshly set-up run; a UserError when
    they do not fit it (another model, optimizer or precision than the checkpoint's)."""
    ckpt.restore_models(state, base, generator, where=where)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise UserError(f"{where}: its optimizer state does not fit this run ({type(err).__name__}: {err})") from None


def check_resumable(cfg: RunConfig, meta: dict[str, Any], state: dict[str, Any], where: Path | None) -> None:
    """--resume, before anything is written: the checkpoint must fit the run as now configured (data, models,
    optimizer, precision), so a refused override leaves config.yaml, and the run, as they were. The same restore the
    run itself will do, into models built on the CPU."""
    trained = state["meta"]
    if list(trained["shape"]) != list(meta["shape"]) or trained["num_classes"] != meta["num_classes"]:
        raise UserError(f"{where} was trained on images of shape {trained['shape']} with {trained['num_classes']} "
                        f"classes; data {cfg.data.path} has {meta['shape']} and {meta['num_classes']}")
    cpu = torch.device("cpu")
    base, generator = build_models(cfg, meta, cpu)
    if cfg.vpn.mode == "generator-only":
        base.requires_grad_(False)
    trainable = [mod for mod in (base, generator) if mod is not None and any(p.requires_grad for p in mod.parameters())]
    optimizer, scheduler = make_optimizer(cfg, [p for mod in trainable for p in mod.parameters()])
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.train.amp == "fp16")  # "auto" never resolves to fp16
    restore_state(state, where, base, generator, optimizer, scheduler, scaler)


def uses_batchnorm(modules: list[nn.Module]) -> bool:
    return any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for mod in modules for layer in mod.modules())


def check_batch_size(cfg: RunConfig, meta: dict[str, Any]) -> None:
    """BatchNorm in training needs two images per batch (one image at a 1x1 feature map is a single value per channel,
    which BatchNorm refuses): refuse a run whose every batch holds one image before it starts. A last batch of one is
    left out of its epoch instead (train_epoch)."""
    shard = -(-meta["splits"]["train"] // max(cfg.dist.workers, 1))  # each rank's images per epoch
    if min(cfg.train.batch_size, shard) > 1:
        return
    with torch.device("meta"):  # shapes only: nothing allocated
        base, generator = build_models(cfg, meta, torch.device("meta"))
    trains = [generator] if cfg.vpn.mode == "generator-only" else [base, generator]
    if uses_batchnorm([mod for mod in trains if mod is not None]):
        raise UserError(f"the BatchNorm layers of {cfg.model.base}/{cfg.model.generator} need at least 2 images per "
                        f"batch in training, and this run has one (train.batch_size {cfg.train.batch_size}, "
                        f"{shard} train image(s) per worker): give --set train.batch_size=2 or more, and at least 2 "
                        f"train images per worker")


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One epoch of Algorithm 1 over this rank's shard; returns the epoch's training metrics."""
    cfg, vpn, rank = run.cfg, run.cfg.vpn, run.worker.rank
    base, generator, optimizer, scaler = run.base_step, run.generator_step, run.optimizer, run.scaler
    torch.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
    run.train_batches.set_epoch(epoch)
    for mod in run.trainable:
        mod.train()
    draws = vpn.m if generator is not None else 1
    # Running sums stay on the device: the step never waits for the device (no .item() per step); the host reads
    # them every log_every steps and at the end of the epoch.
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device)
    first_bad_step = torch.full((), -1, device=run.device, dtype=torch.long)  # the first non-finite loss, if any
    first_bad_loss = torch.zeros((), device=run.device)
    rows = 0
    progress = run.log.progress(epoch + 1, len(run.train_batches), run.worker.world_size)
    start = time.perf_counter()
    batchnorm = uses_batchnorm(run.trainable)
    for step, (x, y) in enumerate(run.train_batches):
        maybe_inject_fault(cfg, run.run_dir, rank, epoch, step)
        if batchnorm and len(y) == 1:
            # BatchNorm cannot normalise one image (a single value per channel at small feature maps). Every rank
            # holds the same number of images per step, so all ranks leave this step out together.
            continue
        with run.autocast:
            logits, loss = step_loss(base, generator, x, y, vpn, run.gamma)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
        scaler.step(optimizer)
        scaler.update()
        run.scaler_skipped += int(scaler.is_enabled() and scaler.get_scale() < scale_before)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y.repeat(draws)).sum() / draws
        diverged_now = (first_bad_step < 0) & ~torch.isfinite(loss.detach())
        first_bad_step = torch.where(diverged_now, step, first_bad_step)
        first_bad_loss = torch.where(diverged_now, loss.detach().float(), first_bad_loss)
        rows += len(y)
        if progress is not None:
            progress.update(len(y))
        run.global_step += 1
        if run.global_step % cfg.train.log_every == 0:
            stop_if_diverged(first_bad_step, first_bad_loss, epoch, rank)
            run.log.step(run.global_step, float(loss.detach()))
    if progress is not None:
        progress.close()
    stop_if_diverged(first_bad_step, first_bad_loss, epoch, rank)
    run.scheduler.step()
    train_time = time.perf_counter() - start
    return {"epoch": epoch + 1, "train_loss": float(loss_sum) / rows, "train_acc": float(correct) / rows,
            "lr": optimizer.param_groups[0]["lr"], "scaler_skipped_steps": run.scaler_skipped,
            "train_images_per_sec": rows * run.worker.world_size / train_time}


def step_loss(base: nn.Module, generator: nn.Module | None, x: torch.Tensor, y: torch.Tensor, vpn, gamma: float):
    """The forward half of a training step: (logits, loss). With a generator it is Algorithm 1's."""
    if generator is not None:
        sigma = generate_sigma(generator, x, y, gamma, vpn.bound, vpn.C)  # Sigma = f(x + gamma y), <= C
        eps = sample_noise(sigma, vpn.m)  # eps_ij = sigma_i * e_ij, e_ij ~ N(0, I)
        inputs = x.repeat(vpn.m, 1, 1, 1) + eps  # the base model sees x + eps, m times
    elif vpn.mode == "random":
        inputs = random_pixel_noise(x, vpn.random_fraction)
    elif vpn.mode == "isotropic":
        inputs = isotropic_noise(x, vpn.noise_std)
    else:
        inputs = x
    logits = base(inputs)
    return logits, vpn_loss(logits, y, vpn.m if generator is not None else 1)  # eq. 17 (cross-entropy when m = 1)


def stop_if_diverged(first_bad_step: torch.Tensor, first_bad_loss: torch.Tensor, epoch: int, rank: int) -> None:
    """Raise, naming the step, once a loss was non-finite (read every log_every steps: one host sync, not one
    per step)."""
    step = int(first_bad_step)
    if step >= 0:
        raise FloatingPointError(f"non-finite loss {float(first_bad_loss)} at epoch {epoch} step {step} (rank {rank}); "
                                 f"lower train.lr or bound sigma with vpn.bound/vpn.C")


def end_epoch(run: Run, metrics: dict[str, Any], epoch_start: float) -> None:
    """Rank 0 evaluates and draws Figure 4 when they are due, then writes the checkpoint and metrics.json; every rank
    reports the epoch (under Ray a barrier across workers)."""
    cfg, epoch = run.cfg, metrics["epoch"]
    last = epoch == cfg.train.epochs
    if run.worker.rank == 0 and (last or epoch % cfg.train.eval_every == 0):
        eval_start = time.perf_counter()
        metrics.update(evaluate_splits(run.base, run.generator, run.final_eval if last else run.epoch_eval,
                                       num_classes=run.meta["num_classes"], gamma=run.gamma, bound=cfg.vpn.bound,
                                       C=cfg.vpn.C, autocast=run.autocast, top_k=cfg.train.alg2_top_k))
        metrics["eval_images"] = "all" if last else run.epoch_eval["test"].num_samples  # per split
        if run.generator is not None and (last or epoch % cfg.train.figure_every == 0):
            if run.figure_batch is None:  # the same images at every epoch, from a loader the curves already read
                run.figure_batch = next(iter(run.epoch_eval["test"]))[:2]
            run.log.figure(epoch, *_figure_inputs(run.generator, *run.figure_batch, run.gamma, cfg.vpn.bound,
                                                  cfg.vpn.C), last=last)
        metrics["eval_time_s"] = time.perf_counter() - eval_start
    metrics["epoch_time_s"] = time.perf_counter() - epoch_start
    run.history.append(metrics)
    run.log.epoch(epoch, metrics)
    state = None
    if run.worker.rank == 0:
        state = {"epoch": epoch, "base": run.base.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "generator": run.generator.state_dict() if run.generator is not None else None,
                 "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
                 "scaler_skipped": run.scaler_skipped, "history": run.history, "config": cfg.to_dict(),
                 "gamma": run.gamma, "meta": run.meta}
        write_json_atomic(run.run_dir / "metrics.json", summarize(cfg, run.history, run.run_dir))
    run.worker.report(metrics, state, run.run_dir, cfg.train.keep_checkpoints)


def record_attempt(run_dir: Path, invocation: str | None, *, resumed: bool, start_epoch: int,
                   world_size: int, provenance: dict[str, str]) -> None:
    """attempts.jsonl gets one line per start: fresh, --resume (a checkpoint from an earlier invocation), or
    recovery (Ray restarted the workers of this invocation after a failure); with what can move the numbers
    (PROVENANCE: a resumed run may continue on another machine)."""
    earlier = _read_attempts(run_dir)
    reason = "start" if not resumed else (
        "recovery" if any(a.get("invocation") == invocation for a in earlier) else "resume")
    with open(run_dir / "attempts.jsonl", "a") as attempts:
        attempts.write(json.dumps({"reason": reason, "start_epoch": start_epoch, "time": time.time(),
                                   "world_size": world_size, "invocation": invocation,
                                   "master_addr": os.environ.get("MASTER_ADDR"), **provenance}) + "\n")


PROVENANCE = ("device", "torch_version", "precision", "flush_denormal")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model: the same run can give other numbers on other hardware."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _figure_inputs(generator: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float, bound: str, C: float | None):
    x, y = x[:FIGURE_IMAGES], y[:FIGURE_IMAGES]
    with torch.no_grad():
        was_training = generator.training
        sigma = generate_sigma(generator.eval(), x, y, gamma, bound, C)
        generator.train(was_training)
    return x, sample_noise(sigma, 1), sigma


def _read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def hparams_of(cfg: RunConfig, gamma: float) -> dict[str, Any]:
    init = "none" if cfg.model.generator == "none" else str(cfg.model.generator_init_std or "authors")
    return {"base": cfg.model.base, "generator": cfg.model.generator, "mode": cfg.vpn.mode, "gamma": gamma,
            "m": cfg.vpn.m, "bound": cfg.vpn.bound, "C": cfg.vpn.C if cfg.vpn.C is not None else 0.0,
            "lr": cfg.train.lr, "optimizer": cfg.train.optimizer, "weight_decay": cfg.train.weight_decay,
            "generator_init_std": init, "seed": cfg.train.seed, "batch_size": cfg.train.batch_size,
            "amp": cfg.train.amp, "workers": max(cfg.dist.workers, 1)}


def summarize(cfg: RunConfig, history: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """metrics.json: the last epoch's figures, the run's totals, how it got here, and the per-epoch history."""
    last = history[-1]
    evaluated = [h for h in history if "test_acc_no_noise" in h]
    latest_eval = evaluated[-1] if evaluated else {}
    attempts = _read_attempts(run_dir)
    resumes = [a for a in attempts if a["reason"] == "resume"]
    summary = {
        "test_acc_alg2": latest_eval.get("test_acc_alg2"),
        "test_acc_no_noise": latest_eval.get("test_acc_no_noise"),
        "val_acc_alg2": latest_eval.get("val_acc_alg2"),
        "val_acc_no_noise": latest_eval.get("val_acc_no_noise"),
        "val_acc": latest_eval.get("val_acc"),  # the selection metric (Algorithm 2, or no-noise without generator)
        "test_acc": latest_eval.get("test_acc"),
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "epochs_completed": last["epoch"],
        "epochs_planned": cfg.train.epochs,
        "wall_time_s": sum(h["epoch_time_s"] for h in history),  # training + evaluation, over every attempt
        "train_images_per_sec": sum(h["train_images_per_sec"] for h in history) / len(history),
        "scaler_skipped_steps": last["scaler_skipped_steps"],
        "resumed": bool(resumes),
        "resumed_from_epoch": resumes[-1]["start_epoch"] if resumes else None,
        "worker_restarts": sum(a["reason"] == "recovery" for a in attempts),
        "attempts": attempts,
    }
    for key in PROVENANCE:  # every attempt's value, in order ("a + b" where a resume moved to other hardware)
        summary[key] = " + ".join(dict.fromkeys(str(a.get(key, "unknown")) for a in attempts)) or "unknown"
    for key in ("test_sigma_mean", "test_sigma_max", "test_sigma_frac_at_bound", "test_sigma_bg_auroc",
                "test_sigma_between_image_share", "test_sigma_label_change"):
        if key in latest_eval:
            summary[key.removeprefix("test_")] = latest_eval[key]
    summary["history"] = history
    return summary
