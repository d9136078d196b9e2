"""The benchmarks' own arithmetic: FLOPs counted by torch's flop counter against a count by hand, and tiny runs of
`vpn-dist bench roofline` and `vpn-dist bench eval` that print what they promise."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from vpn_dist.benchmarks.roofline import RecordMatmuls, count_flops, matmul_replay
from vpn_dist.cli import build_parser, main
from vpn_dist.config import RunConfig
from vpn_dist.models import build_base, build_generator
from vpn_dist.trainer import TrainStep

REPO = Path(__file__).resolve().parents[1]


def test_step_flops_match_a_count_by_hand():
    """SR base + DNN3 generator, batch B, d pixels, width w: every Linear costs 2*B*in*out forward; backward costs
    the weight gradient (same again) plus the input gradient, which the generator's first layer does not need (x is
    data) but the base does (its input x + eps carries the generator's gradient)."""
    b, shape, k, w = 4, (1, 6, 6), 3, 1024
    d = 36
    base, generator = build_base("sr", shape, k), build_generator("dnn3", shape)
    x, y = torch.rand(b, *shape), torch.randint(0, k, (b,))

    step = TrainStep(base, generator, RunConfig().vpn, 0.01, torch.optim.SGD([*base.parameters()], lr=0.1),
                     torch.amp.GradScaler("cpu", enabled=False))

    def forward_backward():  # the training step's, without the update
        step.backward(step.forward(x, y)[1])

    matmul, conv = count_flops(forward_backward)
    layers = [(d, w, False), (w, w, True), (w, d, True), (d, k, True)]  # (in, out, needs the input gradient)
    by_hand = sum(2 * b * i * o * (2 + needs_input_grad) for i, o, needs_input_grad in layers)
    assert conv == 0 and matmul == by_hand


def test_recorded_matmuls_are_the_whole_step_and_replay_with_their_layouts():
    """The breakdown's replay must be the step's matmuls: every one (their FLOPs sum to the flop counter's), with the
    operands' shapes and strides (the backward multiplies transposed views)."""
    shape, k = (1, 6, 6), 3
    base, generator = build_base("dnn3", shape, k), build_generator("dnn3", shape)
    x, y = torch.rand(8, *shape), torch.randint(0, k, (8,))

    step = TrainStep(base, generator, RunConfig().vpn, 0.01, torch.optim.SGD([*base.parameters()], lr=0.1),
                     torch.amp.GradScaler("cpu", enabled=False))

    def forward_backward():  # the training step's, without the update
        step.backward(step.forward(x, y)[1])

    with RecordMatmuls() as recorded:
        forward_backward()
    flops = 0
    for func, specs in recorded.calls:
        (m, inner), (_, n) = (s[0] for s in specs[-2:])  # mm(a, b) and addmm(bias, a, b): the last two are a @ b
        flops += 2 * m * inner * n
    assert flops == count_flops(forward_backward)[0]
    transposed = [s for _, specs in recorded.calls for s in specs[-2:] if s[1][0] < s[1][1]]
    assert transposed  # weight gradients and the forward's W^T are column-major views
    outputs = matmul_replay(recorded.calls, torch.device("cpu"))()
    assert [tuple(o.shape) for o in outputs] == [(s[-2][0][0], s[-1][0][1]) for _, s in recorded.calls]


def test_roofline_bench_prints_peak_and_fractions(capsys):
    assert main(["bench", "roofline", "--shape", "1x8x8", "--classes", "3", "--base", "sr", "--generator", "dnn3",
                 "--batch-size", "16", "--eval-batch-size", "16", "--steps", "1", "--device", "cpu",
                 "--amp", "off"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: CPU") and re.search(r"GEMM [\d,]+ GFLOP/s, 3x3 conv [\d,]+ GFLOP/s", out)
    fractions = re.findall(r"\| (\d+)% \|", out)
    assert len(fractions) == 4 and all(0 <= int(f) < 200 for f in fractions), out  # a tiny model: a few % of peak
    assert re.search(r"its 11 matmuls, replayed alone .* take \d+% of it", out), out  # 4 Linears: forward, weight
    # gradients, and input gradients but x's


def test_roofline_bench_counts_m_draws_per_image(capsys):
    """--m: the base sees each image m times, so a step's FLOPs per image grow by the base's share per draw."""
    flops = {}
    for m in (1, 2, 4):
        assert main(["bench", "roofline", "--shape", "1x28x28", "--base", "dnn3", "--generator", "dnn3",
                     "--batch-size", "8", "--eval-batch-size", "8", "--steps", "1", "--device", "cpu", "--amp", "off",
                     "--m", str(m)]) == 0
        out = capsys.readouterr().out
        assert f"generator, m = {m}," in out.splitlines()[0]
        flops[m] = float(re.search(r"\| training step \(forward.*?\| ([\d.,]+) M", out).group(1))
    per_draw = flops[2] - flops[1]  # the DNN3 base's forward and backward, its input's gradient included: ~11 M
    assert per_draw > 9, flops
    assert flops[4] - flops[2] == pytest.approx(2 * per_draw, abs=0.15), flops


def test_roofline_bench_times_the_eager_step_beside_the_compiled_one(capsys, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda mod: compiled.append(mod) or mod)  # the wiring, not the compiler
    argv = ["bench", "roofline", "--shape", "1x8x8", "--classes", "3", "--base", "sr", "--generator", "dnn3",
            "--batch-size", "16", "--eval-batch-size", "16", "--steps", "1", "--device", "cpu", "--amp", "off"]
    assert main(argv) == 0 and "compiled step" not in capsys.readouterr().out
    assert main([*argv, "--compile"]) == 0
    out = capsys.readouterr().out
    assert len(compiled) == 2  # the base and the generator
    ratio, eager = re.search(r"compiled step ([\d.]+)x the eager one \(([\d,]+) images/s eager\)", out).groups()
    assert float(ratio) > 0 and int(eager.replace(",", "")) > 0, out


def test_eval_bench_checks_every_rule_against_exact_alg2(capsys):
    assert main(["bench", "eval", "--classes", "6", "--shape", "1x8x8", "--toy-steps", "20", "--images", "64",
                 "--top-k", "1,6", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in out.splitlines()
            if line.startswith("| ") and "%" in line}
    assert rows["Algorithm 2, generator per class"] == "100.00%"  # the shortcut is exact
    assert "top-1 Algorithm 2" in rows and "top-6 Algorithm 2" not in rows  # k = K is exact: not listed


@pytest.mark.parametrize("line", [ln for ln in (REPO / "cluster" / "bench-gpu.sh").read_text().splitlines()
                                  if ln.startswith("bench ")])
def test_gpu_bench_script_lines_parse(line):
    argv = [a for a in shlex.split(line)[1:] if a != "$@"]
    args = build_parser().parse_args(["bench", "roofline", "--device", "cuda", *argv])
    assert args.base and args.shape


def test_subnormal_bench_counts_them_and_times_both_settings(synthetic_dir, tmp_path, capsys):
    from vpn_dist.benchmarks.subnormal import subnormals
    from vpn_dist.checkpoint import TrainState
    from vpn_dist.run_dir import RunDir

    run = tmp_path / "adam"
    assert main(["train", "--data", str(synthetic_dir), "--base", "sr", "--generator", "none", "--mode", "baseline",
                 "--epochs", "1", "--out", str(run), "--set", "train.optimizer=adam", "--set", "train.batch_size=64",
                 "--set", "data.num_workers=1"]) == 0
    capsys.readouterr()
    assert main(["bench", "subnormal", "--run", str(run), "--steps", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    moments = subnormals(v for s in TrainState.load(RunDir(run).latest_checkpoint()).optimizer["state"].values()
                         for v in s.values())
    assert f"optimizer state {moments[0]:,} of {moments[1]:,}" in out
    rates = re.findall(r"\| (?:IEEE subnormals|flushed to zero \(vpn-dist\)) \| ([\d,]+) \|", out)
    assert len(rates) == 2 and all(int(r.replace(",", "")) > 0 for r in rates)
    assert re.search(r"flushed / IEEE: \d+\.\d\dx", out)
    assert (torch.tensor([1e-39]) * 2).item() > 0  # the bench leaves this thread's floats IEEE again
