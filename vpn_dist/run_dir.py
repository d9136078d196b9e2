"""One run directory: every path in it, and reading them back. Every command, benchmark and report goes through here.

```
RUN_DIR/config.yaml                    the run's settings (RunConfig, gamma resolved)
RUN_DIR/metrics.json                   the run so far: final figures, totals, attempts, per-epoch history
RUN_DIR/attempts.jsonl                 one line per start (fresh, --resume, recovery) and the hardware it ran on
RUN_DIR/checkpoints/epoch_NNNN/state.pt  a TrainState per epoch (the newest few; Ray Train's own snapshot beside them)
RUN_DIR/tb/                            TensorBoard (curves, Figure 4 panels, HParams)
RUN_DIR/figure4.png                    the paper's Figure 4 at the last epoch
RUN_DIR/eval.json                      `vpn-dist eval`'s result
RUN_DIR/.vpn-dist.lock, .storage-marker, .fault_injected   one process at a time; the shared-storage check; drills
```
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpn_dist.checkpoint import STATE_FILE, TrainState, checkpoint_name
from vpn_dist.compat import RAY_CHECKPOINT_SNAPSHOT, forget_ray_checkpoints
from vpn_dist.config import RunConfig, load_yaml, resolved_gamma, save_yaml
from vpn_dist.errors import UserError
from vpn_dist.lock import LOCK_FILE, hold_directory
from vpn_dist.observe import write_json_atomic


class RunDir:
    """The run directory at `path` (which need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------ paths

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def attempts(self) -> Path:
        return self.path / "attempts.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def figure4(self) -> Path:
        return self.path / "figure4.png"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def storage_marker(self) -> Path:
        return self.path / ".storage-marker"

    @property
    def fault_marker(self) -> Path:
        return self.path / ".fault_injected"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / checkpoint_name(epoch)

    def hold(self):
        """One process at a time in this directory, for the `with` block (see vpn_dist.lock)."""
        return hold_directory(self.path, "run directory")

    # ------------------------------------------------------------ settings, metrics, attempts

    def read_config(self) -> RunConfig:
        """config.yaml; a UserError when this is no run directory."""
        if not self.path.is_dir():
            raise UserError(f"run directory {self.path} "
                            f"{'is not a directory' if self.path.exists() else 'does not exist'}")
        if not self.config.is_file():
            raise UserError(f"{self.path} is not a run directory (no config.yaml)")
        return load_yaml(self.config)

    def write_config(self, cfg: RunConfig) -> None:
        save_yaml(cfg, self.config)

    def read_metrics(self) -> dict[str, Any] | None:
        """metrics.json, or None before the run's first epoch ended."""
        return json.loads(self.metrics.read_text()) if self.metrics.exists() else None

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.metrics, metrics)

    def write_eval(self, result: dict[str, Any]) -> None:
        write_json_atomic(self.eval, result)

    def read_attempts(self) -> list[dict[str, Any]]:
        if not self.attempts.exists():
            return []
        return [json.loads(line) for line in self.attempts.read_text().splitlines() if line.strip()]

    def record_attempt(self, attempt: dict[str, Any]) -> None:
        with open(self.attempts, "a") as attempts:
            attempts.write(json.dumps(attempt) + "\n")

    # ------------------------------------------------------------ checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        """The complete checkpoint directories, oldest first (Ray's and the in-process path share the layout)."""
        return sorted(p.parent for p in self.checkpoints.glob(f"epoch_*/{STATE_FILE}"))

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint directory (complete: its state.pt is there; it may still not read back)."""
        found = self.checkpoint_dirs()
        return found[-1] if found else None

    def latest_state(self) -> tuple[TrainState, Path] | None:
        """The newest checkpoint that reads back whole, and its directory; one cut short (a crash, a full disk) is
        skipped, saying so."""
        found = self.checkpoint_dirs()
        for directory in reversed(found):
            try:
                state = TrainState.load(directory)
            except UserError as err:
                print(f"skipping checkpoint {directory}: {err}", flush=True)
                continue
            if directory != found[-1]:
                print(f"reading {directory} instead, the newest checkpoint that reads back whole", flush=True)
            return state, directory
        return None

    def require_state(self, what: str = "run directory") -> tuple[TrainState, Path]:
        """latest_state, or a UserError when the run has no checkpoint that reads back whole."""
        found = self.latest_state()
        if found is None:
            if self.latest_checkpoint() is None:
                raise UserError(f"{what} {self.path} has no checkpoint "
                                f"(expected {self.path}/checkpoints/epoch_*/)")
            raise UserError(f"{what} {self.path} has no checkpoint that reads back whole")
        return found

    def has_readable_checkpoint(self) -> bool:
        return any(_readable(directory) for directory in self.checkpoint_dirs())

    def set_aside_unreadable(self) -> None:
        """--resume, once every check has passed: move each checkpoint newer than the newest one that reads back
        whole to checkpoints/unreadable-epoch_NNNN, so the resumed run writes that epoch afresh and every later
        reader finds the same checkpoint. Ray Train's snapshot of the checkpoints goes too when a full disk cut it
        short: Ray would refuse to start from it."""
        snapshot = self.checkpoints / RAY_CHECKPOINT_SNAPSHOT
        try:
            json.loads(snapshot.read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            forget_ray_checkpoints(self.checkpoints)
            print(f"removed {snapshot}, cut short", flush=True)
        for directory in reversed(self.checkpoint_dirs()):
            if _readable(directory):
                return
            aside = directory.with_name(f"unreadable-{directory.name}")
            shutil.rmtree(aside, ignore_errors=True)
            directory.rename(aside)
            forget_ray_checkpoints(self.checkpoints)  # Ray's snapshot names the moved one
            print(f"moved {directory} to {aside}", flush=True)

    def drop_unreadable(self) -> bool:
        """A fresh start in a run directory whose checkpoints all fail to read: remove them (else eval and --resume
        would find them again). Returns False, touching nothing, when one of them reads back whole."""
        found = self.checkpoint_dirs()
        if any(_readable(directory) for directory in found):
            return False
        for directory in found:
            print(f"removing unreadable checkpoint {directory}", flush=True)
            shutil.rmtree(directory, ignore_errors=True)
        return True

    def prune_checkpoints(self, keep: int) -> None:
        """Keep the newest `keep` checkpoints (Ray's CheckpointConfig does this under Ray)."""
        for old in self.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ the trained run

    def trained(self, cfg: RunConfig | None = None, device: torch.device = torch.device("cpu")) -> TrainedRun:
        """The run's models at its newest whole checkpoint, on `device`: the one way to load a trained model.
        cfg: the run's config as the caller adjusted it (another data path, say); config.yaml by default."""
        from vpn_dist.models import build_models

        cfg = cfg or self.read_config()
        state, directory = self.require_state()
        base, generator = build_models(cfg, state.meta, device)
        state.restore_models(base, generator, where=directory / STATE_FILE)
        return TrainedRun(cfg=cfg, state=state, checkpoint=directory, base=base, generator=generator)


@dataclass
class TrainedRun:
    """A finished (or stopped) run's models, with the config and checkpoint they come from."""

    cfg: RunConfig
    state: TrainState
    checkpoint: Path
    base: nn.Module
    generator: nn.Module | None

    @property
    def meta(self) -> dict[str, Any]:
        return self.state.meta

    @property
    def gamma(self) -> float:
        return resolved_gamma(self.cfg, self.meta["num_classes"])

    def check_data(self, meta: dict[str, Any], data: str) -> None:
        """Data given to the trained models must be what they were trained on: the same image shape and classes."""
        trained = self.meta
        if tuple(meta["shape"]) != tuple(trained["shape"]) or meta["num_classes"] != trained["num_classes"]:
            raise UserError(f"data {data} has shape {meta['shape']} and {meta['num_classes']} classes; the run "
                            f"was trained on {trained['shape']} with {trained['num_classes']}")


def _readable(directory: Path) -> bool:
    try:
        TrainState.load(directory)
    except UserError:
        return False
    return True
