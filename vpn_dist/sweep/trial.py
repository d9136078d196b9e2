"""One trial's RunConfig, for every command that runs trials (tune, reproduce, study): the trial's own values over a
base config, then the command's `--set` and `--epochs`, then where the trial runs and what it reserves."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpn_dist.config import RunConfig, apply_overrides, from_dict, validate


@dataclass(frozen=True)
class TrialResources:
    """What each trial's workers reserve: `workers` of `cpus_per_worker` CPUs each, and with `gpu`
    `gpus_per_trial` GPUs shared by the trial's workers (None: one GPU per worker)."""

    workers: int = 1
    cpus_per_worker: int = 1
    gpu: bool = False
    gpus_per_trial: float | None = None

    @classmethod
    def one_worker(cls, cpus_per_trial: int, gpus_per_trial: float) -> TrialResources:
        """A trial of one worker (reproduce, study): its CPUs, and its GPU share (0: none)."""
        return cls(workers=1, cpus_per_worker=cpus_per_trial, gpu=gpus_per_trial > 0,
                   gpus_per_trial=gpus_per_trial or None)

    @property
    def in_trial_process(self) -> bool:
        """One worker trains in its Tune trial's own process: a Ray Train worker group of one would add only start-up
        (two more processes, a process group of one) and one more place where starting can stall."""
        return self.workers == 1

    @property
    def cpus_per_trial(self) -> int:
        return self.workers * self.cpus_per_worker

    def reserved(self) -> dict[str, float]:
        """The Ray resources of one trial's workers altogether (the sweep driver packs trials by these)."""
        need: dict[str, float] = {"CPU": self.cpus_per_trial}
        if self.gpu:
            need["GPU"] = self.gpus_per_trial or self.workers
        return need


def resolve_config(values: dict[str, Any], *, base: RunConfig | None, overrides: list[str], epochs: int | None,
                   run_dir: str | Path, data_path: str, resources: TrialResources) -> RunConfig:
    """The trial's validated RunConfig: `base` (None: the defaults, or the preset `values` names) < the trial's
    `values` (dotted keys) < `overrides` (--set) < `epochs` (--epochs) < its run directory, data and resources.
    Raises UserError."""
    cfg = apply_overrides(from_dict(values, base), overrides)
    if epochs:
        cfg.train.epochs = epochs
    cfg.out, cfg.data.path = str(run_dir), data_path
    cfg.dist.workers, cfg.dist.cpus_per_worker, cfg.dist.gpu = resources.workers, resources.cpus_per_worker, resources.gpu
    if resources.gpus_per_trial:
        cfg.dist.gpus_per_worker = resources.gpus_per_trial / resources.workers
    return validate(cfg)
