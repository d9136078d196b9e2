"""Checkpoints: one directory per epoch, `RUN_DIR/checkpoints/epoch_NNNN/state.pt`, in and out of Ray."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpn_dist.errors import UserError
from vpn_dist.observe import write_atomic

STATE_FILE = "state.pt"
STATE_KEYS = ("epoch", "base", "generator", "optimizer", "scheduler", "scaler", "scaler_skipped", "history", "meta")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's, in RUN_DIR/checkpoints


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def write_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write state.pt under a temporary name, then rename: a crash never leaves a checkpoint that looks whole, and a
    write that fails (a full disk) leaves neither a partial file nor an empty epoch directory behind.

    The state is serialized in memory first: torch.save's own file writer reports a failed write as a RuntimeError
    without its cause, where a plain write raises the OSError (ENOSPC, EDQUOT, EIO) an operator can act on."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / STATE_FILE, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be read: {err}") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"checkpoint {path} is not a vpn-dist checkpoint (missing {', '.join(missing)})")
    meta = state["meta"]
    if (not isinstance(state["epoch"], int) or state["epoch"] < 1 or not isinstance(meta, dict)
            or not isinstance(meta.get("shape"), list) or not isinstance(meta.get("num_classes"), int)):
        raise UserError(f"checkpoint {path} is damaged (epoch {state['epoch']!r}, meta {meta!r})")
    return state


def checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's complete checkpoint directories, oldest first (Ray's and the in-process path share the layout)."""
    return sorted(p.parent for p in (Path(run_dir) / "checkpoints").glob(f"epoch_*/{STATE_FILE}"))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def require_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run directory; a UserError when it has none."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise UserError(f"run directory {run_dir} has no checkpoint (expected {run_dir}/checkpoints/epoch_*/)")
    return found


def restore_models(state: dict[str, Any], base: nn.Module, generator: nn.Module | None = None,
                   where: str | Path = "the checkpoint") -> None:
    """Load a checkpoint's weights into freshly built models: the base, and the generator when one is given."""
    try:
        base.load_state_dict(state["base"])
        if generator is not None:
            generator.load_state_dict(state["generator"])
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{where} does not fit the run's models (damaged, or another config): {first}") from None


def load_latest(run_dir: str | Path, set_aside: bool = False) -> dict[str, Any] | None:
    """The newest checkpoint of a run that reads back whole; one cut short (a crash, a full disk) is skipped.

    set_aside (--resume, before any worker starts): move each unreadable one to checkpoints/unreadable-epoch_NNNN,
    so the resumed run writes that epoch afresh and every later reader finds the same checkpoint."""
    found = checkpoints(run_dir)
    for directory in reversed(found):
        try:
            state = load_checkpoint(directory)
        except UserError as err:
            print(f"skipping checkpoint {directory}: {err}", flush=True)
            if set_aside:
                aside = directory.with_name(f"unreadable-{directory.name}")
                shutil.rmtree(aside, ignore_errors=True)
                directory.rename(aside)
                # Ray Train's list of the checkpoints it was given names the moved one, and Ray would refuse to
                # start; without the list Ray starts a new one (this module finds checkpoints by their directories)
                (Path(run_dir) / "checkpoints" / RAY_SNAPSHOT).unlink(missing_ok=True)
                print(f"moved it to {aside}", flush=True)
            continue
        if directory != found[-1]:
            print(f"resuming from {directory}, the newest checkpoint that reads back whole", flush=True)
        return state
    return None


def set_aside_unreadable(run_dir: str | Path) -> None:
    """--resume, once every check has passed: move each checkpoint newer than the newest one that reads back whole to
    checkpoints/unreadable-epoch_NNNN, so the resumed run writes that epoch afresh and every later reader finds the
    same checkpoint. Ray Train's list of the checkpoints goes too when a full disk cut it short: Ray would refuse to
    start on it, and without it Ray starts a new one (this module finds checkpoints by their directories)."""
    snapshot = Path(run_dir) / "checkpoints" / RAY_SNAPSHOT
    try:
        json.loads(snapshot.read_text())
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        snapshot.unlink()
        print(f"removed {snapshot}, cut short", flush=True)
    for directory in reversed(checkpoints(run_dir)):
        if _readable(directory):
            return
        aside = directory.with_name(f"unreadable-{directory.name}")
        shutil.rmtree(aside, ignore_errors=True)
        directory.rename(aside)
        # Ray Train's list of the checkpoints it was given names the moved one, and Ray would refuse to start;
        # without the list Ray starts a new one (this module finds checkpoints by their directories)
        (Path(run_dir) / "checkpoints" / RAY_SNAPSHOT).unlink(missing_ok=True)
        print(f"moved {directory} to {aside}", flush=True)


def has_readable_checkpoint(run_dir: str | Path) -> bool:
    return any(_readable(directory) for directory in checkpoints(run_dir))


def drop_unreadable(run_dir: str | Path) -> bool:
    """A fresh start in a run directory whose checkpoints all fail to read: remove them (else eval and --resume
    would find them again). Returns False, touching nothing, when one of them reads back whole."""
    found = checkpoints(run_dir)
    if any(_readable(directory) for directory in found):
        return False
    for directory in found:
        print(f"removing unreadable checkpoint {directory}", flush=True)
        shutil.rmtree(directory, ignore_errors=True)
    return True


def _readable(directory: Path) -> bool:
    try:
        load_checkpoint(directory)
    except UserError:
        return False
    return True


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (Ray's CheckpointConfig does this under Ray)."""
    found = checkpoints(run_dir)
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
