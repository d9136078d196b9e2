"""Every input damaged on purpose: each entry point starts from a valid input, and each damaged variant must end with
one line `vpn-dist <command>: error: <what and where>` and exit 2 (1: a failure found during training), or succeed;
never a traceback, never half-written output.

The default run tries a fixed, seeded sample of each entry point's variants; `pytest -m slow tests/test_fuzz.py`
(part of `make test-slow`) tries them all. Variants that pass every check and would start Ray (tune, reproduce)
stop at `run_trials`: what they test is the checking before it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from source_trees import make_cifar_batches, make_fashion, make_tiny_imagenet, make_tree
from vpn_dist.cli import main

REPO = Path(__file__).resolve().parents[1]
SEED = 0
DEFAULT_SAMPLE = {"prep": 30, "train": 18, "eval": 12, "tune": 10, "reproduce": 8, "bench": 6}
ERROR_LINE = re.compile(r"^vpn-dist [a-z]+( [a-z]+)?: (error|training diverged): \S")
LEFTOVERS = ("*.partial", "*.tmp")
# A library's logger that kept the stream of an earlier test's capture: its complaint is not ours.
LOGGING_ERROR = re.compile(r"--- Logging error ---.*?\nArguments: [^\n]*\n", re.DOTALL)


class Accepted(Exception):
    """A sweep or grid that passed every check and would now start Ray."""


# ---------------------------------------------------------------- ways to damage a file or a mapping

def truncations(size: int) -> dict[str, int]:
    return {"empty": 0, "cut at 1": 1, "cut at 16": 16, "cut at 100": 100, "cut in half": size // 2,
            "last byte cut": size - 1}


def damage_file(path: Path, how: str, rng: random.Random) -> None:
    blob = bytearray(path.read_bytes())
    if how.startswith("cut") or how in ("empty", "last byte cut"):
        blob = blob[:truncations(len(blob))[how]]
    elif how == "header zeroed":
        blob[:64] = bytes(min(64, len(blob)))
    elif how == "bytes flipped":
        for _ in range(8):
            i = rng.randrange(len(blob))
            blob[i] ^= 1 << rng.randrange(8)
    elif how == "header bytes flipped":  # the first 4 KiB: headers, field descriptors, metadata tables
        for _ in range(4):
            i = rng.randrange(min(len(blob), 4096))
            blob[i] ^= 1 << rng.randrange(8)
    elif how == "a directory in its place":
        path.unlink()
        path.mkdir()
        return
    elif how == "missing":
        path.unlink()
        return
    else:
        raise AssertionError(how)
    path.write_bytes(bytes(blob))


FILE_DAMAGE = ("empty", "cut at 1", "cut at 16", "cut at 100", "cut in half", "last byte cut", "header zeroed",
               "bytes flipped", "header bytes flipped", "a directory in its place", "missing")
FIELD_DAMAGE = {"removed": None, "a string": "oops", "a list": [1, "x"], "null": "null", "negative": -1,
                "huge": 10**12, "zero": 0, "a float": 0.5}


def damage_field(data: dict, dotted: str, how: str) -> None:
    *path, leaf = dotted.split(".")
    node = data
    for part in path:
        node = node[part]
    if how == "removed":
        node.pop(leaf, None)
    else:
        value = FIELD_DAMAGE[how]
        node[leaf] = None if value == "null" else value


def dotted_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys += dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


# ---------------------------------------------------------------- valid inputs, made once per session

@dataclass
class Valid:
    data: Path            # a prepared synthetic set with a val split, 3x16x16, 4 classes
    run: Path             # a 1-epoch run trained on it
    sources: Path         # one valid source tree per prep kind
    tmp: Path


@pytest.fixture(scope="session")
def valid(tmp_path_factory) -> Valid:
    root = tmp_path_factory.mktemp("fuzz_valid")
    data, run = root / "data", root / "run"
    assert main(["prep", "synthetic", "--out", str(data), "--train-size", "160", "--test-size", "40", "--val", "40",
                 "--size", "16x16", "--seed", "0"]) == 0
    assert main(["train", "--data", str(data), "--base", "sr", "--generator", "dnn3", "--mode", "joint", "--epochs", "1",
                 "--out", str(run), *fast_settings()]) == 0
    sources = root / "sources"
    make_fashion(sources / "fashion-mnist", gz=False, n_train=30, n_test=10)
    make_cifar_batches(sources / "cifar10", per_batch=3)
    make_tiny_imagenet(sources / "tiny-imagenet", per_class=2, val_n=3)
    make_tree(sources / "imagefolder", per_class=(2, 1), size=(8, 8))
    return Valid(data, run, sources, root)


def fast_settings() -> list[str]:
    return [arg for key in ("train.batch_size=64", "train.figure_every=100", "data.num_workers=1",
                            "train.epoch_eval_images=0") for arg in ("--set", key)]


# ---------------------------------------------------------------- the variants of each entry point

@dataclass(frozen=True)
class Variant:
    entry: str
    name: str
    make: Callable  # (valid, tmp, rng) -> (argv, outputs that must not be half-written)

    def __str__(self) -> str:
        return f"{self.entry}: {self.name}"


def copy(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def damaged_data(target: str, how: str):
    """A copy of the prepared set with `target` (a file, or a meta.json field) damaged `how`."""
    def make(valid: Valid, tmp: Path, rng: random.Random) -> Path:
        data = copy(valid.data, tmp, "data")
        if target.startswith("meta:"):
            meta = json.loads((data / "meta.json").read_text())
            if how in FIELD_DAMAGE:
                damage_field(meta, target[5:], how)
            else:
                meta[target[5:]] = json.loads(how)
            (data / "meta.json").write_text(json.dumps(meta))
        else:
            damage_file(data / target, how, rng)
        return data
    return make


DATA_FILES = ("train.beton", "val.beton", "test.beton", "meta.json")
META_FIELDS = ("num_classes", "class_names", "shape", "splits", "splits.train", "splits.test", "mean", "std",
               "storage", "has_mask")
DISAGREEING_META = {  # data that disagrees with its metadata
    "num_classes": ["2", "1"], "shape": ["[1, 16, 16]", "[3, 8, 8]", "[3, 16]"],
    "splits": ['{"train": 100, "val": 40, "test": 40}', '{"train": 160, "val": 40, "test": 41}',
               '{"train": 160, "test": 40, "extra": 3}'],
    "has_mask": ["false"], "storage": ['"jpeg"'],
}


def data_variants() -> list[tuple[str, Callable]]:
    found = [(f"data {f} {how}", damaged_data(f, how)) for f in DATA_FILES for how in FILE_DAMAGE]
    found += [(f"data meta.json {k} {how}", damaged_data(f"meta:{k}", how)) for k in META_FIELDS for how in FIELD_DAMAGE]
    found += [(f"data meta.json {k}={v}", damaged_data(f"meta:{k}", v)) for k, vs in DISAGREEING_META.items()
              for v in vs]
    return found


def missing_paths(valid: Valid, tmp: Path) -> dict[str, Path]:
    """Paths that are not what the flag wants: nothing there, a file, a directory under a file."""
    a_file = tmp / "a_file"
    a_file.write_text("not a directory\n")
    return {"missing": tmp / "nowhere", "a file": a_file, "under a file": a_file / "sub"}


def prep_variants() -> list[Variant]:
    found = []
    kinds = {"fashion-mnist": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                               "t10k-labels-idx1-ubyte"],
             "cifar10": [f"cifar-10-batches-py/{n}" for n in ("data_batch_1", "data_batch_5", "test_batch",
                                                                "batches.meta")],
             "tiny-imagenet": [f"tiny-imagenet-200/{n}" for n in ("wnids.txt", "words.txt", "val/val_annotations.txt",
                                                                    "train/n01/images/n01_1.JPEG",
                                                                    "val/images/val_0.JPEG")],
             "imagefolder": ["train/ant/000.png", "train/cat/001.png", "test/bee/000.png"]}
    for kind, files in kinds.items():
        for name in files:
            for how in FILE_DAMAGE:
                def make(valid, tmp, rng, kind=kind, name=name, how=how):
                    src = copy(valid.sources / kind, tmp, "src")
                    damage_file(src / name, how, rng)
                    out = tmp / "out"
                    return ["prep", kind, "--source", str(src), "--out", str(out)], [out]
                found.append(Variant("prep", f"{kind} {name} {how}", make))
        for where in ("missing", "a file", "under a file"):
            def make(valid, tmp, rng, kind=kind, where=where):
                out = tmp / "out"
                return ["prep", kind, "--source", str(missing_paths(valid, tmp)[where]), "--out", str(out)], [out]
            found.append(Variant("prep", f"{kind} --source {where}", make))
    for kind in ("synthetic", "imagefolder"):
        for where in ("a file", "under a file", "holding a prepared set"):
            def make(valid, tmp, rng, kind=kind, where=where):
                out = copy(valid.data, tmp, "out") if where == "holding a prepared set" else missing_paths(valid, tmp)[where]
                if kind == "imagefolder":
                    return ["prep", kind, "--source", str(valid.sources / "imagefolder"), "--out", str(out)], [out]
                return ["prep", kind, "--out", str(out), "--train-size", "20", "--test-size", "8"], [out]
            found.append(Variant("prep", f"{kind} --out {where}", make))
    for flags in (["--classes", "0"], ["--classes", "9"], ["--train-size", "0"], ["--test-size", "-3"],
                  ["--size", "0x4"], ["--size", "16"], ["--val", "-1"], ["--val", "20"], ["--seed", "x"],
                  ["--jpeg-quality", "101"], ["--workers", "0"]):
        def make(valid, tmp, rng, flags=flags):
            out = tmp / "out"
            return ["prep", "synthetic", "--out", str(out), "--train-size", "20", "--test-size", "8", *flags], [out]
        found.append(Variant("prep", f"synthetic {' '.join(flags)}", make))
    return found


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--base", "sr", "--generator", "dnn3", "--mode", "joint", "--epochs", "1",
            "--out", str(out), *fast_settings(), *extra]


def fast_config() -> dict:
    """The run config a --config file holds: the fast settings, written out as YAML sections."""
    from vpn_dist.config import RunConfig

    cfg = RunConfig().to_dict()
    del cfg["out"]
    cfg["data"].pop("path")
    cfg["model"] |= {"base": "sr", "generator": "dnn3"}
    cfg["train"] |= {"epochs": 1, "batch_size": 64, "figure_every": 100, "epoch_eval_images": 0}
    cfg["data"]["num_workers"] = 1
    return cfg


def train_variants() -> list[Variant]:
    found = []
    for name, make_data in data_variants():
        def make(valid, tmp, rng, make_data=make_data):
            out = tmp / "run"
            return train_argv(make_data(valid, tmp, rng), out), [out]
        found.append(Variant("train", name, make))
    for key in dotted_keys(fast_config()):
        for how in FIELD_DAMAGE:
            def make(valid, tmp, rng, key=key, how=how):
                cfg = fast_config()
                damage_field(cfg, key, how)
                (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
                out = tmp / "run"
                one_epoch = [] if key == "train.epochs" and how != "removed" else ["--epochs", "1"]  # default: 40
                return ["train", "--data", str(valid.data), "--config", str(tmp / "config.yaml"), "--out", str(out),
                        *one_epoch], [out]
            found.append(Variant("train", f"config.yaml {key} {how}", make))
    for how in ("empty", "cut in half", "header zeroed", "bytes flipped", "a directory in its place"):
        def make(valid, tmp, rng, how=how):
            (tmp / "config.yaml").write_text(yaml.safe_dump(fast_config()))
            damage_file(tmp / "config.yaml", how, rng)
            out = tmp / "run"
            return ["train", "--data", str(valid.data), "--config", str(tmp / "config.yaml"), "--out", str(out),
                    "--epochs", "1"], [out]
        found.append(Variant("train", f"config.yaml {how}", make))
    for flag in ("--data", "--out", "--init-from", "--resume", "--config"):
        for where in ("missing", "a file", "under a file"):
            def make(valid, tmp, rng, flag=flag, where=where):
                path = str(missing_paths(valid, tmp)[where])
                out = tmp / "run"
                argv = train_argv(valid.data, out)
                if flag in ("--data", "--out"):
                    argv[argv.index(flag) + 1] = path
                elif flag == "--init-from":
                    argv[argv.index("joint")] = "generator-only"
                    argv += ["--init-from", path]
                elif flag == "--resume":
                    argv = ["train", "--resume", path]
                else:
                    argv += ["--config", path]
                return argv, [out, Path(path)]
            found.append(Variant("train", f"{flag} {where}", make))
    for how in FILE_DAMAGE:  # a stopped run's checkpoint damaged, then --resume
        def make(valid, tmp, rng, how=how):
            run = copy(valid.run, tmp, "run")
            damage_file(next(run.glob("checkpoints/epoch_*/state.pt")), how, rng)
            return ["train", "--resume", str(run), "--epochs", "2"], [run]
        found.append(Variant("train", f"--resume with state.pt {how}", make))
    for how in ("read-only parent", "read-only --out"):
        def make(valid, tmp, rng, how=how):
            parent = tmp / "ro"
            parent.mkdir()
            out = parent / "run"
            if how == "read-only --out":
                out.mkdir()
                out.chmod(0o500)
            parent.chmod(0o500)
            return train_argv(valid.data, out), [out]
        found.append(Variant("train", how, make))
    return found


def eval_variants() -> list[Variant]:
    found = []
    run_files = {"config.yaml": "config.yaml", "state.pt": "checkpoints/epoch_0001/state.pt",
                 "metrics.json": "metrics.json"}
    for label, rel in run_files.items():
        for how in FILE_DAMAGE:
            def make(valid, tmp, rng, rel=rel, how=how):
                run = copy(valid.run, tmp, "run")
                damage_file(run / rel, how, rng)
                return ["eval", "--run", str(run)], [run]
            found.append(Variant("eval", f"run {label} {how}", make))
    for key in dotted_keys(fast_config()) + ["out", "data.path"]:
        for how in ("removed", "a string", "a list", "negative", "huge"):
            def make(valid, tmp, rng, key=key, how=how):
                run = copy(valid.run, tmp, "run")
                cfg = yaml.safe_load((run / "config.yaml").read_text())
                damage_field(cfg, key, how)
                (run / "config.yaml").write_text(yaml.safe_dump(cfg))
                return ["eval", "--run", str(run)], [run]
            found.append(Variant("eval", f"run config.yaml {key} {how}", make))
    for name, make_data in data_variants():
        def make(valid, tmp, rng, make_data=make_data):
            run = copy(valid.run, tmp, "run")
            return ["eval", "--run", str(run), "--data", str(make_data(valid, tmp, rng))], [run]
        found.append(Variant("eval", f"--data {name}", make))
    for where in ("missing", "a file", "under a file"):
        def make(valid, tmp, rng, where=where):
            return ["eval", "--run", str(missing_paths(valid, tmp)[where])], []
        found.append(Variant("eval", f"--run {where}", make))
    for how in ("checkpoints removed", "--alg2-top-k -1"):
        def make(valid, tmp, rng, how=how):
            run = copy(valid.run, tmp, "run")
            if how == "checkpoints removed":
                shutil.rmtree(run / "checkpoints")
                return ["eval", "--run", str(run)], [run]
            return ["eval", "--run", str(run), "--alg2-top-k", "-1"], [run]
        found.append(Variant("eval", how, make))
    return found


SPACE_FIELDS = ("description", "data", "axes", "fixed", "samples", "grace_period", "reduction_factor", "metric")
SPACE_FIELD_DAMAGE = {"removed": None, "a string": "'oops'", "a list": "[1, 'x']", "None": "None", "negative": "-1",
                      "zero": "0", "a dict": "{'x': 1}"}


def space_text(field: str | None = None, value: str | None = None) -> str:
    """tune_spaces/smoke.py, with one top-level field set to `value` (None: removed)."""
    text = (REPO / "tune_spaces" / "smoke.py").read_text()
    if field is None:
        return text
    return text + (f"\nSPACE.pop({field!r})\n" if value is None else f"\nSPACE[{field!r}] = {value}\n")


def tune_variants() -> list[Variant]:
    found = []

    def sweep(space: Path, data: Path, out: Path, *extra: str) -> list[str]:
        return ["tune", "--space", str(space), "--data", str(data), "--out", str(out), *extra]

    for field in SPACE_FIELDS:
        for how, value in SPACE_FIELD_DAMAGE.items():
            def make(valid, tmp, rng, field=field, value=value):
                (tmp / "space.py").write_text(space_text(field, value))
                return sweep(tmp / "space.py", valid.data, tmp / "sweep"), [tmp / "sweep"]
            found.append(Variant("tune", f"space {field} {how}", make))
    for axis, value in (("vpn.m", "tune.choice([0, 1])"), ("train.lr", "tune.choice([-1.0])"),
                        ("arch", "tune.choice(['dnn3'])"), ("vpn.bound_C", "tune.choice([('norm', None)])"),
                        ("no.such.key", "tune.choice([1])"), ("vpn.gamma_scale", "tune.uniform(-2, -1)")):
        def make(valid, tmp, rng, axis=axis, value=value):
            (tmp / "space.py").write_text(space_text() + f"\nSPACE['axes'][{axis!r}] = {value}\n")
            return sweep(tmp / "space.py", valid.data, tmp / "sweep"), [tmp / "sweep"]
        found.append(Variant("tune", f"space axis {axis} = {value}", make))
    for how in ("empty", "cut in half", "header zeroed", "bytes flipped", "a directory in its place", "missing"):
        def make(valid, tmp, rng, how=how):
            (tmp / "space.py").write_text(space_text())
            damage_file(tmp / "space.py", how, rng)
            return sweep(tmp / "space.py", valid.data, tmp / "sweep"), [tmp / "sweep"]
        found.append(Variant("tune", f"space file {how}", make))
    for name, make_data in data_variants():
        def make(valid, tmp, rng, make_data=make_data):
            return sweep(Path("smoke"), make_data(valid, tmp, rng), tmp / "sweep"), [tmp / "sweep"]
        found.append(Variant("tune", f"--data {name}", make))
    for where in ("a file", "under a file"):
        def make(valid, tmp, rng, where=where):
            out = missing_paths(valid, tmp)[where]
            return sweep(Path("smoke"), valid.data, out), [out]
        found.append(Variant("tune", f"--out {where}", make))
    for how in ("empty", "cut in half", "header zeroed", "bytes flipped", "a directory in its place", "missing"):
        def make(valid, tmp, rng, how=how):
            out = tmp / "sweep"
            out.mkdir()
            (out / "sweep.json").write_text(json.dumps({"space_arg": "smoke", "settings": {"space": "smoke"}}))
            damage_file(out / "sweep.json", how, rng)
            return sweep(Path("smoke"), valid.data, out, "--resume"), [out]
        found.append(Variant("tune", f"--resume with sweep.json {how}", make))
    return found


def reproduce_variants() -> list[Variant]:
    found = []

    def grid_argv(data: Path, out: Path, *extra: str) -> list[str]:
        return ["reproduce", "--out", str(out), "--table", "1", "--data", str(data), "--seeds", "1",
                "--bases", "sr", "--generators", "dnn3", "--epochs", "1", *extra]

    for name, make_data in data_variants():
        def make(valid, tmp, rng, make_data=make_data):
            return grid_argv(make_data(valid, tmp, rng), tmp / "grid"), [tmp / "grid"]
        found.append(Variant("reproduce", f"--data {name}", make))
    for flags in (["--table", "4"], ["--seeds", "0"], ["--epochs", "0"], ["--bases", "nope"], ["--modes", "nope"],
                  ["--set", "vpn.m=0"], ["--set", "nokey=1"], ["--set", "train.lr"], ["--max-concurrent", "0"],
                  ["--gpus-per-trial", "-1"]):
        def make(valid, tmp, rng, flags=flags):
            return grid_argv(valid.data, tmp / "grid", *flags), [tmp / "grid"]
        found.append(Variant("reproduce", " ".join(flags), make))
    for where in ("a file", "under a file"):
        def make(valid, tmp, rng, where=where):
            out = missing_paths(valid, tmp)[where]
            return grid_argv(valid.data, out), [out]
        found.append(Variant("reproduce", f"--out {where}", make))
    for how in ("empty", "cut in half", "header zeroed", "bytes flipped", "a directory in its place", "missing"):
        def make(valid, tmp, rng, how=how):
            out = tmp / "grid"
            out.mkdir()
            plan = {"tables": [1], "data": {"synthetic": str(valid.data)}, "seeds": 1, "bases": ["sr"],
                    "generators": ["dnn3"], "modes": None, "epochs": 1}
            (out / "reproduce.json").write_text(json.dumps(plan))
            damage_file(out / "reproduce.json", how, rng)
            return ["reproduce", "--out", str(out), "--resume"], [out]
        found.append(Variant("reproduce", f"--resume with reproduce.json {how}", make))
    return found


def bench_variants() -> list[Variant]:
    found = []
    for name, make_data in data_variants():
        def make(valid, tmp, rng, make_data=make_data):
            return ["bench", "loader", "--data", str(make_data(valid, tmp, rng)), "--passes", "1", "--batches", "1",
                    "--workers", "1"], []
        found.append(Variant("bench", f"loader --data {name}", make))
    for how in ("empty", "cut in half", "header zeroed", "bytes flipped", "a directory in its place", "missing"):
        def make(valid, tmp, rng, how=how):
            run = copy(valid.run, tmp, "run")
            damage_file(next(run.glob("checkpoints/epoch_*/state.pt")), how, rng)
            return ["bench", "eval", "--run", str(run), "--images", "40", "--repeats", "1", "--top-k", "1"], [run]
        found.append(Variant("bench", f"eval --run with state.pt {how}", make))
    for where in ("missing", "a file"):
        def make(valid, tmp, rng, where=where):
            return ["bench", "train", "--data", str(missing_paths(valid, tmp)[where]), "--epochs", "1"], []
        found.append(Variant("bench", f"train --data {where}", make))
    return found


ALL = {"prep": prep_variants(), "train": train_variants(), "eval": eval_variants(), "tune": tune_variants(),
       "reproduce": reproduce_variants(), "bench": bench_variants()}


def sampled() -> list[Variant]:
    """A fixed, seeded sample of each entry point's variants: the default run's share."""
    rng = random.Random(SEED)
    return [v for entry, found in ALL.items() for v in rng.sample(found, min(DEFAULT_SAMPLE[entry], len(found)))]


# ---------------------------------------------------------------- running one variant

def leftovers(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        if path.is_dir():
            found += [str(p) for pattern in LEFTOVERS for p in path.rglob(pattern)]
    return found


def existing(paths: list[Path]) -> set[Path]:
    return {p for p in paths if p.exists()}


@pytest.fixture
def no_ray(monkeypatch):
    """Sweeps and grids that pass every check stop where Ray would start."""
    from vpn_dist.sweep import driver

    def accepted(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(driver, "run_trials", accepted)


def run_variant(variant: Variant, valid: Valid, tmp: Path, capsys) -> None:
    rng = random.Random(f"{SEED}:{variant}")
    argv, outputs = variant.make(valid, tmp, rng)
    before = existing(outputs)
    capsys.readouterr()
    try:
        rc = main(argv)
    except Accepted:
        rc = 0
    except SystemExit as err:  # argparse: a usage line, then `vpn-dist <command>: error: ...`, exit 2
        rc = err.code
    finally:
        for path in tmp.rglob("*"):  # read-only variants: let pytest clean up
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
    err = LOGGING_ERROR.sub("", capsys.readouterr().err)
    assert "Traceback" not in err, f"{variant}: a traceback\n{err}"
    allowed = (0, 1, 2) if variant.entry == "train" else (0, 2)
    assert rc in allowed, f"{variant}: exit code {rc}\n{err}"
    assert not leftovers(outputs), f"{variant}: half-written files {leftovers(outputs)}"
    if rc:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and ERROR_LINE.match(lines[-1]), f"{variant}: the last stderr line is not an error line\n{err}"
        assert f" {variant.entry}" in lines[-1].split(":")[0], f"{variant}: names another command: {lines[-1]}"
        if rc == 2 and variant.entry in ("prep", "train"):  # bad input stops before the output exists
            created = existing(outputs) - before
            assert not created, f"{variant}: exit 2 but created {sorted(map(str, created))}"


@pytest.mark.parametrize("variant", sampled(), ids=str)
def test_damaged_input(variant, valid, tmp_path, capsys, no_ray):
    run_variant(variant, valid, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for found in ALL.values() for v in found], ids=str)
def test_every_damaged_input(variant, valid, tmp_path, capsys, no_ray):
    run_variant(variant, valid, tmp_path, capsys)


def test_every_entry_point_has_variants():
    counts = {entry: len(found) for entry, found in ALL.items()}
    assert all(counts[e] >= DEFAULT_SAMPLE[e] for e in DEFAULT_SAMPLE), counts


# ---------------------------------------------------------------- no dead ends: each suggestion, followed, works

def error_of(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_run_that_failed_before_its_first_checkpoint_starts_again(valid, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("a run that died before epoch 1\n")
    assert main(train_argv(valid.data, run)) == 0


def test_resume_without_a_readable_checkpoint_says_start_again_and_that_works(valid, tmp_path, capsys):
    run = copy(valid.run, tmp_path, "run")
    damage_file(next(run.glob("checkpoints/epoch_*/state.pt")), "cut in half", random.Random(0))
    assert "start it again without --resume" in error_of(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert main(train_argv(valid.data, run)) == 0  # the suggestion: the same --out, without --resume
    assert main(["eval", "--run", str(run)]) == 0


def test_a_finished_run_says_use_resume_and_that_works(valid, tmp_path, capsys):
    run = copy(valid.run, tmp_path, "run")
    assert f"use --resume {run}" in error_of(train_argv(valid.data, run), capsys)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0


def test_damaged_data_says_prep_again_with_force_and_that_works(valid, tmp_path, capsys):
    data = damaged_data("train.beton", "cut in half")(valid, tmp_path, random.Random(0))
    assert "`vpn-dist prep ... --force`" in error_of(train_argv(data, tmp_path / "run"), capsys)
    assert main(["prep", "synthetic", "--out", str(data), "--train-size", "160", "--test-size", "40", "--val", "40",
                 "--size", "16x16", "--force"]) == 0
    assert main(train_argv(data, tmp_path / "run")) == 0


def test_prep_over_a_prepared_set_says_force_and_that_works(valid, tmp_path, capsys):
    out = copy(valid.data, tmp_path, "out")
    argv = ["prep", "synthetic", "--out", str(out), "--train-size", "20", "--test-size", "8"]
    assert "pass --force to overwrite" in error_of(argv, capsys)
    assert main([*argv, "--force"]) == 0


def test_tune_suggestions_work(valid, tmp_path, capsys, no_ray):
    no_val = tmp_path / "no_val"
    argv = ["prep", "synthetic", "--out", str(no_val), "--train-size", "40", "--test-size", "8", "--size", "16x16"]
    assert main(argv) == 0
    sweep = ["tune", "--space", "smoke", "--data", str(no_val), "--out", str(tmp_path / "sweep")]
    assert "`vpn-dist prep ... --val N`" in error_of(sweep, capsys)
    assert main([*argv, "--val", "8", "--force"]) == 0
    assert "start it without --resume" in error_of([*sweep, "--resume"], capsys)
    with pytest.raises(Accepted):
        main(sweep)
    assert "continue it with --resume" in error_of(sweep, capsys)
    (tmp_path / "sweep" / "tune").mkdir()  # what Tune's first save leaves
    with pytest.raises(Accepted):
        main([*sweep, "--resume"])


def test_reproduce_suggestions_work(valid, tmp_path, capsys, no_ray):
    grid = ["reproduce", "--out", str(tmp_path / "grid"), "--table", "1", "--data", str(valid.data), "--seeds", "1",
            "--bases", "sr", "--generators", "dnn3", "--epochs", "1"]
    assert "start it without --resume" in error_of([*grid, "--resume"], capsys)
    with pytest.raises(Accepted):
        main(grid)
    assert "finish it with --resume" in error_of(grid, capsys)
    with pytest.raises(Accepted):
        main([*grid, "--resume"])
