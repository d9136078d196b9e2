"""σ maps on real data: Figure 4's panels (an image of each class, the σ the trained generator gives it) for runs of
the committed grids, one row pair per run, every σ of a run on one colour scale so that what differs between images
and between runs shows.

    python reproduction/sigma-maps/draw.py LABEL=RUN_DIR ...   # e.g. "Fashion-MNIST, SGD"=runs/fm-sgd-joint-seed0

Each run is a committed grid's run, or a seed of a grid cell retrained with the grid's settings (`vpn-dist train
--preset paper ... --set train.seed=S`); report.md here compares its test accuracy with the grid's row for that seed.
Writes sigma_maps.png and runs.csv (each run's settings, test accuracy and the σ shown) here.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from vpn_dist.evaluation import eval_loaders
from vpn_dist.method import generate_sigma
from vpn_dist.observe import save_figure, write_atomic
from vpn_dist.run_dir import RunDir

HERE = Path(__file__).resolve().parent
CLASSES_SHOWN = 6
SUBSET = 2000  # test images read to find one of each class (a fixed random subset, as the per-epoch curves read)


def one_per_class(run: RunDir) -> dict:
    """The trained run's first test image of each of CLASSES_SHOWN classes spread over its K, their σ, and its
    test accuracy."""
    trained = run.trained()
    cfg, meta = trained.cfg, trained.meta
    first_of_class: dict[int, torch.Tensor] = {}
    for batch in eval_loaders(cfg, meta, torch.device("cpu"), images=SUBSET)["test"]:
        for image, label in zip(*batch[:2]):
            first_of_class.setdefault(int(label), image.clone())
    classes = sorted(first_of_class)
    shown = [classes[round(float(i))] for i in torch.linspace(0, len(classes) - 1, min(CLASSES_SHOWN, len(classes)))]
    x, y = torch.stack([first_of_class[c] for c in shown]), torch.tensor(shown)
    with torch.no_grad():
        sigma = generate_sigma(trained.generator.eval(), x, y, trained.state.gamma, cfg.vpn.bound, cfg.vpn.C)
    metrics = run.read_metrics()
    return {"x": x, "y": y, "sigma": sigma.mean(dim=1), "classes": meta["class_names"], "cfg": cfg,
            "data": meta.get("source_kind", Path(cfg.data.path).name),
            "test_acc_alg2": metrics.get("test_acc_alg2"), "test_acc_no_noise": metrics.get("test_acc_no_noise")}


def draw(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1.7 * CLASSES_SHOWN + 1.2, 3.9 * len(runs)))
    for panel, (label, run) in zip(fig.subfigures(len(runs), 1, squeeze=False)[:, 0], runs.items()):
        sigma = run["sigma"].numpy()
        low, high = float(sigma.min()), float(sigma.max())
        axes = panel.subplots(2, CLASSES_SHOWN, squeeze=False)
        for i in range(CLASSES_SHOWN):
            image_ax, sigma_ax = axes[0][i], axes[1][i]
            for ax in (image_ax, sigma_ax):
                ax.set_xticks([]), ax.set_yticks([])
            if i >= len(sigma):  # a set with fewer classes than panels
                image_ax.axis("off"), sigma_ax.axis("off")
                continue
            image = run["x"][i].float().clamp(0, 1).numpy()
            image_ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            image_ax.set_title(run["classes"][int(run["y"][i])], fontsize=8)
            shown = sigma_ax.imshow(sigma[i], cmap="inferno", vmin=low, vmax=high)
        axes[0][0].set_ylabel("image")
        axes[1][0].set_ylabel("σ")
        panel.colorbar(shown, ax=list(axes[1]), fraction=0.02, pad=0.01).ax.tick_params(labelsize=7)
        panel.suptitle(f"{label}: σ mean {sigma.mean():.2g}, range {low:.2g}..{high:.2g} (pixels in [0, 1])",
                       fontsize=10, fontweight="bold")
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    runs = {label: one_per_class(RunDir(Path(directory))) for label, directory in (a.split("=", 1) for a in argv)}
    draw(runs, HERE / "sigma_maps.png")
    fields = ["label", "data", "base", "generator", "mode", "optimizer", "seed", "test_acc_alg2", "test_acc_no_noise",
              "sigma_mean_shown", "sigma_min_shown", "sigma_max_shown"]
    rows = [{"label": label, "data": run["data"], "base": run["cfg"].model.base,
             "generator": run["cfg"].model.generator, "mode": run["cfg"].vpn.mode,
             "optimizer": run["cfg"].train.optimizer, "seed": run["cfg"].train.seed,
             "test_acc_alg2": run["test_acc_alg2"], "test_acc_no_noise": run["test_acc_no_noise"],
             "sigma_mean_shown": float(run["sigma"].mean()), "sigma_min_shown": float(run["sigma"].min()),
             "sigma_max_shown": float(run["sigma"].max())} for label, run in runs.items()]

    def as_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(HERE / "runs.csv", as_csv)
    print(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
