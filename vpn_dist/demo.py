"""`make demo`: the synthetic set to .beton, then baseline and VPN (joint) on 2 Ray Train workers.

No download and no shared data: everything lands under ./demo (override with VPN_DEMO_DIR).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from data_prep import prepare
from vpn_dist.config import RunConfig, from_dict, load_yaml
from vpn_dist.launch import ray_session, train
from vpn_dist.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    root = Path(os.environ.get("VPN_DEMO_DIR", "demo")).resolve()
    data = root / "data"
    if not (data / "meta.json").exists():
        prepare("synthetic", data, val=500, seed=0)
    results = {}
    with ray_session():  # one local Ray for both runs
        for name, overrides in (("baseline", {"model.generator": "none", "vpn.mode": "baseline"}),
                                ("vpn-joint", {})):
            out = root / "runs" / name
            shutil.rmtree(out, ignore_errors=True)
            cfg: RunConfig = load_yaml(REPO / "configs" / "demo.yaml")
            cfg = from_dict({"out": str(out), "data.path": str(data), "dist.workers": 2, **overrides}, cfg)
            print(f"\n=== {name}: {cfg.model.base} base, generator {cfg.model.generator}, 2 Ray Train workers "
                  f"===", flush=True)
            results[name] = train(cfg)

    print("\n| run       | test acc (Algorithm 2) | test acc (no noise) | sigma background AUROC | sigma between-image "
          "share |")
    print("|-----------|------------------------|---------------------|------------------------|--------------------"
          "-----|")
    for name, m in results.items():
        alg2 = "-" if m["test_acc_alg2"] is None else f"{m['test_acc_alg2']:.4f}"
        auroc = f"{m['sigma_bg_auroc']:.3f}" if m.get("sigma_bg_auroc") is not None else "-"
        share = f"{m['sigma_between_image_share']:.3g}" if m.get("sigma_between_image_share") is not None else "-"
        print(f"| {name:<9} | {alg2:>22} | {m['test_acc_no_noise']:>19.4f} | {auroc:>22} | {share:>24} |")
    print("\nAUROC 0.5: sigma ignores where the object is; 1.0: all noise on the background. Between-image share ~0: "
          "the generator ignores its input.")
    print_reproduction(REPO / "reproduction")
    print(f"\nTensorBoard: tensorboard --logdir {root / 'runs'}")
    print(f"Figure 4 (image, noise, sigma, image + noise): {RunDir(root / 'runs' / 'vpn-joint').figure4}")
    return 0


def print_reproduction(root: Path) -> None:
    """What the committed 40-epoch grids found so far: each VPN and random row against the same seeds' baseline."""
    from vpn_dist.reproduce.report import metric_rows, read_csv
    from vpn_dist.reproduce.stats import compare

    lines = []
    for runs_csv in sorted(root.glob("*/runs.csv")):
        cells = metric_rows(read_csv(runs_csv))
        baselines = {key: values for key, name, values in cells if name == "baseline"}
        for key, name, values in cells:
            if name != "baseline" and key in baselines:
                paired = compare(values, baselines[key])
                if paired.n:
                    p_text = "-" if paired.p is None else f"{paired.p:.2g}"
                    lines.append(f"| {runs_csv.parent.name:<18} | {key[0]:<5} | {key[2]:<4} | {name:<19} | "
                                 f"{paired.mean:+6.2f} | {p_text:>7} | {paired.n} |")
    if lines:
        print(f"\nThe paper's 40-epoch settings, committed grids ({root.name}/*/report.md; docs/reproduction.md): "
              "test accuracy minus the same seeds' baseline, in points, with the paired t-test's p")
        print("| grid               | table | base | row                 | delta  | p       | seeds |\n"
              "|--------------------|-------|------|---------------------|--------|---------|-------|")
        print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
