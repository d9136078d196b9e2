"""Every nonsense config value stops the CLI with a message naming the key, and a non-zero exit; every key is
documented beside its field, and its choices and flag come from there (docs/config.md's table: tests/test_docs.py)."""
import re
from pathlib import Path

import pytest
import yaml

from vpn_dist.cli import main
from vpn_dist.config import RunConfig, apply_overrides, config_keys, from_dict, load_yaml, preset, validate
from vpn_dist.errors import UserError

GOOD = ["--base", "dnn3", "--generator", "dnn3", "--mode", "joint", "--epochs", "1"]


@pytest.mark.parametrize("extra,key", [
    (["--set", "vpn.gamma=-0.1"], "vpn.gamma"),
    (["--set", "vpn.m=0"], "vpn.m"),
    (["--set", "vpn.bound=norm", "--set", "vpn.C=0"], "vpn.C"),
    (["--set", "vpn.bound=elementwise", "--set", "vpn.C=-1"], "vpn.C"),
    (["--set", "vpn.bound=elementwise"], "vpn.C"),
    (["--set", "vpn.bound=sphere", "--set", "vpn.C=1"], "vpn.bound"),
    (["--set", "vpn.C=2"], "vpn.C"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "train.lr=0"], "train.lr"),
    (["--set", "train.epochs=0"], "train.epochs"),
    (["--set", "train.amp=fp8"], "train.amp"),
    (["--set", "train.amp=fp16", "--set", "train.device=cpu"], "train.amp"),
    (["--set", "train.fault=rank1"], "train.fault"),
    (["--set", "model.base=resnet99"], "model.base"),
    (["--set", "model.generator=unet"], "model.generator"),
    (["--set", "vpn.mode=baseline"], "model.generator"),
    (["--set", "model.generator=none"], "model.generator"),
    (["--set", "vpn.mode=generator-only"], "train.init_from"),
    (["--set", "vpn.m=two"], "vpn.m"),
    (["--set", "vpn.m=1.5"], "vpn.m"),
    (["--set", "train.lrr=0.1"], "train.lrr"),
    (["--set", "nonsense.key=1"], "nonsense.key"),
    (["--set", "novalue"], "key=value"),
    (["--workers", "-1"], "dist.workers"),
])
def test_bad_config_values_exit_nonzero_naming_the_key(tmp_path, capsys, extra, key):
    rc = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *GOOD, *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert key in err and "error" in err
    assert not (tmp_path / "run").exists(), "nothing is written before the config is valid"


def test_unknown_model_and_wrong_mode_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--mode", "jointly", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "jointly" in capsys.readouterr().err


def test_missing_data_directory_is_named(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), *GOOD])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vpn: {m: [1, 2}\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("vpn:\n  sigma: 3\n")
    with pytest.raises(UserError, match="vpn.sigma"):
        load_yaml(unknown)
    with pytest.raises(UserError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_layering_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vpn:\n  m: 4\n  bound: norm\n  C: 2.5\ntrain:\n  lr: 0.01\n")
    cfg = apply_overrides(load_yaml(path), ["train.lr=3e-4", "vpn.gamma=null"])
    assert (cfg.vpn.m, cfg.vpn.bound, cfg.vpn.C, cfg.train.lr, cfg.vpn.gamma) == (4, "norm", 2.5, 3e-4, None)
    cfg.out, cfg.data.path = "o", "d"
    assert validate(cfg) is cfg


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/*.yaml")))
def test_every_shipped_config_is_valid(path):
    cfg = load_yaml(path)
    cfg.out, cfg.data.path = cfg.out or "run", cfg.data.path or "data"
    validate(cfg)


def test_the_paper_preset_is_the_papers_protocol_and_differs_from_the_defaults():
    paper, defaults = preset("paper"), RunConfig()
    t = paper.train
    assert (t.epochs, t.batch_size, t.lr, t.optimizer, t.momentum, t.weight_decay, t.lr_schedule, t.amp) == \
        (40, 256, 1e-3, "sgd", 0.9, 5e-4, "cosine", "off")
    assert (paper.vpn.m, paper.vpn.gamma, paper.vpn.bound, paper.vpn.C, paper.preset) == (1, None, "none", None, "paper")
    # users' defaults: the authors' Adam switch, which trains on new data where their SGD at lr 1e-3 barely moves
    d = defaults.train
    assert (d.optimizer, d.lr, d.lr_schedule, d.weight_decay, d.amp, defaults.preset) == \
        ("adam", 1e-3, "constant", 5e-4, "auto", None)


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
                                        if p.name != "demo.yaml"), ids=lambda p: p.name)
def test_every_paper_config_runs_the_paper_preset(path):
    cfg, paper = load_yaml(path), preset("paper")
    assert cfg.preset == "paper"
    expected_batch = 128 if path.name.startswith("tiny-imagenet") else 256  # paper 4.1
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.lr_schedule, cfg.train.amp, cfg.train.epochs,
            cfg.train.batch_size) == (paper.train.optimizer, paper.train.lr, paper.train.lr_schedule,
                                      paper.train.amp, 40, expected_batch)


def test_precedence_defaults_preset_file_flags_set(tmp_path):
    from vpn_dist.launch import config_from_args

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n  epochs: 7\n")
    cfg = config_from_args(str(path), {"train.epochs": 9}, ["train.momentum=0.5"], preset_name="paper")
    # the preset under the file, the file under the flag, --set over all
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.epochs, cfg.train.momentum) == ("sgd", 0.01, 9, 0.5)
    assert config_from_args(str(path), {}, []).train.optimizer == "adam"  # no preset: the defaults
    path.write_text("preset: paper\ntrain:\n  epochs: 7\n")
    assert (load_yaml(path).train.optimizer, load_yaml(path).train.epochs) == ("sgd", 7)
    with pytest.raises(UserError, match="unknown preset 'fast'"):
        preset("fast")
    with pytest.raises(UserError, match="--resume keeps the run's settings"):
        config_from_args(None, {}, [], base=RunConfig(), preset_name="paper")


def test_set_keeps_strings_as_typed():
    cfg = apply_overrides(RunConfig(), ["train.fault=1:1:3", "model.base=resnet18", "train.init_from=null"])
    assert (cfg.train.fault, cfg.model.base, cfg.train.init_from) == ("1:1:3", "resnet18", None)
    assert cfg.fault_point() == (1, 1, 3)


def test_every_config_key_has_its_doc_beside_it():
    undocumented = [key for key, f in config_keys().items() if not f.metadata.get("doc")]
    assert not undocumented, f"give these fields metadata={{'doc': ...}} (config.setting): {undocumented}"


CHOICE_KEYS = [key for key, f in config_keys().items() if f.metadata["choices"]]


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_a_key_with_choices_takes_only_them(key):
    """validate checks every key's choices from its setting; each choice passes where the rest of the config
    allows it, a value outside them names the key and its choices."""
    good = from_dict({"out": "/x", "data.path": "/d"})
    allowed = config_keys()[key].metadata["choices"]
    with pytest.raises(UserError, match=re.escape(f"{key!r}") + ".*" + re.escape(", ".join(allowed))):
        validate(apply_overrides(from_dict({"out": "/x", "data.path": "/d"}), [f"{key}=surely-not-a-choice"]))
    validate(good)


def test_train_flags_are_made_from_the_settings(capsys):
    """Each key with a flag gets it, with the key's doc and choices; a flag sets its key; no other flag names a key."""
    import argparse

    from vpn_dist.cli import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    flagged = {f.metadata["flag"]: key for key, f in config_keys().items() if f.metadata["flag"]}
    assert {"--data", "--base", "--generator", "--mode", "--epochs", "--out", "--init-from", "--workers", "--gpu",
            "--cpus-per-worker"} == set(flagged)
    for flag, key in flagged.items():
        assert by_flag[flag].dest == key and config_keys()[key].metadata["doc"] in by_flag[flag].help
        assert by_flag[flag].choices == config_keys()[key].metadata["choices"]
    args = parser.parse_args(["--mode", "random", "--epochs", "3", "--gpu", "--cpus-per-worker", "2"])
    assert (getattr(args, "vpn.mode"), getattr(args, "train.epochs"), getattr(args, "dist.gpu"),
            getattr(args, "dist.cpus_per_worker"), getattr(args, "model.base")) == ("random", 3, True, 2, None)


def test_reproduce_runs_the_paper_preset_whatever_the_defaults_are(monkeypatch):
    import vpn_dist.config as config
    from vpn_dist.reproduce.grid import Plan, GridRun, run_config

    def odd_defaults() -> RunConfig:  # defaults a later change might pick
        cfg = RunConfig.__new__(RunConfig)
        cfg.__init__()
        cfg.train.optimizer, cfg.train.lr, cfg.train.lr_schedule, cfg.train.amp = "adam", 0.5, "constant", "bf16"
        cfg.train.epochs, cfg.train.batch_size, cfg.train.momentum, cfg.vpn.m = 3, 32, 0.1, 4
        return cfg

    monkeypatch.setattr(config, "RunConfig", odd_defaults)
    assert config.from_dict({}).train.lr == 0.5  # the patch reaches the defaults
    plan = Plan(tables=[1], data={"fashion-mnist": "/data/fm"}, seeds=1, overrides=["train.weight_decay=0.001"])
    cfg = run_config(plan, GridRun("fashion-mnist", "dnn3", "dnn3", "joint", 0, (1,)), Path("/runs"))
    t = cfg.train
    assert (t.optimizer, t.lr, t.lr_schedule, t.amp, t.epochs, t.batch_size, t.momentum, cfg.vpn.m) == \
        ("sgd", 1e-3, "cosine", "off", 40, 256, 0.9, 1)
    assert t.weight_decay == 0.001  # the plan's --set still applies over the preset


@pytest.mark.parametrize("code", ["import vpn_dist.errors", "import vpn_dist.config", "import data_prep, data_prep.cli",
                                  "import vpn_dist; vpn_dist.RunConfig",
                                  "from vpn_dist.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"])
def test_light_imports_and_help_load_no_torch_ray_or_ffcv(code):
    """The package loads a module when one of its names is first used: errors, config, data_prep and `vpn-dist
    --help` stay light (a fresh interpreter, so nothing imported before counts)."""
    import subprocess
    import sys

    heavy = "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'ray', 'ffcv'})"
    result = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint({heavy})"], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", f"{code!r} loaded {result.stdout.splitlines()[-1]}"


def test_a_public_name_loads_its_module_on_first_use():
    import subprocess
    import sys

    code = ("import sys, vpn_dist\nassert 'torch' not in sys.modules\nfrom vpn_dist import vpn_loss, build_base\n"
            "assert vpn_loss.__module__ == 'vpn_dist.method' and build_base.__module__ == 'vpn_dist.models'\n"
            "assert 'torch' in sys.modules and 'ray' not in sys.modules\n"
            "assert set(vpn_dist.__all__) <= set(dir(vpn_dist))\n"
            "try:\n    vpn_dist.nonsense\nexcept AttributeError as err:\n    assert 'nonsense' in str(err)\n"
            "else:\n    raise SystemExit('no AttributeError')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
