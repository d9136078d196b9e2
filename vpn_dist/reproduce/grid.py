"""The paper's Tables 1-3 as a grid of runs: cells (table, data, base, generator, mode) x seeds.

A run is what trains; a cell is where a table shows it. The baseline of a (data, base, seed) is one run that
Table 1 and Table 2 both show, and Table 2's generator-only runs start from it (paper section 4.2).
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from vpn_dist.config import GENERATORS, RunConfig, preset
from vpn_dist.data import check_data, read_meta
from vpn_dist.errors import UserError
from vpn_dist.sweep.trial import TrialResources, resolve_config

PAPER_TABLES = Path(__file__).with_name("paper_tables.csv")


@dataclass(frozen=True)
class Table:
    modes: tuple[str, ...]  # the modes of its rows, in the paper's order
    datasets: tuple[str, ...]  # the paper's data sets (by `vpn-dist prep` source kind)
    bases: tuple[str, ...]
    controls: tuple[str, ...] = ()  # rows the paper does not have, run only when --modes names them


TABLES = {
    1: Table(("baseline", "random", "joint"), ("fashion-mnist", "cifar10"), ("sr", "dnn3", "resnet18", "resnet34"),
             controls=("isotropic",)),
    2: Table(("baseline", "generator-only"), ("fashion-mnist", "cifar10"), ("sr", "dnn3", "resnet18", "resnet34")),
    3: Table(("baseline", "random", "joint"), ("tiny-imagenet",), ("resnet18", "resnet34", "resnet50")),
}
PAPER_DATASETS = ("fashion-mnist", "cifar10", "tiny-imagenet")
BATCH_SIZE = {"tiny-imagenet": 128}  # paper 4.1: 256 elsewhere ("to prevent the OOM exception")


@dataclass(frozen=True)
class GridRun:
    """One training run of the grid; `tables` lists every table that shows it."""

    data: str  # the data set's label (its source kind, or the directory name)
    base: str
    generator: str  # "none" for baseline and random
    mode: str
    seed: int
    tables: tuple[int, ...]

    @property
    def run_id(self) -> str:
        return f"{self.data}/{self.base}-{self.generator}-{self.mode}/seed{self.seed}"

    @property
    def row(self) -> str:
        """The paper's row name: baseline, random, or the generator."""
        return self.mode if self.generator == "none" else self.generator

    def baseline(self) -> GridRun:
        """The run a generator-only run starts from: same data, base and seed."""
        return GridRun(self.data, self.base, "none", "baseline", self.seed, ())


@dataclass
class Plan:
    """What `vpn-dist reproduce` was asked for; saved as OUT/reproduce.json, so --resume needs no flags.

    reproduce.json names each data set by its label and the fingerprint of its meta.json, not by where it lives:
    the grid may continue on another machine. Where it lives on this one is `data` (not saved there)."""

    tables: list[int]
    data: dict[str, str]  # label -> prepared directory on this machine ("" where not known here)
    seeds: int
    bases: list[str] | None = None  # None: the table's
    generators: list[str] = field(default_factory=lambda: list(GENERATORS))
    modes: list[str] | None = None  # None: the table's
    epochs: int | None = None
    overrides: list[str] = field(default_factory=list)
    gpus_per_trial: float = 0.0
    cpus_per_trial: int = 1
    # the isotropic control's s, per seed: the learned mean sigma of that seed's joint run in this grid directory
    sigma_from: str | None = None
    data_fingerprints: dict[str, str | None] = field(default_factory=dict)  # label -> data_fingerprint (None: unknown)

    def resources(self) -> TrialResources:
        return TrialResources.one_worker(self.cpus_per_trial, self.gpus_per_trial)

    def to_dict(self) -> dict[str, Any]:
        saved = asdict(self)
        del saved["data_fingerprints"]
        saved["data"] = {label: {"meta_fingerprint": self.data_fingerprints.get(label)} for label in self.data}
        return saved

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Plan:
        """From reproduce.json; one written before fingerprints holds label -> path (kept as where to look)."""
        saved = dict(saved)
        data = saved.pop("data")
        if not isinstance(data, dict):
            raise TypeError(f"'data' is {type(data).__name__}, not a mapping of data set to its fingerprint")
        paths = {label: entry if isinstance(entry, str) else "" for label, entry in data.items()}
        fingerprints = {label: entry.get("meta_fingerprint") if isinstance(entry, dict) else None
                        for label, entry in data.items()}
        return cls(data=paths, data_fingerprints=fingerprints, **saved)

    def command(self, out: str) -> str:
        """The `vpn-dist reproduce` command line of this plan (data by label: where it lives varies)."""
        parts = ["vpn-dist reproduce"] + [f"--table {t}" for t in self.tables]
        parts += [f"--data DATA/{label}" for label in self.data] + [f"--seeds {self.seeds}"]
        if self.bases:
            parts.append(f"--bases {','.join(self.bases)}")
        parts.append(f"--generators {','.join(self.generators)}")
        if self.modes:
            parts.append(f"--modes {','.join(self.modes)}")
        if self.sigma_from:
            parts.append(f"--sigma-from {self.sigma_from}")
        if self.epochs:
            parts.append(f"--epochs {self.epochs}")
        parts += [f"--set {o}" for o in self.overrides] + [f"--out {out}"]
        return " ".join(parts)

    def fingerprint(self) -> str:
        """What decides the runs' results (not where the data lives, nor how many seeds or what hardware):
        rows of another plan are never taken as finished."""
        keyed = {k: v for k, v in self.to_dict().items() if k not in ("seeds", "gpus_per_trial", "cpus_per_trial")
                 and not (k == "sigma_from" and v is None)}  # plans from before the control keep their rows
        keyed["data"] = sorted(self.data)
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def data_fingerprint(path: str | Path) -> str:
    """The content of a prepared directory's meta.json (its keys sorted, so formatting does not count): the source
    checksum, splits, validation seed and storage of that preparation."""
    meta = read_meta(path)
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def data_label(path: str | Path) -> str:
    meta = read_meta(path)
    kind = meta.get("source_kind")
    return kind if kind in PAPER_DATASETS or kind == "synthetic" else Path(path).resolve().name


def check_plan(plan: Plan) -> None:
    """Refuse a grid that cannot run, before anything starts."""
    from vpn_dist.models import BASE_MODELS

    if not plan.tables:
        raise UserError("give --table 1, 2 or 3")
    for number in plan.tables:
        if number not in TABLES:
            raise UserError(f"--table {number}: the paper has Tables 1, 2 and 3")
    if plan.seeds < 1:
        raise UserError(f"--seeds {plan.seeds}: give at least 1 seed (the paper averages 5)")
    if plan.epochs is not None and plan.epochs < 1:
        raise UserError(f"--epochs {plan.epochs} must be at least 1")
    if not plan.data:
        raise UserError("give at least one --data DIR (a `vpn-dist prep` output)")
    for name in plan.bases or []:
        if name not in BASE_MODELS:
            raise UserError(f"--bases: unknown base {name!r}; the paper's bases are {', '.join(BASE_MODELS)}")
    for name in plan.generators:
        if name not in GENERATORS:
            raise UserError(f"--generators: unknown generator {name!r}; use {', '.join(GENERATORS)}")
    for mode in plan.modes or []:  # each mode must be a row of some requested table
        if not any(mode in TABLES[number].modes + TABLES[number].controls for number in plan.tables):
            shown = "; ".join(f"Table {n}: {', '.join(TABLES[n].modes + TABLES[n].controls)}" for n in plan.tables)
            raise UserError(f"--modes {mode}: {' and '.join(f'Table {n}' for n in plan.tables)} "
                            f"{'has' if len(plan.tables) == 1 else 'have'} no {mode} rows ({shown})")
    for number in plan.tables:
        table = TABLES[number]
        for label in plan.data:
            if label in PAPER_DATASETS and label not in table.datasets:
                raise UserError(f"--data {plan.data[label]} is {label}, which Table {number} does not show "
                                f"(Table {number}: {', '.join(table.datasets)})")
    if plan.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial {plan.gpus_per_trial} must be > 0")
    runs = grid(plan)
    if not runs:
        raise UserError("the grid is empty: no table row matches --bases/--generators/--modes")
    for run in runs:  # every run's config must be valid before the first one starts
        run_config(plan, run, Path("/nonexistent"))
    for label, path in plan.data.items():  # damaged data stops the grid before any run
        check_paper_data(label, path, check_data(path))


# What the paper's tables were measured on (paper 4.1): a set labelled as one of these must be that data set, or its
# results would be reported beside numbers from other data.
PAPER_DATA = {"fashion-mnist": (10, [1, 28, 28]), "cifar10": (10, [3, 32, 32]), "tiny-imagenet": (200, [3, 64, 64])}


def check_paper_data(label: str, path: str, meta: dict[str, Any]) -> None:
    if label not in PAPER_DATA:
        return
    classes, shape = PAPER_DATA[label]
    if meta["num_classes"] != classes or list(meta["shape"]) != shape:
        shown = "x".join(map(str, meta["shape"]))
        raise UserError(f"--data {path} was prepared as {label} but holds {meta['num_classes']} classes of {shown} "
                        f"images; the paper's {label} has {classes} classes of {'x'.join(map(str, shape))}, and its "
                        f"numbers would be reported beside results from other data: prepare the whole set "
                        f"(`vpn-dist prep {label} --source ...`, no --size)")


def grid(plan: Plan) -> list[GridRun]:
    """Every run of the plan once, seed by seed (an interrupted grid holds whole seeds of every cell), in table
    order within a seed; a run shown in several tables lists them all."""
    runs: dict[tuple, GridRun] = {}
    for number in plan.tables:
        table = TABLES[number]
        modes = [m for m in table.modes if plan.modes is None or m in plan.modes]
        modes += [m for m in table.controls if plan.modes and m in plan.modes]
        if "generator-only" in modes and "baseline" not in modes:
            modes.insert(0, "baseline")  # generator-only starts from the baseline's trained base
        for label in plan.data:
            for base in plan.bases or table.bases:
                for mode in modes:
                    generators = ["none"] if mode in ("baseline", "random", "isotropic") else plan.generators
                    for generator in generators:
                        for seed in range(plan.seeds):
                            key = (label, base, generator, mode, seed)
                            tables = runs[key].tables + (number,) if key in runs else (number,)
                            runs[key] = GridRun(label, base, generator, mode, seed, tables)
    return sorted(runs.values(), key=lambda run: run.seed)


def run_config(plan: Plan, run: GridRun, runs_root: Path) -> RunConfig:
    """The paper preset (in fp32 whatever RunConfig's defaults are), the run's cell and seed, then the plan's
    --epochs/--set. The run trains in runs_root/run_id."""
    values = {"model.base": run.base, "model.generator": run.generator, "vpn.mode": run.mode, "train.seed": run.seed,
              # Figure 2's curves from the same 500 images per split in every grid (null sizes it to the set)
              "train.epoch_eval_images": 500}
    if run.data in BATCH_SIZE:
        values["train.batch_size"] = BATCH_SIZE[run.data]
    if run.mode == "generator-only":
        values["train.init_from"] = str(runs_root / run.baseline().run_id)
    if run.mode == "isotropic":
        values["vpn.noise_std"] = matched_sigma(plan, run)
    # the preset's fp32 holds on every machine, so a grid's results do not depend on where each run lands (amp=auto
    # picks bf16 where it is faster); --set train.amp=bf16 trades that for speed
    return resolve_config(values, base=preset("paper"), overrides=plan.overrides, epochs=plan.epochs,
                          run_dir=runs_root / run.run_id, data_path=plan.data[run.data], resources=plan.resources())


def matched_sigma(plan: Plan, run: GridRun) -> float:
    """The isotropic control's s for this run: the mean sigma its seed's finished joint run learned (same data,
    base and generator), from the runs.csv of the grid in plan.sigma_from."""
    if not plan.sigma_from:
        raise UserError("--modes isotropic: give --sigma-from GRID_DIR, a grid whose joint runs set each seed's noise "
                        "scale")
    if len(plan.generators) != 1:
        raise UserError(f"--modes isotropic matches one generator's sigma: give --generators with one of "
                        f"{', '.join(plan.generators)}")
    runs_csv = Path(plan.sigma_from) / "runs.csv"
    if not runs_csv.is_file():
        raise UserError(f"--sigma-from {plan.sigma_from}: no runs.csv there")
    with open(runs_csv, newline="") as f:
        for row in csv.DictReader(f):
            if (row["table"], row["data"], row["base"], row["generator"], row["mode"], row["seed"], row["status"]) == \
                    ("1", run.data, run.base, plan.generators[0], "joint", str(run.seed), "finished"):
                return float(row["sigma_mean"])
    raise UserError(f"--sigma-from {plan.sigma_from}: no finished joint run of {run.data}, {run.base} base, "
                    f"{plan.generators[0]} generator, seed {run.seed} in {runs_csv}")


@lru_cache(maxsize=1)
def paper_numbers() -> dict[tuple[int, str, str, str], float]:
    """(table, data, base, row) -> the paper's test accuracy in %, rows as in the paper ("dnn3 (no noise)")."""
    with open(PAPER_TABLES, newline="") as f:
        return {(int(r["table"]), r["data"], r["base"], r["row"]): float(r["acc"]) for r in csv.DictReader(f)}
