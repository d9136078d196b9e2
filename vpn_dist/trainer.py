"""The one train loop: Algorithm 1 with AMP, per-epoch evaluation, checkpoints and metrics.

`train_loop(cfg)` runs unchanged in this process (world size 1, no Ray), in a Ray Tune trial's process (world size 1,
each epoch reported to Tune) and as a Ray Train worker (`torch.distributed` initialised by Ray, DDP over gloo or
nccl). It is three steps: `setup_training`, then per epoch
`train_epoch` (Algorithm 1, one `TrainStep` per batch) and `end_epoch` (evaluation, Figure 4, checkpoint,
metrics.json).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vpn_dist.checkpoint import TrainState, checkpoint_name
from vpn_dist.config import RunConfig, VPNConfig, resolved_gamma
from vpn_dist.data import Loader, read_meta
from vpn_dist.errors import UserError
from vpn_dist.evaluation import epoch_eval_images, eval_loaders, evaluate_splits
from vpn_dist.method import generate_sigma, isotropic_noise, random_pixel_noise, sample_noise, vpn_loss
from vpn_dist.models import build_models
from vpn_dist.observe import RunLog, hparams_of
from vpn_dist.run_dir import RunDir

FIGURE_IMAGES = 6


# Where a train loop's epoch reports go: RUN_DIR only; RUN_DIR and Ray Tune (a one-process trial); Ray Train.
REPORTS_TO = ("run_dir", "tune", "ray_train")


def pick_device(cfg: RunConfig, reports_to: str = "run_dir") -> torch.device:
    if reports_to == "ray_train" and cfg.dist.gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device is cuda but no GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it; on a CPU, bf16 only where a quick probe finds its matmuls at least
    BF16_MIN_SPEEDUP times faster than fp32's (CPUs differ widely here; docs/benchmarks.md)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "off"


BF16_MIN_SPEEDUP = 1.3  # below this, bf16's rounding is not worth it


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time over bf16 time of a 256x1024 by 1024x1024 matmul on this CPU: medians of 9 interleaved calls after
    10 warm-up calls each (a fresh thread pool runs its first calls several times slower); ~0.1 s, once per process.
    A CPU without bf16 instructions emulates them, tens of times slower than fp32: the second call already shows it,
    and the probe stops there rather than spend seconds on a precise measure of a clear no."""
    operands = {dtype: (torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in operands}
    for call in range(19):
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            times[dtype].append(time.perf_counter() - start)
        speedup = times[torch.float32][-1] / times[torch.bfloat16][-1]
        if call >= 1 and speedup < 1 / BF16_EMULATED_SLOWDOWN:
            return speedup
    return statistics.median(times[torch.float32][10:]) / statistics.median(times[torch.bfloat16][10:])


BF16_EMULATED_SLOWDOWN = 5  # bf16 calls this many times slower than fp32's, once warm: no bf16 in the hardware


def autocast_for(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Noise is reseeded per (seed, epoch, rank): a resumed or recovered run replays the same draws."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{rank}".encode()).digest()[:8], "little")


def trained_base(cfg: RunConfig) -> TrainState:
    """The checkpoint generator-only starts from (paper Table 2): the last epoch of a finished run of this base."""
    trained, _ = RunDir(cfg.train.init_from).require_state()
    planned = trained.config["train"]["epochs"]
    if trained.epoch < planned:  # a base that stopped early would skew Table 2 silently
        raise UserError(f"--init-from {cfg.train.init_from} stopped at epoch {trained.epoch} of {planned}: "
                        f"finish it first (`vpn-dist train --resume {cfg.train.init_from}`)")
    if trained.config["model"]["base"] != cfg.model.base:
        raise UserError(f"--init-from {cfg.train.init_from} holds base {trained.config['model']['base']!r}, "
                        f"not {cfg.model.base!r}")
    return trained


def load_trained_base(cfg: RunConfig, base: nn.Module) -> None:
    """generator-only: the base comes trained from --init-from and stays fixed."""
    trained_base(cfg).restore_models(base, where=f"--init-from {cfg.train.init_from}")
    base.requires_grad_(False)


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]):
    t = cfg.train
    # fused: one kernel per parameter for decay, momentum and update (CPU and GPU), where a per-op loop is slower
    # (docs/benchmarks.md)
    if t.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    else:
        optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=True)
    if t.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return optimizer, scheduler


@dataclass
class TrainStep:
    """Algorithm 1's step, defined once: the train loop runs it, and so does every benchmark that times a step.

    forward: sigma = f(x + gamma*y) within the bound C, m draws eps = sigma * e, logits = h(x + eps), eq. 17's loss
    (the ablations without a generator: their noise, or none); backward through the AMP scaler; the update."""

    base: nn.Module  # what the step calls: DDP-wrapped or compiled where the run says so
    generator: nn.Module | None
    vpn: VPNConfig
    gamma: float
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    skipped: int = 0  # updates the fp16 scaler skipped (an inf or NaN gradient), over the run

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole step on a batch; returns (logits, loss) for the caller's metrics."""
        logits, loss = self.forward(x, y)
        self.backward(loss)
        self.update()
        return logits, loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vpn = self.vpn
        with self.autocast:
            if self.generator is not None:
                sigma = generate_sigma(self.generator, x, y, self.gamma, vpn.bound, vpn.C)  # f(x + gamma y), <= C
                eps = sample_noise(sigma, vpn.m)  # eps_ij = sigma_i * e_ij, e_ij ~ N(0, I)
                inputs = x.repeat(vpn.m, 1, 1, 1) + eps  # the base model sees x + eps, m times
            elif vpn.mode == "random":
                inputs = random_pixel_noise(x, vpn.random_fraction)
            elif vpn.mode == "isotropic":
                inputs = isotropic_noise(x, vpn.noise_std)
            else:
                inputs = x
            logits = self.base(inputs)
            return logits, vpn_loss(logits, y, self.draws)  # eq. 17 (cross-entropy when m = 1)

    @property
    def draws(self) -> int:
        """Noise draws per image: the logits hold this many rows per image."""
        return self.vpn.m if self.generator is not None else 1

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def update(self) -> None:
        # fp16's scaler skips an update whose gradients overflowed; reading its scale waits for the device
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.skipped += int(self.scaler.is_enabled() and self.scaler.get_scale() < scale_before)


class Replica:
    """This process's place among the run's DDP processes (rank, world size), and how its checkpoints and metrics
    leave it (`reports_to`): to RUN_DIR directly (and each epoch's metrics to Ray Tune), or through Ray Train."""

    def __init__(self, reports_to: str):
        self.reports_to = reports_to
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    def report(self, metrics: dict[str, Any], state: TrainState | None, run_dir: RunDir, keep: int) -> None:
        """Save rank 0's checkpoint and publish the epoch's metrics (a barrier across workers under Ray)."""
        if self.reports_to != "ray_train":
            if state is not None:
                state.save(run_dir.checkpoint(metrics["epoch"]))
                run_dir.prune_checkpoints(keep)
            if self.reports_to == "tune":  # ASHA reads it; resuming reads RUN_DIR's checkpoint, so Tune keeps none
                from ray import tune

                tune.report(_scalars(metrics))
            return
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if state is not None:
                state.save(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(_scalars(metrics), checkpoint=checkpoint,
                             checkpoint_dir_name=checkpoint_name(metrics["epoch"]))


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def maybe_inject_fault(cfg: RunConfig, run_dir: RunDir, rank: int, epoch: int, step: int) -> None:
    """Drills: `train.fault = RANK:EPOCH:STEP` kills that rank's process once (a marker file records it)."""
    point = cfg.fault_point()
    marker = run_dir.fault_marker
    if point == (rank, epoch, step) and not marker.exists():
        marker.write_text(f"rank {rank} exited at epoch {epoch} step {step}\n")
        print(f"fault injection: rank {rank} exits at epoch {epoch} step {step}", flush=True)
        os._exit(1)


def train_loop(cfg: RunConfig, *, reports_to: str = "run_dir", invocation: str | None = None) -> dict[str, Any]:
    """Train one run; returns the final metrics (rank 0's are complete).

    reports_to: "run_dir" (a plain process), "tune" (a Ray Tune trial's process: each epoch's metrics to Tune too) or
      "ray_train" (a Ray Train worker: its device, checkpoints and metrics go through Ray Train).
    invocation: one id per `vpn-dist train` call, shared by the restarts Ray makes after a worker failure.
    """
    training = setup_training(cfg, reports_to, invocation)
    try:
        for epoch in range(training.start_epoch, cfg.train.epochs):
            epoch_start = time.perf_counter()
            metrics = train_epoch(training, epoch)
            end_epoch(training, metrics, epoch_start)
        final = run_metrics(cfg, training.history, training.run_dir)  # rank 0 wrote it with the last epoch
    except BaseException:
        training.log.close(failing=True)  # its event file closed now, not at exit: the run directory can be unmounted
        raise
    training.log.close()
    return final


@dataclass
class Training:
    """One worker's training: what `setup_training` builds, and the counters each epoch advances."""

    cfg: RunConfig
    replica: Replica
    run_dir: RunDir
    device: torch.device
    meta: dict[str, Any]
    base: nn.Module  # the plain modules: checkpoints and evaluation read these
    generator: nn.Module | None
    trainable: list[nn.Module]  # what the optimizer updates (not a generator-only run's fixed base)
    step: TrainStep
    scheduler: Any
    train_batches: Loader
    epoch_eval: dict[str, Loader]  # rank 0: per-epoch curves read a fixed subset of each split
    final_eval: dict[str, Loader]  # rank 0: the last epoch reads every image (the final metrics)
    log: RunLog
    start_epoch: int
    history: list[dict[str, Any]]
    global_step: int
    figure_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # Figure 4's images, read once

    @property
    def gamma(self) -> float:
        return self.step.gamma

    def state(self, epoch: int) -> TrainState:
        return TrainState.capture(epoch=epoch, base=self.base, generator=self.generator,
                                  optimizer=self.step.optimizer, scheduler=self.scheduler, scaler=self.step.scaler,
                                  scaler_skipped=self.step.skipped, history=self.history, cfg=self.cfg,
                                  meta=self.meta)


def setup_training(cfg: RunConfig, reports_to: str, invocation: str | None) -> Training:
    """Device, models, optimizer, the state to start from, loaders, and this start's line in attempts.jsonl."""
    replica = Replica(reports_to)
    run_dir = RunDir(cfg.out)
    device = pick_device(cfg, reports_to)
    if reports_to != "run_dir" and device.type == "cpu":  # the CPUs Ray reserved here: more threads oversubscribe
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

    # Where to start: the run directory's newest whole checkpoint. One rule serves --resume (a new invocation) and
    # recovery after a worker failure (Ray restarts this function in the same invocation), in and out of Ray.
    found = run_dir.latest_state()
    start_epoch, history, scaler_skipped = 0, [], 0
    if found is not None:
        state, where = found
        state.restore(base, generator, optimizer, scheduler, scaler, where=where)
        start_epoch, history, scaler_skipped = state.epoch, state.history, state.scaler_skipped
    if cfg.vpn.mode == "generator-only":
        base.eval()  # frozen base: BatchNorm statistics stay those of the trained model too

    # DDP averages gradients of what trains; a frozen base needs no wrapper. torch.compile wraps what the step calls
    # (checkpoints and evaluation keep the plain modules).
    ddp = (lambda mod: DistributedDataParallel(mod) if replica.world_size > 1 and mod in trainable else mod)
    compiled = torch.compile if cfg.train.compile else (lambda mod: mod)
    step = TrainStep(base=compiled(ddp(base)), generator=compiled(ddp(generator)) if generator is not None else None,
                     vpn=cfg.vpn, gamma=resolved_gamma(cfg, meta["num_classes"]), optimizer=optimizer,
                     scaler=scaler, autocast=autocast_for(cfg.train.amp, device), skipped=scaler_skipped)

    loader_args = dict(device=device, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                       os_cache=cfg.data.os_cache, channels_last=cfg.train.channels_last,
                       backend=cfg.data.loader, resolution=cfg.data.resolution)
    train_batches = Loader(cfg.data.path, "train", batch_size=cfg.train.batch_size, train=True,
                           distributed=replica.world_size > 1, augment=cfg.data.augment, **loader_args)
    epoch_eval, final_eval = ({}, {}) if replica.rank != 0 else (
        eval_loaders(cfg, meta, device, images=epoch_eval_images(cfg, meta, replica.world_size)),
        eval_loaders(cfg, meta, device))
    if replica.rank == 0:
        record_attempt(run_dir, invocation, resumed=found is not None, start_epoch=start_epoch,
                       world_size=replica.world_size,
                       provenance={"device": device_name(device), "torch_version": torch.__version__,
                                   "precision": "fp32" if precision == "off" else precision,
                                   "flush_denormal": "on" if flush_denormal else "off"})
    return Training(cfg=cfg, replica=replica, run_dir=run_dir, device=device, meta=meta, base=base,
                    generator=generator, trainable=trainable, step=step, scheduler=scheduler,
                    train_batches=train_batches, epoch_eval=epoch_eval, final_eval=final_eval,
                    log=RunLog(run_dir, enabled=replica.rank == 0), start_epoch=start_epoch, history=history,
                    global_step=start_epoch * len(train_batches))


def check_resumable(cfg: RunConfig, meta: dict[str, Any], state: TrainState, where: Path | None) -> None:
    """--resume, before anything is written: the checkpoint must fit the run as now configured (data, models,
    optimizer, precision), so a refused override leaves config.yaml, and the run, as they were. The same restore the
    run itself will do, into models built on the CPU."""
    trained = state.meta
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
    state.restore(base, generator, optimizer, scheduler, scaler, where=where)


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


def train_epoch(training: Training, epoch: int) -> dict[str, Any]:
    """One epoch of Algorithm 1 over this rank's shard; returns the epoch's training metrics."""
    cfg, rank, step = training.cfg, training.replica.rank, training.step
    torch.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
    training.train_batches.set_epoch(epoch)
    for mod in training.trainable:
        mod.train()
    # Running sums stay on the device, so the host waits for it only every log_every steps and at the end of the
    # epoch (and, under fp16, where the scaler reads its scale: TrainStep.update).
    loss_sum = torch.zeros((), device=training.device)
    correct = torch.zeros((), device=training.device)
    first_bad_step = torch.full((), -1, device=training.device, dtype=torch.long)  # the first non-finite loss, if any
    first_bad_loss = torch.zeros((), device=training.device)
    rows = 0
    progress = training.log.progress(epoch + 1, len(training.train_batches), training.replica.world_size)
    start = time.perf_counter()
    batchnorm = uses_batchnorm(training.trainable)
    for index, (x, y) in enumerate(training.train_batches):
        maybe_inject_fault(cfg, training.run_dir, rank, epoch, index)
        if batchnorm and len(y) == 1:
            # BatchNorm cannot normalise one image (a single value per channel at small feature maps). Every rank
            # holds the same number of images per step, so all ranks leave this step out together.
            continue
        logits, loss = step(x, y)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y.repeat(step.draws)).sum() / step.draws
        diverged_now = (first_bad_step < 0) & ~torch.isfinite(loss.detach())
        first_bad_step = torch.where(diverged_now, index, first_bad_step)
        first_bad_loss = torch.where(diverged_now, loss.detach().float(), first_bad_loss)
        rows += len(y)
        if progress is not None:
            progress.update(len(y))
        training.global_step += 1
        if training.global_step % cfg.train.log_every == 0:
            stop_if_diverged(first_bad_step, first_bad_loss, epoch, rank)
            training.log.step(training.global_step, float(loss.detach()))
    if progress is not None:
        progress.close()
    stop_if_diverged(first_bad_step, first_bad_loss, epoch, rank)
    training.scheduler.step()
    train_time = time.perf_counter() - start
    return {"epoch": epoch + 1, "train_loss": float(loss_sum) / rows, "train_acc": float(correct) / rows,
            "lr": step.optimizer.param_groups[0]["lr"], "scaler_skipped_steps": step.skipped,
            "train_images_per_sec": rows * training.replica.world_size / train_time}


def stop_if_diverged(first_bad_step: torch.Tensor, first_bad_loss: torch.Tensor, epoch: int, rank: int) -> None:
    """Raise, naming the step, once a loss was non-finite (read every log_every steps: one host sync, not one
    per step)."""
    step = int(first_bad_step)
    if step >= 0:
        raise FloatingPointError(f"non-finite loss {float(first_bad_loss)} at epoch {epoch} step {step} (rank {rank}); "
                                 f"lower train.lr or bound sigma with vpn.bound/vpn.C")


def end_epoch(training: Training, metrics: dict[str, Any], epoch_start: float) -> None:
    """Rank 0 evaluates and draws Figure 4 when they are due, then writes the checkpoint and metrics.json (after the
    last epoch, the HParams summary too); every rank reports the epoch (under Ray Train a barrier across workers)."""
    cfg, epoch = training.cfg, metrics["epoch"]
    last = epoch == cfg.train.epochs
    if training.replica.rank == 0 and (last or epoch % cfg.train.eval_every == 0):
        eval_start = time.perf_counter()
        metrics.update(evaluate_splits(training.base, training.generator,
                                       training.final_eval if last else training.epoch_eval,
                                       num_classes=training.meta["num_classes"], gamma=training.gamma,
                                       bound=cfg.vpn.bound, C=cfg.vpn.C, autocast=training.step.autocast,
                                       top_k=cfg.train.alg2_top_k))
        metrics["eval_images"] = "all" if last else training.epoch_eval["test"].num_samples  # per split
        if training.generator is not None and (last or epoch % cfg.train.figure_every == 0):
            if training.figure_batch is None:  # the same images at every epoch, from a loader the curves already read
                training.figure_batch = next(iter(training.epoch_eval["test"]))[:2]
            training.log.figure(epoch, *_figure_inputs(training.generator, *training.figure_batch, training.gamma,
                                                       cfg.vpn.bound, cfg.vpn.C), last=last)
        metrics["eval_time_s"] = time.perf_counter() - eval_start
    metrics["epoch_time_s"] = time.perf_counter() - epoch_start
    training.history.append(metrics)
    training.log.epoch(epoch, metrics)
    state = None
    if training.replica.rank == 0:
        state = training.state(epoch)
        summary = run_metrics(cfg, training.history, training.run_dir)
        training.run_dir.write_metrics(summary)
        if last:  # before the last report: Tune may end a trial's process as soon as it has the last epoch
            training.log.hparams(hparams_of(cfg, training.gamma), summary)
    training.replica.report(metrics, state, training.run_dir, cfg.train.keep_checkpoints)


def record_attempt(run_dir: RunDir, invocation: str | None, *, resumed: bool, start_epoch: int,
                   world_size: int, provenance: dict[str, str]) -> None:
    """attempts.jsonl gets one line per start: fresh, --resume (a checkpoint from an earlier invocation), or
    recovery (Ray restarted the workers of this invocation after a failure); with what can move the numbers
    (PROVENANCE: a resumed run may continue on another machine)."""
    earlier = run_dir.read_attempts()
    reason = "start" if not resumed else (
        "recovery" if any(a.get("invocation") == invocation for a in earlier) else "resume")
    run_dir.record_attempt({"reason": reason, "start_epoch": start_epoch, "time": time.time(),
                            "world_size": world_size, "invocation": invocation,
                            "master_addr": os.environ.get("MASTER_ADDR"), **provenance})


PROVENANCE = ("device", "torch_version", "precision", "flush_denormal")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the vector kernels torch picked on it: the same run can give other
    numbers on other hardware, and two CPUs of one model name can sum in another order (AVX2 against AVX-512)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _figure_inputs(generator: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float, bound: str, C: float | None):
    picks = figure_picks(y).to(y.device)
    x, y = x[picks], y[picks]
    with torch.no_grad():
        was_training = generator.training
        sigma = generate_sigma(generator.eval(), x, y, gamma, bound, C)
        generator.train(was_training)
    return x, sample_noise(sigma, 1), sigma


def figure_picks(y: torch.Tensor) -> torch.Tensor:
    """Figure 4's images from a batch: the first of each class, in batch order, then the next ones, FIGURE_IMAGES in
    all (a test set stored class by class would otherwise show one class)."""
    labels = y.tolist()
    firsts = [labels.index(label) for label in dict.fromkeys(labels)]  # dict: the classes in order of appearance
    shown = set(firsts)
    return torch.tensor((firsts + [i for i in range(len(labels)) if i not in shown])[:FIGURE_IMAGES], dtype=torch.long)


def run_metrics(cfg: RunConfig, history: list[dict[str, Any]], run_dir: RunDir) -> dict[str, Any]:
    """What metrics.json holds: the last epoch's figures, the run's totals, how it got here, and the per-epoch
    history."""
    last = history[-1]
    evaluated = [h for h in history if "test_acc_no_noise" in h]
    latest_eval = evaluated[-1] if evaluated else {}
    attempts = run_dir.read_attempts()
    resumes = [a for a in attempts if a["reason"] == "resume"]
    metrics = {
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
        metrics[key] = " + ".join(dict.fromkeys(str(a.get(key, "unknown")) for a in attempts)) or "unknown"
    for key in ("test_sigma_mean", "test_sigma_max", "test_sigma_frac_at_bound", "test_sigma_bg_auroc",
                "test_sigma_between_image_share", "test_sigma_label_change"):
        if key in latest_eval:
            metrics[key.removeprefix("test_")] = latest_eval[key]
    metrics["history"] = history
    return metrics
