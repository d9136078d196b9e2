"""The training step, Algorithm 2 and checkpoints on a CUDA GPU: what a CPU machine cannot check. Runs where
PyTorch sees a GPU (no Ray, no FFCV needed: batches are in memory); skipped elsewhere."""
from __future__ import annotations

import pytest
import torch

from vpn_dist.checkpoint import TrainState
from vpn_dist.config import RunConfig, paper_gamma
from vpn_dist.method import alg2_scores, generate_sigma
from vpn_dist.models import build_base, build_generator
from vpn_dist.trainer import TrainStep, autocast_for, make_optimizer, resolve_amp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE, K = (1, 28, 28), 10
GAMMA = paper_gamma(K)


def joint_step(device: str, amp: str, *, optimizer: str = "sgd", lr: float = 0.05, init_scale: float = 2.0 ** 16,
               seed: int = 0) -> TrainStep:
    """A DNN3 base and DNN3 generator (PyTorch's default init, so sigma is not ~0) with the run's optimizer."""
    torch.manual_seed(seed)
    cfg = RunConfig()
    cfg.vpn.mode, cfg.vpn.m = "joint", 2
    cfg.train.optimizer, cfg.train.lr = optimizer, lr
    base = build_base("dnn3", SHAPE, K).to(device)
    generator = build_generator("dnn3", SHAPE, "pytorch").to(device)
    opt, _ = make_optimizer(cfg, [*base.parameters(), *generator.parameters()])
    precision = resolve_amp(amp, torch.device(device))
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16", init_scale=init_scale)
    return TrainStep(base, generator, cfg.vpn, GAMMA, opt, scaler, autocast_for(amp, torch.device(device)))


def batch(device: str, n: int = 128, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable data: class k's images are brighter in row band k, so a few steps must lower the loss."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    x = 0.1 * torch.rand((n, *SHAPE), generator=g)
    for i, k in enumerate(y.tolist()):
        x[i, 0, 2 * k + 4:2 * k + 6] += 0.8
    return x.to(device), y.to(device)


def params(step: TrainStep) -> list[torch.Tensor]:
    return [p.detach().clone() for mod in (step.base, step.generator) for p in mod.parameters()]


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_step_learns_on_cuda_with_sigma_in_fp32(amp):
    step = joint_step("cuda", amp)
    x, y = batch("cuda")
    with step.autocast:
        sigma = generate_sigma(step.generator, x, y, GAMMA, "none", None)
    assert sigma.dtype == torch.float32 and sigma.shape == x.shape and bool((sigma >= 0).all())
    losses = [step(x, y)[1].item() for _ in range(40)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.5 * losses[0], losses
    assert step.skipped == 0


def test_fp16_scaler_skips_an_overflowing_update_and_counts_it():
    step = joint_step("cuda", "fp16", init_scale=2.0 ** 100)  # any real gradient overflows fp16 at this scale
    x, y = batch("cuda")
    before = params(step)
    step(x, y)
    assert step.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params(step))), "a skipped update changed the weights"
    assert step.scaler.get_scale() < 2.0 ** 100
    for _ in range(100):  # the scaler halves its scale per overflow until the step's gradients fit in fp16
        skipped, before = step.skipped, params(step)
        step(x, y)
        if step.skipped == skipped:
            break
    assert step.skipped == skipped, "the scaler never reached a scale that fits"
    assert any(not torch.equal(a, b) for a, b in zip(before, params(step))), "no update once the scale fits"


def test_fp32_step_on_cuda_matches_the_cpu_step(monkeypatch):
    """The same weights, batch and noise draws on both devices: the step's loss and updated weights agree."""
    import vpn_dist.trainer as trainer

    x, y = batch("cpu")
    e = torch.randn((2, len(x), *SHAPE), generator=torch.Generator().manual_seed(2))
    sample_noise = trainer.sample_noise
    results = {}
    for device in ("cpu", "cuda"):
        step = joint_step(device, "off")
        monkeypatch.setattr(trainer, "sample_noise", lambda sigma, m, e=e.to(device): sample_noise(sigma, m, e))
        _, loss = step(x.to(device), y.to(device))
        results[device] = (loss.item(), [p.cpu() for p in params(step)])
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-4)
    for cpu_p, cuda_p in zip(results["cpu"][1], results["cuda"][1]):
        torch.testing.assert_close(cuda_p, cpu_p, rtol=1e-4, atol=1e-5)


def test_alg2_on_cuda_agrees_with_cpu():
    """Algorithm 2's class scores for the same weights and draws, on both devices (fp32)."""
    step = joint_step("cpu", "off")
    x, _ = batch("cpu", n=64)
    e = torch.randn((len(x), K, *SHAPE), generator=torch.Generator().manual_seed(3))
    cpu = alg2_scores(step.base, step.generator, x, K, GAMMA, "elementwise", 0.5, e=e)
    base, generator = step.base.to("cuda"), step.generator.to("cuda")
    cuda = alg2_scores(base, generator, x.cuda(), K, GAMMA, "elementwise", 0.5, e=e.cuda(), max_rows=96)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_cuda_checkpoint_resumes_on_cpu(tmp_path, optimizer):
    """A run trained on a GPU (fp16, fused optimizer) resumes on a CPU machine: the same weights, its optimizer's
    state on the CPU, and the next step runs there."""
    gpu = joint_step("cuda", "fp16", optimizer=optimizer)
    x, y = batch("cuda")
    for _ in range(3):
        gpu(x, y)
    cfg = RunConfig()
    cfg.train.optimizer, cfg.train.amp = optimizer, "fp16"
    meta = {"shape": list(SHAPE), "num_classes": K, "splits": {"train": len(x)}}
    scheduler = torch.optim.lr_scheduler.ConstantLR(gpu.optimizer, factor=1.0, total_iters=0)
    TrainState.capture(epoch=1, base=gpu.base, generator=gpu.generator, optimizer=gpu.optimizer, scheduler=scheduler,
                       scaler=gpu.scaler, scaler_skipped=gpu.skipped, history=[], cfg=cfg, meta=meta).save(tmp_path)

    cpu = joint_step("cpu", "fp16", optimizer=optimizer, seed=1)  # other initial weights
    state = TrainState.load(tmp_path)
    state.restore(cpu.base, cpu.generator, cpu.optimizer,
                  torch.optim.lr_scheduler.ConstantLR(cpu.optimizer, factor=1.0, total_iters=0), cpu.scaler)
    for restored, trained in zip(params(cpu), params(gpu)):
        assert torch.equal(restored, trained.cpu())
    moments = [t for s in cpu.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert moments and all(t.device.type == "cpu" for t in moments)
    assert cpu.scaler.get_scale() == gpu.scaler.get_scale()
    _, loss = cpu(x.cpu(), y.cpu())
    assert torch.isfinite(loss)
