"""What a person watches: TensorBoard (rank 0), a console line per epoch, metrics.json, the Figure-4 panel."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

PLAIN_PROGRESS_EVERY_S = 60.0  # off a terminal: one progress line a minute within a long epoch

from vpn_dist.errors import UserError

if TYPE_CHECKING:  # both build on this module
    from vpn_dist.config import RunConfig
    from vpn_dist.run_dir import RunDir


def make_output_dir(path: Path, what: str) -> None:
    """Create an output directory (and its parents), or stop with one line that says why it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what} {path} cannot be created: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise UserError(f"{what} {path} is on a read-only file system: write elsewhere (a copy on writable "
                            f"storage), or remount it read-write")
        raise UserError(f"{what} {path} is not writable")


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a reader never sees a half-written file, and a write that fails
    (a full disk) leaves the old file whole and no temporary one behind."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` writes the whole file at tmp, a name of its own in path's directory (two processes writing the
    same file never share one); then the rename. On any failure, Ctrl-C included, tmp is removed."""
    path = Path(path)
    tmp = None
    try:
        with signals_deferred():  # Ctrl-C between creating tmp and knowing its name would leave it behind
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode a plain open() would give
        tmp.replace(path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait for the block to end (they arrive as it ends, as the exception they always were): for
    a step that must not be cut in half, like creating a temporary file and recording its name for cleanup."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals in Python
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def figure4(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, path: Path | None = None):
    """The paper's Figure 4 for a few images: image, one noise draw, sigma heatmap, image + noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = x.shape[0]
    fig, axes = plt.subplots(4, n, figsize=(1.6 * n, 6.6), squeeze=False)
    rows = {"image": x, "noise": eps, "sigma": sigma.mean(dim=1, keepdim=True), "image + noise": x + eps}
    for r, (title, images) in enumerate(rows.items()):
        for i in range(n):
            ax = axes[r][i]
            img = images[i].detach().float().cpu().numpy()
            if title == "sigma":
                ax.imshow(img[0], cmap="inferno")
            elif title == "noise":
                span = float(abs(img).max()) or 1.0
                ax.imshow(img.mean(0), cmap="coolwarm", vmin=-span, vmax=span)
            else:
                img = img.clip(0, 1)
                ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi=100)
    return fig


def save_figure(fig, path: Path, **savefig_args) -> Path:
    """fig.savefig to path through a temporary name (removed when the write fails)."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **savefig_args))
    return path


def figure4_panels(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Figure 4's rows (image, noise, sigma heatmap, image + noise) tiled as one (3, H, W) image in [0, 1], with the
    same colour maps as `figure4` but no axes: milliseconds, where a matplotlib figure takes about a second."""
    from matplotlib import colormaps

    def colour(maps: torch.Tensor, cmap: str, low: float, high: float) -> torch.Tensor:  # (n, h, w) -> (n, 3, h, w)
        scaled = ((maps - low) / ((high - low) or 1.0)).clamp(0, 1).numpy()
        return torch.from_numpy(colormaps[cmap](scaled)[..., :3]).permute(0, 3, 1, 2).float()

    def rgb(images: torch.Tensor) -> torch.Tensor:
        images = images.clamp(0, 1)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]

    x, eps, sigma = (t.detach().float().cpu() for t in (x, eps, sigma))
    noise = eps.mean(dim=1)
    span = float(noise.abs().max()) or 1.0
    sigma_map = sigma.mean(dim=1)
    rows = [rgb(x), colour(noise, "coolwarm", -span, span),
            colour(sigma_map, "inferno", float(sigma_map.min()), float(sigma_map.max())), rgb(x + eps)]
    pad = torch.nn.functional.pad
    tiles = [pad(row, (1, 1, 1, 1), value=1.0) for row in rows]  # a white line between panels
    return torch.cat([torch.cat(list(row), dim=2) for row in tiles], dim=1)


def hparams_of(cfg: RunConfig, gamma: float) -> dict[str, Any]:
    """A run's settings as TensorBoard's HParams view compares them across runs."""
    init = "none" if cfg.model.generator == "none" else str(cfg.model.generator_init_std or "authors")
    return {"base": cfg.model.base, "generator": cfg.model.generator, "mode": cfg.vpn.mode, "gamma": gamma,
            "m": cfg.vpn.m, "bound": cfg.vpn.bound, "C": cfg.vpn.C if cfg.vpn.C is not None else 0.0,
            "lr": cfg.train.lr, "optimizer": cfg.train.optimizer, "weight_decay": cfg.train.weight_decay,
            "generator_init_std": init, "seed": cfg.train.seed, "batch_size": cfg.train.batch_size,
            "amp": cfg.train.amp, "workers": max(cfg.dist.workers, 1)}


class RunLog:
    """Rank 0 writes; other ranks hold a RunLog that does nothing, so the train loop never branches on rank."""

    def __init__(self, run_dir: RunDir, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir.tensorboard))

    def step(self, global_step: int, loss: float) -> None:
        if self.writer:
            self.writer.add_scalar("train/step_loss", loss, global_step)

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        self.writer.flush()
        shown = lambda key: "-" if metrics.get(key) is None else f"{metrics[key]:.4f}"  # noqa: E731
        print(f"epoch {epoch:3d} | loss {metrics['train_loss']:.4f} | train acc {metrics['train_acc']:.4f} | "
              f"test acc alg2 {shown('test_acc_alg2')} no-noise {shown('test_acc_no_noise')}"
              f" | {metrics['train_images_per_sec']:.0f} img/s | {metrics['epoch_time_s']:.1f}s", flush=True)

    def progress(self, epoch: int, steps: int, world_size: int) -> EpochProgress | None:
        """Progress within an epoch (rank 0): see EpochProgress."""
        return EpochProgress(epoch, steps, world_size) if self.enabled else None

    def figure(self, epoch: int, x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, last: bool) -> None:
        """Figure 4's panels to TensorBoard; the last epoch also draws the labelled figure4.png."""
        if not self.enabled:
            return
        self.writer.add_image("figure4", figure4_panels(x, eps, sigma), epoch)
        if last:
            import matplotlib.pyplot as plt

            plt.close(figure4(x, eps, sigma, self.run_dir.figure4))

    def hparams(self, hparams: dict[str, Any], final: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {f"hparam/{k}": v for k, v in final.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.writer.add_hparams(hparams, scalars, run_name="hparams")

    def close(self, failing: bool = False) -> None:
        """failing: the run is stopping on an error (a full disk, say) that this close would only repeat."""
        if self.writer:
            try:
                self.writer.close()
            except OSError:
                if not failing:
                    raise


class EpochProgress:
    """Steps and images/s within an epoch: a tqdm bar on a terminal; elsewhere (a log file, a Ray worker, `ray job
    submit`) a redrawn bar is noise, so a plain line every PLAIN_PROGRESS_EVERY_S seconds instead."""

    def __init__(self, epoch: int, steps: int, world_size: int):
        self.epoch, self.steps, self.world_size = epoch, steps, world_size
        self.step, self.rows = 0, 0
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if sys.stdout.isatty():
            self.bar = tqdm(total=steps, desc=f"epoch {epoch:3d}", unit="step", leave=False, file=sys.stdout,
                            dynamic_ncols=True)

    def update(self, rows: int) -> None:
        """One step of `rows` images on this rank (all ranks step together, so images/s counts world_size ranks)."""
        self.step += 1
        self.rows += rows
        now = time.perf_counter()
        images_per_s = self.rows * self.world_size / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{images_per_s:.0f} img/s", refresh=False)
            self.bar.update(1)
        elif now - self.last_line >= PLAIN_PROGRESS_EVERY_S:
            self.last_line = now
            print(f"epoch {self.epoch:3d} | step {self.step}/{self.steps} | {images_per_s:.0f} img/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
