"""The in-process train loop end to end: run outputs, every mode, resume, eval, and real Fashion-MNIST."""
import json
import re

import pytest
import torch

from vpn_dist.checkpoint import TrainState
from vpn_dist.cli import main
from vpn_dist.run_dir import RunDir

# the defaults (Adam at a constant lr) learn these short runs in an epoch or two
FAST = ["--set", "train.batch_size=100", "--set", "data.num_workers=1", "--set", "train.weight_decay=0"]


def train(data, out, *extra, mode="joint", base="dnn3", generator="dnn3", epochs=1):
    rc = main(["train", "--data", str(data), "--base", base, "--generator", generator, "--mode", mode,
               "--epochs", str(epochs), "--out", str(out), *FAST, *extra])
    assert rc == 0
    return RunDir(out).read_metrics()


def newest_state(run) -> TrainState:
    return TrainState.load(RunDir(run).latest_checkpoint())


@pytest.fixture(scope="module")
def joint_run(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("joint") / "run"
    return out, train(synthetic_dir, out, "--set", "vpn.bound=norm", "--set", "vpn.C=20", epochs=2,
                      mode="joint")


def test_run_directory_layout_and_metrics(joint_run):
    out, metrics = joint_run
    for key in ("test_acc_alg2", "test_acc_no_noise", "train_loss", "train_acc", "epochs_completed", "wall_time_s",
                "train_images_per_sec", "sigma_bg_auroc", "sigma_mean"):
        assert metrics[key] is not None, key
    assert metrics["epochs_completed"] == 2 and len(metrics["history"]) == 2
    assert 0 <= metrics["test_acc_alg2"] <= 1 and metrics["train_images_per_sec"] > 0
    assert (out / "config.yaml").is_file() and (out / "figure4.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    events = list((out / "tb").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tb")).Reload().Tags()
    assert {"train/loss", "test/acc_alg2", "test/acc_no_noise", "test/sigma_mean", "lr"} <= set(tags["scalars"])
    assert "figure4" in tags["images"]
    resolved = (out / "config.yaml").read_text()
    assert "gamma: 0.0025" in resolved, "the paper's gamma = 0.01/K is resolved into config.yaml (K = 4)"


def test_metrics_record_where_and_in_what_precision_the_run_computed(joint_run):
    from vpn_dist.trainer import device_name, resolve_amp

    _, metrics = joint_run
    cpu = torch.device("cpu")
    assert device_name(cpu) not in ("", "unknown") and metrics["device"] == device_name(cpu)
    assert metrics["device"].endswith(f"({torch.backends.cpu.get_cpu_capability()})")  # AVX2 and AVX-512 differ
    assert metrics["precision"] == {"off": "fp32", "bf16": "bf16"}[resolve_amp("auto", cpu)]  # amp=auto, resolved
    assert metrics["flush_denormal"] == "on" and metrics["torch_version"] == torch.__version__


def test_provenance_lists_each_value_its_attempts_ran_with(tmp_path):
    from vpn_dist.config import from_dict
    from vpn_dist.trainer import run_metrics

    cfg = from_dict({"data.path": str(tmp_path), "out": str(tmp_path)})
    attempts = [{"reason": "start", "start_epoch": 0, "device": "CPU A", "precision": "fp32"},
                {"reason": "resume", "start_epoch": 1, "device": "GPU B", "precision": "fp32"},
                {"reason": "resume", "start_epoch": 1}]  # written before provenance was recorded
    (tmp_path / "attempts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in attempts))
    epoch = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "epoch_time_s": 1.0, "train_images_per_sec": 10.0,
             "scaler_skipped_steps": 0}
    metrics = run_metrics(cfg, [epoch], RunDir(tmp_path))
    assert metrics["device"] == "CPU A + GPU B + unknown" and metrics["precision"] == "fp32 + unknown"
    assert metrics["torch_version"] == "unknown"


def test_per_epoch_curves_read_a_subset_sized_to_a_twentieth_of_the_epochs_training(joint_run, synthetic_dir):
    from vpn_dist.config import apply_overrides, from_dict
    from vpn_dist.data import read_meta
    from vpn_dist.evaluation import epoch_eval_images

    meta = {"num_classes": 10, "splits": {"train": 50000, "val": 10000, "test": 10000}}  # Fashion-MNIST
    sized = lambda *sets, world=1, m=meta: epoch_eval_images(apply_overrides(from_dict({}), list(sets)), m, world)
    assert sized() == 340  # 0.05 * 3 passes * 50000 images / ((K + 1) passes * 2 splits)
    assert sized(world=2) == 170  # half the training per worker
    assert sized("model.generator=none") == 500  # one pass per image: capped
    assert sized(m={"num_classes": 4, "splits": {"train": 3500, "val": 500, "test": 1000}}) == 100  # floored
    assert sized("train.epoch_eval_images=0") == 0 and sized("train.epoch_eval_images=300") == 300
    big = {"num_classes": 200, "splits": {"train": 100000, "val": 10000, "test": 10000}}
    assert sized(m=big) == 100 and sized("train.alg2_top_k=2", m=big) == 500  # top-k: h(x) and k hypotheses

    out, metrics = joint_run
    first_epoch, last_epoch = metrics["history"]
    expected = epoch_eval_images(from_dict({"model.generator": "dnn3"}), read_meta(synthetic_dir), 1)
    assert first_epoch["eval_images"] == expected < read_meta(synthetic_dir)["splits"]["test"]
    assert last_epoch["eval_images"] == "all"


def test_eval_recomputes_the_test_metrics(joint_run):
    out, metrics = joint_run
    assert main(["eval", "--run", str(out)]) == 0
    recomputed = json.loads((out / "eval.json").read_text())
    assert recomputed["epoch"] == 2
    assert recomputed["test_acc_no_noise"] == metrics["test_acc_no_noise"]  # deterministic rule: exactly equal
    assert abs(recomputed["test_acc_alg2"] - metrics["test_acc_alg2"]) < 0.05  # fresh noise draws


def test_generator_only_leaves_the_base_bitwise_unchanged(synthetic_dir, tmp_path, joint_run):
    base_run = tmp_path / "baseline"
    train(synthetic_dir, base_run, mode="baseline", generator="none")
    before = newest_state(base_run)
    gen_run = tmp_path / "gen"
    metrics = train(synthetic_dir, gen_run, "--init-from", str(base_run), mode="generator-only")
    after = newest_state(gen_run)
    for name, tensor in before.base.items():  # parameters and BatchNorm buffers alike
        assert torch.equal(tensor, after.base[name]), name
    gen_before = newest_state(joint_run[0]).generator
    assert any(not torch.equal(after.generator[k], v) for k, v in gen_before.items())
    assert metrics["test_acc_no_noise"] == before.history[-1]["test_acc_no_noise"]  # same fixed base


def test_generator_only_refuses_a_base_of_another_architecture(synthetic_dir, tmp_path, joint_run, capsys):
    rc = main(["train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "dnn3", "--mode",
               "generator-only", "--init-from", str(joint_run[0]), "--epochs", "1", "--out", str(tmp_path / "g")])
    assert rc == 2 and "dnn3" in capsys.readouterr().err


def test_generator_only_refuses_a_base_that_stopped_early(synthetic_dir, tmp_path, cli):
    stopped = tmp_path / "stopped"
    crashed = cli("train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "none", "--mode", "baseline",
                  "--epochs", "2", *FAST, "--out", str(stopped), "--set", "train.fault=0:1:2", check=False)
    assert crashed.returncode != 0 and RunDir(stopped).latest_checkpoint().name == "epoch_0001"
    refused = cli("train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "dnn3", "--mode",
                  "generator-only", "--init-from", str(stopped), "--epochs", "1", "--out", str(tmp_path / "g"),
                  check=False)
    assert refused.returncode == 2 and "stopped at epoch 1 of 2" in refused.stderr
    assert f"vpn-dist train --resume {stopped}" in refused.stderr and not (tmp_path / "g").exists()


def test_random_mode_trains_and_reports_no_alg2(synthetic_dir, tmp_path):
    metrics = train(synthetic_dir, tmp_path / "random", mode="random", generator="none", base="sr")
    assert metrics["test_acc_alg2"] is None and metrics["test_acc_no_noise"] > 0.3


def test_stopped_run_resumes_to_the_same_weights_as_an_uninterrupted_one(synthetic_dir, tmp_path, cli):
    args = ["--data", str(synthetic_dir), "--base", "sr", "--generator", "dnn3", "--mode", "joint",
            "--epochs", "2", *FAST]
    straight = tmp_path / "straight"
    cli("train", *args, "--out", str(straight))
    stopped = tmp_path / "stopped"
    # rank 0 of this process exits hard at step 2 of epoch 1 (0-based): epoch 1 is done, the second is not
    crashed = cli("train", *args, "--out", str(stopped), "--set", "train.fault=0:1:2", check=False)
    assert crashed.returncode != 0
    assert RunDir(stopped).latest_checkpoint().name == "epoch_0001"
    assert cli("train", "--resume", str(stopped), check=False).returncode == 0
    metrics = RunDir(stopped).read_metrics()
    assert metrics["epochs_completed"] == 2 and metrics["resumed"] and metrics["resumed_from_epoch"] == 1
    a, b = newest_state(straight), newest_state(stopped)
    for part in ("base", "generator"):
        for name, tensor in getattr(a, part).items():
            assert torch.equal(tensor, getattr(b, part)[name]), f"{part}.{name} differs after resume"
    again = cli("train", "--resume", str(stopped), check=False)
    assert again.returncode == 2 and "already completed" in again.stderr


def test_a_finished_run_directory_is_not_overwritten(synthetic_dir, joint_run, capsys):
    rc = main(["train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "none", "--mode", "baseline",
               "--epochs", "1", "--out", str(joint_run[0])])
    assert rc == 2 and "--resume" in capsys.readouterr().err


def test_cpu_training_flushes_subnormal_floats_in_its_own_thread(synthetic_dir, tmp_path):
    """Subnormals make Adam's CPU steps much slower; the training thread flushes them to zero."""
    import threading

    from vpn_dist.config import from_dict
    from vpn_dist.trainer import setup_training

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = from_dict({"data.path": str(synthetic_dir), "out": str(run_dir), "model.base": "sr",
                     "model.generator": "none", "vpn.mode": "baseline", "train.device": "cpu"})
    products = []

    def training_thread():
        setup_training(cfg, reports_to="run_dir", invocation=None)
        # 4M entries: the product runs on every thread of this thread's OpenMP team, each must flush
        products.append(int(((torch.full((1 << 22,), 1e-39) * 2) != 0).sum()))

    thread = threading.Thread(target=training_thread)
    thread.start()
    thread.join()
    assert products == [0]


def test_bf16_autocast_trains(synthetic_dir, tmp_path):
    metrics = train(synthetic_dir, tmp_path / "bf16", "--set", "train.amp=bf16", base="sr")
    assert metrics["train_loss"] == metrics["train_loss"] and metrics["test_acc_alg2"] is not None
    assert metrics["precision"] == "bf16"


def test_non_finite_loss_names_epoch_and_step(synthetic_dir, tmp_path, capsys):
    rc = main(["train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "none", "--mode", "baseline",
               "--epochs", "1", "--out", str(tmp_path / "nan"), *FAST, "--set", "train.lr=3e38", "--set",
               "train.optimizer=sgd"])
    assert rc == 1
    assert re.search(r"non-finite loss .* at epoch 0 step \d+", capsys.readouterr().err)


# ------------------------------------------------------------------ real data (CI sets VPN_DATA_ROOT)


@pytest.mark.parametrize("mode,generator", [("joint", "dnn3"), ("baseline", "none")])
def test_fashion_mnist_dnn3_reaches_paper_level_accuracy(fashion_mnist_dir, tmp_path, mode, generator):
    metrics = train(fashion_mnist_dir, tmp_path / mode, "--set", "train.batch_size=256", "--set",
                    "data.num_workers=2", mode=mode, generator=generator, epochs=1)
    # One epoch: both modes and both rules measured above 0.82
    assert metrics["test_acc_no_noise"] > 0.82
    if mode == "joint":
        assert metrics["test_acc_alg2"] > 0.82


def learnable_tree(root, classes=10, per_class=(60, 20), size=16, seed=0):
    """A user's small ImageFolder: each class a fixed grey pattern, each image that pattern under heavy noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, (classes, size, size))
    for split, n in zip(("train", "test"), per_class):
        for label in range(classes):
            (root / split / f"class{label}").mkdir(parents=True)
            for i in range(n):
                image = 0.5 * patterns[label] + 0.5 * rng.uniform(0, 255, (size, size))
                Image.fromarray(image.astype(np.uint8)).save(root / split / f"class{label}" / f"{i}.png")


def test_the_defaults_learn_a_small_imagefolder_where_the_paper_protocol_does_not(tmp_path):
    learnable_tree(tmp_path / "tree")
    assert main(["prep", "imagefolder", "--source", str(tmp_path / "tree"), "--out", str(tmp_path / "data")]) == 0
    accuracy = {}
    for name, extra in (("defaults", []), ("paper", ["--preset", "paper"])):
        out = tmp_path / name
        assert main(["train", "--data", str(tmp_path / "data"), "--base", "dnn3", "--generator", "dnn3", "--mode",
                     "joint", "--epochs", "5", "--out", str(out), *extra]) == 0
        accuracy[name] = json.loads((out / "metrics.json").read_text())["test_acc_alg2"]
    # 10 classes: chance is 0.1. Five epochs of 3 steps; the paper's SGD at lr 1e-3 needs its 40 epochs of more data
    assert accuracy["defaults"] > 0.8, accuracy
    assert accuracy["paper"] < 0.5, accuracy


def test_amp_auto_follows_the_cpu_probe_and_is_bf16_on_a_bf16_gpu(monkeypatch):
    import math

    from vpn_dist import trainer
    from vpn_dist.trainer import BF16_MIN_SPEEDUP, resolve_amp

    speedup = trainer.cpu_bf16_speedup.__wrapped__()  # a fresh measurement, not the cached one resolve_amp reads
    assert 0 < speedup and math.isfinite(speedup)
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: 0.64)  # a CPU whose bf16 matmuls are slower
    assert resolve_amp("auto", torch.device("cpu")) == "off"
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: BF16_MIN_SPEEDUP * 0.99)  # not quite worth it
    assert resolve_amp("auto", torch.device("cpu")) == "off"
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: BF16_MIN_SPEEDUP)
    assert resolve_amp("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: 5.0)  # a CPU with bf16 matrix units
    assert resolve_amp("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", torch.device("cuda")) == "off"
    assert resolve_amp("fp16", torch.device("cuda")) == "fp16" and resolve_amp("bf16", torch.device("cpu")) == "bf16"


class ScriptedClock:
    """perf_counter for the bf16 probe: each fp32 matmul lasts 1 tick, each bf16 one `bf16_ticks`."""

    def __init__(self, bf16_ticks: float):
        self.now, self.reads, self.durations = 0.0, 0, [1.0, bf16_ticks]

    def perf_counter(self) -> float:
        if self.reads % 2:  # an end read: the matmul between it and the start read took its dtype's time
            self.now += self.durations[self.reads // 2 % 2]
        self.reads += 1
        return self.now


@pytest.mark.parametrize("bf16_ticks, speedup, matmuls", [(0.2, 5.0, 19), (1 / 1.2, 1.2, 19), (50.0, 0.02, 2)])
def test_the_bf16_probe_measures_19_calls_but_stops_at_the_second_on_emulated_bf16(monkeypatch, bf16_ticks, speedup,
                                                                                     matmuls):
    from vpn_dist import trainer

    clock = ScriptedClock(bf16_ticks)
    monkeypatch.setattr(trainer, "time", clock)
    assert trainer.cpu_bf16_speedup.__wrapped__() == pytest.approx(speedup)
    assert clock.reads == 4 * matmuls  # two reads per matmul, one fp32 and one bf16 matmul per call


@pytest.mark.slow
def test_compiled_training_step_trains_as_the_eager_one(synthetic_dir, tmp_path):
    eager = train(synthetic_dir, tmp_path / "eager", base="sr")
    compiled = train(synthetic_dir, tmp_path / "compiled", "--set", "train.compile=true", base="sr")
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert compiled["test_acc_no_noise"] == pytest.approx(eager["test_acc_no_noise"], abs=0.02)
    # the checkpoint holds the plain modules' weights, not the compiled wrappers'
    state = newest_state(tmp_path / "compiled")
    assert not any(k.startswith("_orig_mod") for k in [*state.base, *state.generator])


def test_figure4_panels_tile_image_noise_sigma_and_noisy_image():
    from vpn_dist.observe import figure4_panels

    x, sigma = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    eps = sigma * torch.randn_like(sigma)
    panels = figure4_panels(x, eps, sigma)
    assert panels.shape == (3, 4 * 10, 3 * 10)  # 4 rows x 3 images, each padded by a 1-pixel line
    assert torch.allclose(panels[:, 1:9, 11:19], x[1])  # row 1: the images themselves
    assert torch.allclose(panels[:, 31:39, 21:29], (x[2] + eps[2]).clamp(0, 1))  # row 4: image + noise
    hottest = sigma.mean(dim=1)[0].argmax()  # row 3: sigma's largest pixel gets inferno's brightest colour
    heat = panels[:, 21:29, 1:9].sum(dim=0).flatten()
    assert heat.argmax() == hottest


@pytest.mark.parametrize("mode", ["joint", "baseline"])
def test_the_train_step_is_algorithm_1_written_out(mode):
    """TrainStep (what the loop and the benchmarks run) leaves the weights exactly where Algorithm 1 written out by
    hand does: sigma = f(x + gamma y), eps = sigma e, eq. 17 on base(x + eps), backward, update."""
    from vpn_dist.config import RunConfig
    from vpn_dist.method import generate_sigma, sample_noise, vpn_loss
    from vpn_dist.models import build_base, build_generator
    from vpn_dist.trainer import TrainStep

    shape, k, gamma = (1, 6, 6), 3, 0.01
    vpn = RunConfig().vpn
    vpn.mode, vpn.m, vpn.bound, vpn.C = mode, 2, "norm", 1.0
    x, y = torch.rand(8, *shape), torch.randint(0, k, (8,))

    def models():
        torch.manual_seed(0)
        base = build_base("sr", shape, k)
        generator = build_generator("dnn3", shape) if mode == "joint" else None
        params = [*base.parameters(), *(generator.parameters() if generator else [])]
        return base, generator, torch.optim.SGD(params, lr=0.1, momentum=0.9)

    base, generator, optimizer = models()
    step = TrainStep(base, generator, vpn, gamma, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    torch.manual_seed(1)
    for _ in range(2):
        step(x, y)

    hand_base, hand_generator, hand_optimizer = models()
    torch.manual_seed(1)
    for _ in range(2):
        inputs, m = x, 1
        if hand_generator is not None:
            sigma = generate_sigma(hand_generator, x, y, gamma, "norm", 1.0)
            inputs, m = x.repeat(2, 1, 1, 1) + sample_noise(sigma, 2), 2
        loss = vpn_loss(hand_base(inputs), y, m)
        hand_optimizer.zero_grad()
        loss.backward()
        hand_optimizer.step()
    for trained, by_hand in ((base, hand_base), (generator, hand_generator)):
        if trained is not None:
            for (name, a), b in zip(trained.state_dict().items(), by_hand.state_dict().values()):
                assert torch.equal(a, b), name
    assert step.skipped == 0 and step.draws == (2 if mode == "joint" else 1)


def test_figure_4_shows_one_image_of_each_class_first():
    """A test batch stored class by class (CIFAR-10's files, a sorted ImageFolder) must not give Figure 4 one class."""
    import torch

    from vpn_dist.trainer import FIGURE_IMAGES, figure_picks

    by_class = torch.tensor([3] * 50 + [7] * 50 + [1] * 50)
    picks = figure_picks(by_class).tolist()
    assert len(picks) == FIGURE_IMAGES and picks[:3] == [0, 50, 100]
    assert sorted(by_class[picks].unique().tolist()) == [1, 3, 7]
    assert figure_picks(torch.tensor([2, 2])).tolist() == [0, 1]  # fewer images than panels: all of them
