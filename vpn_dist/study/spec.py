"""A tuning study's spec (`tune_spaces/study_*.py`): two arms, the baseline and VPN, searched with one budget.

Trial i's parameters are drawn from generators seeded by (search_seed, i, axis name): the same on every machine and
in every session, whatever ran before, so a study resumes from its trials.csv alone. An axis both arms have takes
the same value in trial i of each (a paired search: the arms differ by VPN's own axes, not by luck of the draw).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpn_dist.config import RunConfig
from vpn_dist.errors import UserError
from vpn_dist.sweep.space import SweepSettings, resolve_trial
from vpn_dist.sweep.trial import TrialResources

ARMS = ("baseline", "vpn")
# The authors' two optimizers (docs/fidelity.md): their SGD (momentum 0.9, cosine over the epochs) and their Adam
# switch (constant lr); the `optimizer` axis picks one of them whole
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"train.optimizer": "sgd", "train.momentum": 0.9, "train.lr_schedule": "cosine"},
    "adam": {"train.optimizer": "adam", "train.lr_schedule": "constant"},
}
# What both arms must share for the budgets to be the same (checked on every resolved trial config)
SHARED_SETTINGS = ("train.epochs", "train.batch_size", "train.amp", "train.epoch_eval_images", "train.eval_every",
                   "model.base", "data.augment")
# Keys of a run config that do not change its results: where it runs and what it keeps
NOT_RESULTS = ("out", "data.path", "data.num_workers", "data.os_cache", "data.loader", "dist", "train.device",
               "train.log_every", "train.figure_every", "train.keep_checkpoints", "train.max_failures", "train.fault")


@dataclass
class Arm:
    fixed: dict[str, Any] = field(default_factory=dict)  # RunConfig dotted keys -> one value
    axes: dict[str, Any] = field(default_factory=dict)  # dotted keys (+ optimizer, vpn.bound_C, vpn.gamma_scale)


@dataclass
class Study:
    """A study as `tune_spaces/study_*.py` writes it in its STUDY dict (see tune_spaces/study_axes.py)."""

    name: str  # the --spec argument
    description: str = ""
    data: str | None = None  # the `vpn-dist prep` kind the --data dir must be (None: any set with a val split)
    trials: int = 40  # per arm
    search_seed: int = 0
    trial_seed: int = 0  # trial i trains with seed trial_seed + i, in both arms
    rerun_seeds: list[int] = field(default_factory=lambda: [1000, 1001, 1002, 1003, 1004])
    grace_period: int = 5  # ASHA, on validation accuracy per epoch; max_t is train.epochs
    reduction_factor: int = 3
    fixed: dict[str, Any] = field(default_factory=dict)  # both arms
    arms: dict[str, Arm] = field(default_factory=dict)

    def trial_seed_of(self, index: int) -> int:
        return self.trial_seed + index


@dataclass
class Plan:
    """What `vpn-dist study` was asked for and found; saved as OUT/study.json, so --resume and --report-only need no
    flags."""

    spec: str  # the --spec argument
    data: str  # the prepared data directory
    data_label: str  # its kind (fashion-mnist, cifar10, synthetic) or directory name
    num_classes: int
    base: str
    epochs: int  # every trial's, and ASHA's max_t
    trials: int  # per arm
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0

    def resources(self) -> TrialResources:
        return TrialResources.one_worker(self.cpus_per_trial, self.gpus_per_trial)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def command(self, out: Path, trials_of_spec: int | None = None) -> str:
        """The command line that runs (or continues) this study; the data directory by its label."""
        extra = f" --trials {self.trials}" if trials_of_spec is not None and self.trials != trials_of_spec else ""
        return f"vpn-dist study --spec {self.spec} --data DATA/{self.data_label} --out {shown_path(out)}{extra}"


def shown_path(path: Path) -> Path:
    """A path as a report shows it: relative to the working directory (the repository) when it is inside."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def load_study(name: str) -> Study:
    """A named spec (tune_spaces/<name>.py) or a .py file defining STUDY, with its field rules checked."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--spec {name}: no such file")
        loader = importlib.util.spec_from_file_location(f"study_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's own spec file
            raise UserError(f"--spec {name}: the file does not run: {type(err).__name__}: {err}") from None
    else:
        import tune_spaces

        folder = Path(tune_spaces.__file__).parent
        if not name.startswith("study_") or name == "study_axes" or not (folder / f"{name}.py").is_file():
            known = sorted(p.stem for p in folder.glob("study_*.py") if p.stem != "study_axes")
            raise UserError(f"unknown study spec {name!r}; specs are {', '.join(known)} (tune_spaces/<name>.py), "
                            f"or give a .py file defining STUDY")
        module = importlib.import_module(f"tune_spaces.{name}")
    raw = getattr(module, "STUDY", None)
    if not isinstance(raw, dict):
        raise UserError(f"--spec {name}: the file must define a dict named STUDY (see tune_spaces/study_smoke.py)")
    return check_fields(name, dict(raw))


def check_fields(name: str, raw: dict[str, Any]) -> Study:
    names = [f.name for f in dataclasses.fields(Study) if f.name != "name"]
    unknown = set(raw) - set(names)
    if unknown:
        raise UserError(f"study {name}: unknown field(s) {', '.join(sorted(unknown))}; fields are {', '.join(names)}")
    arms = raw.pop("arms", None)
    if not isinstance(arms, dict) or set(arms) != set(ARMS):
        raise UserError(f"study {name}: arms must be a dict with exactly {' and '.join(ARMS)}")
    study = Study(name=name, **raw)
    for arm, body in arms.items():
        if not isinstance(body, dict) or set(body) - {"fixed", "axes"}:
            raise UserError(f"study {name}: arm {arm} must be a dict of 'fixed' and 'axes'")
        study.arms[arm] = Arm(**body)
        overlap = set(study.arms[arm].axes) & (set(study.arms[arm].fixed) | set(study.fixed))
        if overlap:
            raise UserError(f"study {name}: {', '.join(sorted(overlap))} both fixed and an axis in arm {arm}")
        for key, domain in study.arms[arm].axes.items():
            _check_axis(name, key, domain)
    for key in ("trials", "grace_period"):
        if not isinstance(getattr(study, key), int) or getattr(study, key) < 1:
            raise UserError(f"study {name}: {key} must be an integer >= 1, got {getattr(study, key)!r}")
    if not isinstance(study.reduction_factor, int) or study.reduction_factor < 2:
        raise UserError(f"study {name}: reduction_factor must be an integer >= 2, got {study.reduction_factor!r}")
    seeds = study.rerun_seeds
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise UserError(f"study {name}: rerun_seeds must be a list of distinct integers >= 0, got {seeds!r}")
    every = [study.fixed] + [a.fixed for a in study.arms.values()] + [a.axes for a in study.arms.values()]
    if any("train.seed" in keys for keys in every):
        raise UserError(f"study {name}: train.seed is set per trial (trial_seed + i, and rerun_seeds); drop it")
    return study


def _check_axis(name: str, key: str, domain: Any) -> None:
    if isinstance(domain, dict):
        raise UserError(f"study {name}: axis {key!r}: a study draws every axis at random; use tune.choice, "
                        f"tune.loguniform, tune.uniform or tune.randint (no grid_search or nested dict)")
    if key == "optimizer":
        from ray.tune.search.sample import Categorical

        values = domain.categories if isinstance(domain, Categorical) else [domain]
        wrong = [v for v in values if v not in OPTIMIZERS]
        if wrong:
            raise UserError(f"study {name}: axis 'optimizer' takes {', '.join(OPTIMIZERS)} (the authors' two), "
                            f"got {wrong[0]!r}")


def check_rerun_seeds(study: Study, trials: int) -> None:
    """The re-runs' seeds must be fresh: no search trial trained with them."""
    used = set(range(study.trial_seed, study.trial_seed + trials)) & set(study.rerun_seeds)
    if used:
        raise UserError(f"study {study.name}: rerun seed(s) {sorted(used)} are also search trials' seeds "
                        f"(trial_seed {study.trial_seed} + 0..{trials - 1}); choose fresh ones")


# ---------------------------------------------------------------- trials


def draw_params(study: Study, arm: str, index: int) -> dict[str, Any]:
    """Trial `index`'s axis values for `arm`. Each axis has its own generator, seeded by (search_seed, index, axis
    name): an axis both arms have takes the same value in both, and adding an axis changes no other axis's draws."""
    return {key: _draw(domain, np.random.default_rng([study.search_seed, index, zlib.crc32(key.encode())]))
            for key, domain in study.arms[arm].axes.items()}


def _draw(value: Any, rng: np.random.Generator) -> Any:
    """One value: a choice picks a category uniformly and draws what it holds (a category may itself be a
    distribution, or a tuple holding one, e.g. ("norm", tune.loguniform(1, 30))); a distribution samples."""
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(value, Categorical):
        return _draw(value.categories[int(rng.integers(len(value.categories)))], rng)
    if isinstance(value, Domain):
        drawn = value.sample(random_state=int(rng.integers(2**31)))
        return drawn.item() if hasattr(drawn, "item") else drawn
    if isinstance(value, (tuple, list)):
        return type(value)(_draw(v, rng) for v in value)
    return value


def trial_config(study: Study, arm: str, params: dict[str, Any], *, seed: int, run_dir: Path,
                 datasets: dict[str, dict[str, Any]], resources: TrialResources = TrialResources()) -> RunConfig:
    """A trial's validated RunConfig: study fixed < arm fixed < the axis values (`optimizer` expanded to the authors'
    settings) < the seed, on the one data set of `datasets` (sweep.space.dataset_table)."""
    values = dict(params)
    optimizer = values.pop("optimizer", None)
    if optimizer is not None:
        values.update(OPTIMIZERS[optimizer])
    values["train.seed"] = seed
    (label,) = datasets
    settings = SweepSettings(space=study.name, out="", datasets=datasets,
                             fixed={**study.fixed, **study.arms[arm].fixed}, workers=resources.workers,
                             cpus_per_worker=resources.cpus_per_worker, gpu=resources.gpu,
                             gpus_per_trial=resources.gpus_per_trial)
    return resolve_trial(values | {"data": label}, settings, str(run_dir))


def config_id(cfg: RunConfig, data_label: str) -> str:
    """What decides a run's result (not where it runs or what it keeps): a row with another id is never taken as
    this run's, and the run's directory carries it, so a changed spec never resumes another config's checkpoint."""
    values = _flatten(cfg.to_dict())
    kept = {k: v for k, v in values.items() if not any(k == n or k.startswith(f"{n}.") for n in NOT_RESULTS)
            and not (k == "data.resolution" and v is None)}  # configs from before the key keep their ids
    kept["data"] = data_label
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def check_shared(configs: dict[tuple[str, int], RunConfig]) -> None:
    """Both arms train with the same epochs, batch, precision, evaluation subset and base: the same budget."""
    for key in SHARED_SETTINGS:
        seen = {}
        for (arm, index), cfg in configs.items():
            seen.setdefault(repr(_flatten(cfg.to_dict())[key]), (arm, index))
        if len(seen) > 1:
            shown = "; ".join(f"{value} (arm {arm}, trial {index})" for value, (arm, index) in seen.items())
            raise UserError(f"the arms must train alike: {key} differs between trials: {shown}. Fix it in the spec's "
                            f"top-level 'fixed'")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------- the spec in words (the report's spaces table)


def describe(value: Any) -> str:
    """An axis as text: "log-uniform [0.0001, 0.1]", "sgd | adam", "0 (1/4) | log-uniform [0.01, 100] (3/4)"."""
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

    if isinstance(value, Categorical):
        shown = [describe(c) for c in value.categories]
        counts = {text: shown.count(text) for text in dict.fromkeys(shown)}
        if all(n == 1 for n in counts.values()):
            return " | ".join(counts)
        return " | ".join(f"{text} ({n}/{len(shown)})" for text, n in counts.items())
    if isinstance(value, (Float, Integer)):
        sampler = value.get_sampler()
        step = ""
        if isinstance(sampler, Quantized):
            step, sampler = f", step {sampler.q:g}", sampler.sampler
        kind = "log-uniform" if isinstance(sampler, LogUniform) else "uniform"
        if isinstance(value, Integer):
            return f"{kind} integers [{value.lower}, {value.upper}){step}"
        return f"{kind} [{value.lower:g}, {value.upper:g}]{step}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
