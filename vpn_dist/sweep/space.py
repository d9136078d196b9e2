"""What a sweep runs: the search space (checked once when loaded), the sweep's settings (saved in OUT/sweep.json),
and how one trial's axis values become a validated RunConfig."""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpn_dist.config import RunConfig, apply_overrides, from_dict, paper_gamma
from vpn_dist.errors import UserError
from vpn_dist.sweep.trial import TrialResources, resolve_config

SPECIAL_AXES = ("arch", "vpn.bound_C", "vpn.gamma_scale")
SELECTION_METRICS = ("val_acc", "val_acc_alg2", "val_acc_no_noise")
MAX_CHECKED = 3000  # resolved configs checked before the sweep starts


@dataclass
class Space:
    """A search space as `tune_spaces/<name>.py` writes it (see tune_spaces/__init__.py for the fields)."""

    description: str = ""
    data: list[str] | None = None  # None: every --data dir; or the data set names to keep
    axes: dict[str, Any] = field(default_factory=dict)  # dotted RunConfig keys (+ SPECIAL_AXES) -> Tune domains
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted RunConfig keys -> one value
    samples: int = 1
    grace_period: int = 1
    reduction_factor: int = 3
    metric: str = "val_acc"


@dataclass
class SweepSettings:
    """Everything a trial needs besides its axis values; saved to OUT/sweep.json so --resume reuses it."""

    space: str  # the --space argument
    out: str
    datasets: dict[str, dict[str, Any]]  # label -> {path, num_classes, name} (dataset_table)
    fixed: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE
    epochs: int | None = None  # --epochs
    workers: int = 1
    cpus_per_worker: int = 1
    gpu: bool = False
    gpus_per_trial: float | None = None  # None: one GPU per worker (with gpu)
    samples: int = 1
    metric: str = "val_acc"
    grace_period: int = 1
    reduction_factor: int = 3
    max_epochs: int | None = None  # ASHA's max_t

    def resources(self) -> TrialResources:
        return TrialResources(self.workers, self.cpus_per_worker, self.gpu, self.gpus_per_trial)

    def max_failures(self) -> int:
        """train.max_failures as the space's fixed values and --set give it: restarts of a trial's workers."""
        return apply_overrides(from_dict(dict(self.fixed)), self.overrides).train.max_failures

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSettings:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def load_space(name: str) -> Space:
    """A named space (tune_spaces/<name>.py) or a .py file defining SPACE, with its field rules checked."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--space {name}: no such file")
        scope: dict[str, Any] = {"__file__": str(path), "__name__": f"tune_space_{path.stem}"}
        try:
            exec(compile(path.read_text(), str(path), "exec"), scope)  # noqa: S102 - the user's own space file
        except Exception as err:  # noqa: BLE001
            raise UserError(f"--space {name}: the file does not run: {type(err).__name__}: {err}") from None
        if not isinstance(scope.get("SPACE"), dict):
            raise UserError(f"--space {name}: the file must define a dict named SPACE (see tune_spaces/smoke.py)")
        raw = dict(scope["SPACE"])
    else:
        from tune_spaces import get_space

        raw = get_space(name)
    names = [f.name for f in dataclasses.fields(Space)]
    unknown = set(raw) - set(names)
    if unknown:
        raise UserError(f"space {name}: unknown field(s) {', '.join(sorted(unknown))}; fields are {', '.join(names)}")
    space = Space(**raw)
    for key, kind, what in (("description", str, "a string"), ("axes", dict, "a dict of axes"),
                            ("fixed", dict, "a dict of fixed values")):
        if not isinstance(getattr(space, key), kind):
            raise UserError(f"space {name}: {key} must be {what}, got {getattr(space, key)!r}")
    if space.data is not None and not (isinstance(space.data, list) and all(isinstance(d, str) for d in space.data)):
        raise UserError(f"space {name}: data must be None or a list of data set names, got {space.data!r}")
    if space.metric not in SELECTION_METRICS:
        raise UserError(f"space {name}: metric {space.metric!r} must be a validation metric: "
                        f"{', '.join(SELECTION_METRICS)} (the test split never selects)")
    for key in ("samples", "grace_period", "reduction_factor"):
        value = getattr(space, key)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"space {name}: {key} must be an integer >= 1, got {value!r}")
    overlap = set(space.axes) & set(space.fixed)
    if overlap:
        raise UserError(f"space {name}: {', '.join(sorted(overlap))} both fixed and an axis")
    for key in space.fixed:
        if key in SPECIAL_AXES or key == "data":
            raise UserError(f"space {name}: put {key!r} under axes (a one-value tune.choice if it is fixed)")
    if "data" in space.axes:
        raise UserError(f"space {name}: the data axis is the top-level field 'data' (None or a list of names)")
    return space


def dataset_table(data_dirs: list[str], wanted: list[str] | None) -> dict[str, dict[str, Any]]:
    """label -> {path, num_classes, name} for the --data dirs the space keeps; every one must have a val split."""
    from vpn_dist.data import check_data

    if not data_dirs:
        raise UserError("give at least one --data DIR (a `vpn-dist prep` output with --val N)")
    table: dict[str, dict[str, Any]] = {}
    for raw in data_dirs:
        path = Path(raw).resolve()
        meta = check_data(raw)  # damaged data stops the sweep before any trial
        if not meta.get("splits", {}).get("val") or not (path / "val.beton").is_file():
            raise UserError(f"{raw} has no val split, and the sweep selects on validation accuracy only: prepare it "
                            f"with `vpn-dist prep ... --val N` (e.g. --val 5000)")
        name = str(meta.get("name") or meta.get("dataset") or path.name)
        label = _safe(name)
        if label in table:
            label = _safe(f"{name}-{path.name}")
        n = 2
        while label in table:
            label, n = _safe(f"{name}-{n}"), n + 1
        table[label] = {"path": str(path), "num_classes": int(meta["num_classes"]), "name": name}
    if wanted is not None:
        kept = {k: v for k, v in table.items() if k in wanted or v["name"] in wanted or Path(v["path"]).name in wanted}
        if not kept:
            raise UserError(f"the space keeps data sets {wanted}, none of the given --data ({', '.join(table)})")
        table = kept
    return table


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def resolve_trial(params: dict[str, Any], settings: SweepSettings, run_dir: str) -> RunConfig:
    """A trial's RunConfig: space's fixed < the trial's axis values < sweep flags; raises UserError."""
    data = settings.datasets.get(params.get("data"))
    if data is None:
        raise UserError(f"trial data {params.get('data')!r} is not one of the sweep's data sets "
                        f"{list(settings.datasets)}")
    values: dict[str, Any] = dict(settings.fixed)
    for key, value in params.items():
        if key == "data":
            continue
        if key == "arch":
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise UserError(f"axis 'arch' values are (base, generator) pairs, got {value!r}")
            values["model.base"], values["model.generator"] = value
        elif key == "vpn.bound_C":
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise UserError(f"axis 'vpn.bound_C' values are (bound, C) pairs, e.g. ('norm', 10.0), got {value!r}")
            values["vpn.bound"], values["vpn.C"] = value
        elif key == "vpn.gamma_scale":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(f"axis 'vpn.gamma_scale' must be a number >= 0 (gamma = scale * 0.01 / K), got {value!r}")
            values["vpn.gamma"] = float(value) * paper_gamma(data["num_classes"])
        else:
            values[key] = value
    cfg = resolve_config(values, base=None, overrides=settings.overrides, epochs=settings.epochs, run_dir=run_dir,
                         data_path=data["path"], resources=settings.resources())
    if cfg.train.eval_every != 1:
        raise UserError(f"train.eval_every = {cfg.train.eval_every}: a sweep evaluates every epoch (ASHA compares "
                        f"validation accuracy at each rung); leave it at 1")
    return cfg


def _candidates(key: str, value: Any, rng: random.Random) -> list[Any]:
    """Every value an axis can take (grid, choice), or a few draws of a continuous one."""
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(value, dict) and set(value) == {"grid_search"}:
        return list(value["grid_search"])
    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, Domain):
        try:
            drawn = value.sample(size=4, random_state=rng.randrange(2**31))
        except Exception as err:  # noqa: BLE001 - e.g. tune.sample_from, which needs the whole spec
            raise UserError(f"axis {key!r}: cannot draw a value to check it ({type(err).__name__}: {err}); "
                            f"use tune.choice, tune.grid_search or a tune.uniform/loguniform/randint") from None
        values = [v.item() if hasattr(v, "item") else v for v in list(drawn)]  # numpy -> Python numbers
        if getattr(value, "lower", None) is not None:  # the edge a draw may never hit
            values.append(type(values[0])(value.lower))
        return values
    if isinstance(value, dict):
        raise UserError(f"axis {key!r}: a nested dict is not an axis; use dotted RunConfig keys (e.g. 'vpn.m')")
    return [value]


def check_space(space: Space, settings: SweepSettings, out: Path) -> int:
    """Resolve every combination of grid values and choices (a sample when there are too many) into a RunConfig
    and validate it, before any trial starts. Returns the number of configs checked."""
    rng = random.Random(0)
    keys = list(space.axes)
    lists = [_candidates(k, space.axes[k], rng) for k in keys] + [list(settings.datasets)]
    keys.append("data")
    total = math.prod(len(v) for v in lists)
    if total <= MAX_CHECKED:
        combos = itertools.product(*lists)
    else:  # every value of every axis at least once, then random combinations
        first = [v[0] for v in lists]
        combos = [tuple(first[:i] + [c] + first[i + 1:]) for i, vals in enumerate(lists) for c in vals]
        combos += [tuple(rng.choice(v) for v in lists) for _ in range(MAX_CHECKED)]
    checked = 0
    for combo in combos:
        params = dict(zip(keys, combo))
        try:
            resolve_trial(params, settings, str(out / "trials" / "check"))
        except UserError as err:
            raise UserError(f"space {settings.space}: trial config {params} is invalid: {err}") from None
        checked += 1
    return checked


def max_epochs(space: Space, epochs: int | None = None) -> int:
    """ASHA's max_t: the most epochs any trial can run (--epochs, else the train.epochs axis's exact upper bound,
    else the fixed or default value). A bound below some trial's epochs would make ASHA stop it early."""
    if epochs:
        return epochs
    if "train.epochs" not in space.axes:
        return int(space.fixed.get("train.epochs", RunConfig().train.epochs))
    return _upper_bound("train.epochs", space.axes["train.epochs"])


def _upper_bound(key: str, value: Any) -> int:
    from ray.tune.search.sample import Categorical, Domain, Float, Integer, Quantized

    if isinstance(value, dict) and set(value) == {"grid_search"}:
        return int(max(value["grid_search"]))
    if isinstance(value, Categorical):
        return int(max(value.categories))
    if isinstance(value, Integer):
        sampler = value.get_sampler()
        if isinstance(sampler, Quantized):  # tune.qrandint: the upper bound is inclusive, on the q grid
            return int(value.upper // sampler.q * sampler.q)
        return int(value.upper) - 1  # tune.randint, tune.lograndint: the upper bound is exclusive
    if isinstance(value, Float):
        return math.ceil(value.upper)
    if isinstance(value, Domain):
        raise UserError(f"axis {key!r}: give it as tune.choice, tune.grid_search or tune.randint (its upper "
                        f"bound is ASHA's max_t)")
    return int(value)
