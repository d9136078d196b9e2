"""What a checkpoint holds: `TrainState`, saved as `RUN_DIR/checkpoints/epoch_NNNN/state.pt` in and out of Ray.

Which checkpoints a run has, and which of them is the newest whole one, is the run directory's business (`RunDir`).
"""
from __future__ import annotations

import dataclasses
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpn_dist.config import RunConfig, resolved_gamma
from vpn_dist.errors import UserError
from vpn_dist.observe import write_atomic

STATE_FILE = "state.pt"


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


@dataclass
class TrainState:
    """A run at the end of an epoch: what a resumed, recovered or evaluated run starts from. On disk a plain dict
    whose keys are these fields' names (torch.save), so every checkpoint written before this class reads back."""

    epoch: int
    base: dict[str, Any]  # state_dicts
    generator: dict[str, Any] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    scaler_skipped: int  # updates the fp16 scaler skipped (an inf or NaN gradient) over the whole run
    history: list[dict[str, Any]]  # every epoch's metrics
    meta: dict[str, Any]  # the data's shape, classes and splits (`read_meta`)
    config: dict[str, Any] | None = None  # the run's RunConfig, as a dict
    gamma: float | None = None  # the conditioning scale the run trained with (its config's, resolved)

    @classmethod
    def capture(cls, *, epoch: int, base: nn.Module, generator: nn.Module | None, optimizer: torch.optim.Optimizer,
                scheduler: Any, scaler: torch.amp.GradScaler, scaler_skipped: int, history: list[dict[str, Any]],
                cfg: RunConfig, meta: dict[str, Any]) -> TrainState:
        """The state of a training run now (references, not copies: save it before the next step)."""
        return cls(epoch=epoch, base=base.state_dict(), generator=generator.state_dict() if generator else None,
                   optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                   scaler_skipped=scaler_skipped, history=history, meta=meta, config=cfg.to_dict(),
                   gamma=resolved_gamma(cfg, meta["num_classes"]))

    def save(self, directory: Path) -> Path:
        """Write DIRECTORY/state.pt under a temporary name, then rename: a crash never leaves a checkpoint that looks
        whole, and a write that fails (a full disk) leaves neither a partial file nor an empty epoch directory.

        The state is serialized in memory first: torch.save's own file writer reports a failed write as a
        RuntimeError without its cause, where a plain write raises the OSError (ENOSPC, EDQUOT, EIO) an operator can
        act on."""
        buffer = io.BytesIO()
        torch.save({field.name: getattr(self, field.name) for field in dataclasses.fields(self)}, buffer)
        created = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomic(directory / STATE_FILE, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
        except BaseException:
            if created:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TrainState:
        """The checkpoint in DIRECTORY; a UserError naming the file when it is missing, cut short or not ours."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise UserError(f"no checkpoint at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file
            raise UserError(f"checkpoint {path} cannot be read: {err}") from None
        missing = [key for key in REQUIRED if not isinstance(state, dict) or key not in state]
        if missing:
            raise UserError(f"checkpoint {path} is not a vpn-dist checkpoint (missing {', '.join(missing)})")
        meta = state["meta"]
        if (not isinstance(state["epoch"], int) or state["epoch"] < 1 or not isinstance(meta, dict)
                or not isinstance(meta.get("shape"), list) or not isinstance(meta.get("num_classes"), int)):
            raise UserError(f"checkpoint {path} is damaged (epoch {state['epoch']!r}, meta {meta!r})")
        return cls(**{field.name: state[field.name] for field in dataclasses.fields(cls) if field.name in state})

    def restore_models(self, base: nn.Module, generator: nn.Module | None = None,
                       where: str | Path = "the checkpoint") -> None:
        """The weights into freshly built models: the base, and the generator when one is given."""
        try:
            base.load_state_dict(self.base)
            if generator is not None:
                generator.load_state_dict(self.generator)
        except (RuntimeError, TypeError, AttributeError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{where} does not fit the run's models (damaged, or another config): {first}") from None

    def restore(self, base: nn.Module, generator: nn.Module | None, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler, where: str | Path = "the checkpoint") -> None:
        """Weights, optimizer, scheduler and scaler into a freshly set-up run; a UserError when they do not fit it
        (another model, optimizer or precision than the checkpoint's)."""
        self.restore_models(base, generator, where=where)
        try:
            optimizer.load_state_dict(self.optimizer)
            scheduler.load_state_dict(self.scheduler)
            scaler.load_state_dict(self.scaler)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
            raise UserError(f"{where}: its optimizer state does not fit this run ({type(err).__name__}: {err})") \
                from None


REQUIRED = tuple(field.name for field in dataclasses.fields(TrainState)
                 if field.default is dataclasses.MISSING)  # `config` and `gamma` came later
