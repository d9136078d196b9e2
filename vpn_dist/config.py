"""The typed run config: defaults < preset < YAML file < CLI flags < `--set key=value`, validated once at start.

RunConfig's defaults are what trains well on a user's own data; the paper's protocol is the named preset `paper`
(`--preset paper`, or `preset: paper` at the top of a YAML file), which `configs/*` and `vpn-dist reproduce` use.
Every nonsense value stops the run with a `UserError` that names the key and what is allowed.

Each key's `setting(...)` is its one description: its default, its documentation, the values it allows and the
`vpn-dist train` flag that sets it. The train command's key flags, the choices validation checks and the key table of
docs/config.md (`markdown_table`, compared by tests/test_docs.py) are all made from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vpn_dist.errors import UserError

MODES = ("joint", "generator-only", "baseline", "random", "isotropic")
GENERATORS = ("dnn3", "resnet18")  # the authors' two noise generators (models.build_generator)
BOUNDS = ("none", "elementwise", "norm")
AMP_MODES = ("auto", "off", "bf16", "fp16")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
LOADERS = ("ffcv", "memory")


def setting(default: Any, doc: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None) -> Any:
    """A config field with its documentation beside it; `choices`: the values it allows (null too where its type is
    optional); `flag`: the `vpn-dist train` option that sets it."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "flag": flag})


# The paper's protocol (section 4.1; where it is silent, the authors' code: docs/fidelity.md), in fp32
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"train.epochs": 40, "train.batch_size": 256, "train.lr": 1e-3, "train.optimizer": "sgd",
              "train.momentum": 0.9, "train.weight_decay": 5e-4, "train.lr_schedule": "cosine", "train.amp": "off",
              "vpn.gamma": None, "vpn.m": 1, "vpn.bound": "none", "vpn.C": None},
}


@dataclass
class DataConfig:
    path: str = setting("", "a directory written by `vpn-dist prep`", flag="--data")
    num_workers: int = setting(2, "FFCV decoding threads per training worker")
    os_cache: bool = setting(True, "FFCV page-cache mode")
    augment: bool = setting(False, "flip/crop augmentation; off, as in the paper")
    loader: str = setting("ffcv", "ffcv (decodes each pass; any size), or memory (the set decoded once into uint8 "
                                  "tensors on the device, batches by index: the same batches, faster for sets that fit)",
                          choices=LOADERS)
    resolution: int | None = setting(None, "JPEG sets: train on FFCV's random-resized crops + flips and evaluate on "
                                           "centre crops of this side, made while decoding; null: the stored size")


@dataclass
class ModelConfig:
    base: str = setting("dnn3", "base model: sr, dnn3, resnet18/34/50, or any torchvision classifier", flag="--base")
    generator: str = setting("dnn3", "noise generator; none for the modes that train none (baseline, random, "
                                     "isotropic)", choices=GENERATORS + ("none",), flag="--generator")
    generator_init_std: float | str | None = setting(
        None, "the DNN3 generator's initial weights, N(0, std^2) with zero biases: null is the authors' 0.002 "
              "(sigma starts near 0); `pytorch`: PyTorch's default Linear init (uniform in +-1/sqrt(fan_in), std "
              "0.01-0.02 for these inputs). The ResNet-18 generator always starts from PyTorch's default, as the "
              "authors'")


@dataclass
class VPNConfig:
    mode: str = setting("joint", "what trains: joint, generator-only (on a trained base), baseline, random (the "
                                 "paper's ablations), isotropic (a control: x + N(0, s^2 I) with s = vpn.noise_std, "
                                 "training only)", choices=MODES, flag="--mode")
    gamma: float | None = setting(None, "conditioning x_hat = x + gamma * y; null: the paper's 0.01/K (the authors' "
                                        "code: 0.01/(K-1))")
    m: int = setting(1, "noise draws per sample")
    bound: str = setting("none", "the variance bound ||Sigma|| <= C: none, elementwise (sigma <= C), "
                                 "norm (||sigma||_2 <= C per sample); a projection, gradients flow", choices=BOUNDS)
    C: float | None = setting(None, "the bound's C (null with bound none)")
    random_fraction: float = setting(0.1, "the `random` ablation: share of pixels that get N(0, 1)")
    noise_std: float | None = setting(None, "the `isotropic` control's s: every pixel of every training image gets "
                                            "N(0, s^2); `reproduce --modes isotropic --sigma-from GRID` sets it per "
                                            "seed to the mean sigma that seed's joint run learned")


@dataclass
class TrainConfig:
    epochs: int = setting(40, "training epochs (the paper's 40)", flag="--epochs")
    batch_size: int = setting(256, "per worker (the paper's 256)")
    eval_batch_size: int = setting(512, "evaluation batch")
    lr: float = setting(1e-3, "learning rate (the paper's 0.001)")
    # The authors' Adam switch: it trains on new data where their SGD default at this lr barely moves
    # (docs/config.md, "Defaults and presets"); the paper preset keeps their SGD
    optimizer: str = setting("adam", "adam, or sgd (the authors' default; the paper preset)", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "sgd only; 0 is plain SGD")
    weight_decay: float = setting(5e-4, "L2, on every parameter (base and generator), as the authors'")
    lr_schedule: str = setting("constant", "constant, or cosine over train.epochs, stepped per epoch (the authors' "
                                           "SGD; the paper preset)", choices=LR_SCHEDULES)
    amp: str = setting("auto", "auto: bf16 on GPUs that support it, and on CPUs where a probe finds it faster; "
                               "or off, bf16, fp16 (GPU, with a gradient scaler); sigma is bounded and the noise "
                               "sampled in fp32; the paper preset says off (fp32, as the paper)", choices=AMP_MODES)
    channels_last: bool = setting(False, "memory format of models and batches (faster convolutions on GPUs: ResNets)")
    compile: bool = setting(False, "torch.compile the training step's models (GPU; on CPU it needs a C++ compiler and "
                                   "a minute to compile)")
    device: str = setting("auto", "where to train: auto (a GPU if there is one), cpu, cuda", choices=DEVICES)
    seed: int = setting(0, "model init, data order and noise (reseeded per epoch and rank: resumes replay exactly)")
    eval_every: int = setting(1, "epochs between test evaluations (the last epoch always evaluates)")
    epoch_eval_images: int | None = setting(None, "per-epoch curves use a fixed random subset of this many images "
                                                  "per split (0: all; null: sized to about a twentieth of the epoch's "
                                                  "training cost, 100..500); the last epoch evaluates every image")
    alg2_top_k: int = setting(0, "0: exact Algorithm 2 (all K classes); k > 0: approximate, scoring only the k classes "
                                 "most probable under h(x) (docs/benchmarks.md: agreement and rows saved)")
    log_every: int = setting(10, "steps between per-step TensorBoard points")
    figure_every: int = setting(5, "epochs between Figure-4 panels")
    keep_checkpoints: int = setting(2, "checkpoints kept")
    max_failures: int = setting(0, "Ray Train restarts of the worker group after a worker dies (-1: unlimited)")
    fault: str | None = setting(None, "fault injection for drills: RANK:EPOCH:STEP exits that rank once (0-based "
                                      "epoch and step)")
    init_from: str | None = setting(None, "generator-only: the run directory of the trained base model",
                                    flag="--init-from")


@dataclass
class DistConfig:
    workers: int = setting(0, "Ray Train workers; 0: train in this process, no Ray", flag="--workers")
    gpu: bool = setting(False, "one GPU (or dist.gpus_per_worker) per Ray Train worker", flag="--gpu")
    cpus_per_worker: int = setting(1, "CPUs Ray reserves per worker (its torch threads on CPU)",
                                   flag="--cpus-per-worker")
    gpus_per_worker: float = setting(1.0, "with dist.gpu: a fraction lets small runs share a GPU "
                                          "(e.g. 0.25: four per GPU)")


@dataclass
class RunConfig:
    out: str = setting("", "the run directory: config.yaml, metrics.json, checkpoints/, tb/", flag="--out")
    preset: str | None = setting(None, "the named settings under the file and flags: paper (the paper's protocol), "
                                       "or null", choices=tuple(PRESETS))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vpn: VPNConfig = field(default_factory=VPNConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fault_point(self) -> tuple[int, int, int] | None:
        if self.train.fault is None:
            return None
        rank, epoch, step = (int(v) for v in self.train.fault.split(":"))
        return rank, epoch, step


def preset(name: str | None) -> RunConfig:
    """RunConfig's defaults under the named preset (None: the defaults alone)."""
    if name is None:
        return RunConfig()
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    cfg = from_dict(PRESETS[name])
    cfg.preset = name
    return cfg


def config_keys(node: Any = None, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted config key (`train.lr`, ...) -> its dataclass field (its default; its setting's doc, choices and
    flag in metadata)."""
    keys: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(node or RunConfig):
        if f.default_factory is not dataclasses.MISSING:  # a section
            keys.update(config_keys(f.default_factory, f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = f
    return keys


def config_value(cfg: RunConfig, key: str) -> Any:
    """cfg's value of a dotted key."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def choices_of(key: str) -> tuple[str, ...]:
    """The values a key allows (e.g. for a benchmark's flag that sets it)."""
    return config_keys()[key].metadata["choices"]


def train_flags() -> dict[str, dataclasses.Field]:
    """The keys `vpn-dist train` sets with a flag of their own (`--base` for model.base, ...) -> their fields."""
    return {key: f for key, f in config_keys().items() if f.metadata["flag"]}


def markdown_table() -> str:
    """docs/config.md's key table: every key, its default and its doc (and the flag that sets it)."""
    def shown(value: Any) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, f in config_keys().items():
        meaning = f.metadata["doc"].replace("|", "\\|") + (f" (`{f.metadata['flag']}`)" if f.metadata["flag"] else "")
        rows.append(f"| `{key}` | {shown(f.default)} | {meaning} |")
    return "\n".join(rows) + "\n"


def paper_gamma(num_classes: int) -> float:
    """The paper's gamma, 0.01 / K (the authors' code has 0.01 / (K - 1))."""
    return 0.01 / num_classes


def resolved_gamma(cfg: RunConfig, num_classes: int) -> float:
    """vpn.gamma, or the paper's when it is null."""
    return cfg.vpn.gamma if cfg.vpn.gamma is not None else paper_gamma(num_classes)


# ---------------------------------------------------------------- building


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Overlay a (possibly partial) nested dict onto `base` (default: the preset it names, or the defaults); unknown
    keys are errors."""
    cfg = base or preset((data or {}).get("preset"))
    for key, value in (data or {}).items():
        _set(cfg, key, value, from_text=False)
    return cfg


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """The file's keys over `base` (or over the preset it names, or the defaults)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    named = (data or {}).get("preset")
    if base is not None and named is not None and named != base.preset:
        raise UserError(f"config file {path} is written for preset {named!r}, not {base.preset!r}")
    return from_dict(_flatten(data or {}), base)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`--set train.lr=0.01 vpn.bound=norm`: values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set expects key=value, got {item!r}")
        _set(cfg, key.strip(), text, from_text=True)
    return cfg


def save_yaml(cfg: RunConfig, path: Path) -> None:
    from vpn_dist.observe import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _set(cfg: RunConfig, dotted: str, value: Any, from_text: bool) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _set(cfg, f"{dotted}.{key}", sub, from_text)
        return
    *path, leaf = dotted.split(".")
    node: Any = cfg
    for part in path:
        if not dataclasses.is_dataclass(node) or part not in _field_types(node):
            raise UserError(f"unknown config key {dotted!r}; sections are {', '.join(_field_types(cfg))}")
        node = getattr(node, part)
    types = _field_types(node)
    if leaf not in types or dataclasses.is_dataclass(getattr(node, leaf)):
        allowed = ", ".join(f"{'.'.join(path)}.{k}" if path else k for k in types)
        raise UserError(f"unknown config key {dotted!r}; allowed keys here: {allowed}")
    setattr(node, leaf, _coerce(dotted, value, types[leaf], from_text))


def _field_types(node: Any) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(node)}


def _coerce(key: str, value: Any, type_name: str, from_text: bool) -> Any:
    types = [part.strip() for part in type_name.split("|")]
    optional = "None" in types
    base = types[0]
    if from_text:  # strings stay as typed (YAML would read 1:1:3 as the base-60 number 3663)
        text = value.strip()
        value = text if base == "str" and text.lower() not in ("", "null", "none", "~") else yaml.safe_load(text or "~")
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise UserError(f"config key {key!r} must be set (type {type_name})")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        if isinstance(value, str) and "str" in types:  # a key that takes a number or a word (validate checks which)
            return value
        raise UserError(f"config key {key!r} expects {base}, got {value!r}") from None


# ---------------------------------------------------------------- validation


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value once, before anything starts; return cfg for chaining."""
    from vpn_dist.models import BASE_MODELS, is_torchvision_classifier

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise UserError(f"config key {key!r} = {value!r} is not allowed; {allowed}")

    v, t, m, d = cfg.vpn, cfg.train, cfg.model, cfg.dist
    for key, f in config_keys(type(cfg)).items():  # the keys with a list of values (their setting's choices)
        allowed, value = f.metadata.get("choices"), config_value(cfg, key)
        if allowed is not None:
            nullable = "None" in str(f.type)
            need(value in allowed or (nullable and value is None), key,
                 f"one of {', '.join(allowed)}{' or null' if nullable else ''}", value)
    need(bool(cfg.out), "out", "give the run directory with --out", cfg.out)
    need(bool(cfg.data.path), "data.path", "give a directory written by `vpn-dist prep` with --data", cfg.data.path)
    need(m.base in BASE_MODELS or is_torchvision_classifier(m.base), "model.base",
         f"one of {', '.join(BASE_MODELS)} or a torchvision classification model name", m.base)
    init = m.generator_init_std
    need(init is None or init == "pytorch" or (m.generator == "dnn3" and not isinstance(init, str)
                                               and math.isfinite(init) and init > 0),
         "model.generator_init_std", "null (the authors' init), pytorch, or a number > 0 with the dnn3 generator", init)
    if v.mode in ("baseline", "random", "isotropic"):
        need(m.generator == "none", "model.generator",
             f"mode {v.mode} trains no generator: use --generator none", m.generator)
    else:
        need(m.generator != "none", "model.generator", f"mode {v.mode} needs a generator: {', '.join(GENERATORS)}",
             m.generator)
    need(v.gamma is None or (math.isfinite(v.gamma) and v.gamma >= 0), "vpn.gamma", "a number >= 0 (null: 0.01/K)", v.gamma)
    need(1 <= v.m <= 1024, "vpn.m", "an integer in 1..1024 (the batch grows m-fold)", v.m)
    if v.bound == "none":
        need(v.C is None, "vpn.C", "null when vpn.bound is none (set vpn.bound to elementwise or norm)", v.C)
    else:
        need(v.C is not None and math.isfinite(v.C) and v.C > 0, "vpn.C", f"a number > 0 with vpn.bound={v.bound}", v.C)
    need(0 < v.random_fraction <= 1, "vpn.random_fraction", "a fraction in (0, 1]", v.random_fraction)
    if v.mode == "isotropic":
        need(v.noise_std is not None and math.isfinite(v.noise_std) and v.noise_std >= 0, "vpn.noise_std",
             "a number >= 0 with vpn.mode=isotropic", v.noise_std)
    else:
        need(v.noise_std is None, "vpn.noise_std", "null unless vpn.mode is isotropic", v.noise_std)
    # upper bounds: values past them are typos that would otherwise run for ever or exhaust memory
    need(1 <= t.epochs <= 100_000, "train.epochs", "an integer in 1..100000", t.epochs)
    need(1 <= t.batch_size <= 2**20, "train.batch_size", "an integer in 1..1048576", t.batch_size)
    need(1 <= t.eval_batch_size <= 2**20, "train.eval_batch_size", "an integer in 1..1048576", t.eval_batch_size)
    need(0 <= t.seed < 2**32, "train.seed", "an integer in 0..4294967295", t.seed)
    need(math.isfinite(t.lr) and t.lr > 0, "train.lr", "a number > 0", t.lr)
    need(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    need(0 <= t.momentum < 1, "train.momentum", "a number in [0, 1)", t.momentum)
    need(t.alg2_top_k >= 0, "train.alg2_top_k", "an integer >= 0 (0: exact Algorithm 2)", t.alg2_top_k)
    need(t.epoch_eval_images is None or t.epoch_eval_images >= 0, "train.epoch_eval_images",
         "an integer >= 0 (0: every image) or null (sized to the epoch)", t.epoch_eval_images)
    need(not (t.amp == "fp16" and t.device == "cpu"), "train.amp", "bf16 or off on the CPU (fp16 needs a GPU)", t.amp)
    for key in ("eval_every", "log_every", "figure_every", "keep_checkpoints"):
        need(getattr(t, key) >= 1, f"train.{key}", "an integer >= 1", getattr(t, key))
    need(t.max_failures >= -1, "train.max_failures", "an integer >= 0 (or -1: unlimited)", t.max_failures)
    if t.fault is not None:
        parts = t.fault.split(":")
        need(len(parts) == 3 and all(p.isdigit() for p in parts), "train.fault",
             "RANK:EPOCH:STEP, e.g. 1:1:5 (rank 1 exits at step 5 of epoch 1, once)", t.fault)
    if v.mode == "generator-only":
        need(bool(t.init_from), "train.init_from", "the run dir of a trained base model (--init-from RUN_DIR)", t.init_from)
    need(1 <= cfg.data.num_workers <= 1024, "data.num_workers", "an integer in 1..1024", cfg.data.num_workers)
    need(cfg.data.resolution is None or 8 <= cfg.data.resolution <= 4096, "data.resolution",
         "an integer in 8..4096, or null (the stored size)", cfg.data.resolution)
    need(0 <= d.workers <= 4096, "dist.workers", "an integer in 0..4096 (0 runs in this process)", d.workers)
    need(0 < d.gpus_per_worker <= 1 or (float(d.gpus_per_worker).is_integer() and d.gpus_per_worker <= 64),
         "dist.gpus_per_worker", "a fraction in (0, 1] or a whole number of GPUs up to 64", d.gpus_per_worker)
    need(1 <= d.cpus_per_worker <= 1024, "dist.cpus_per_worker", "an integer in 1..1024", d.cpus_per_worker)
    need(not (d.gpu and t.device == "cpu"), "dist.gpu", "false when train.device is cpu", d.gpu)
    return cfg
