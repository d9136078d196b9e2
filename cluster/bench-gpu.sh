#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one command, on one machine with a CUDA GPU and torch + torchvision +
# pyyaml (no Ray, no FFCV: batches are in memory). Prints Markdown tables: images/s, the measured GEMM and conv peak
# at the run's dtype, the fraction of that roofline, and the device's name.
#   cluster/bench-gpu.sh > bench-gpu.md          # DEVICE=cpu cluster/bench-gpu.sh --steps 2: a dry run anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bench() { "$PYTHON" -m vpn_dist.cli bench roofline --device "${DEVICE:-cuda}" "$@"; }

# CIFAR-10, ResNet-18 base + DNN3 generator: amp auto (bf16 where supported), channels_last, eager then compiled
bench --shape 3x32x32 --base resnet18 --generator dnn3 --channels-last "$@"
bench --shape 3x32x32 --base resnet18 --generator dnn3 --channels-last --compile "$@"
# the same in fp32, for the AMP ratio
bench --shape 3x32x32 --base resnet18 --generator dnn3 --channels-last --amp off "$@"
# Fashion-MNIST, DNN3 base + DNN3 generator (the CPU benchmark's workload)
bench --shape 1x28x28 --base dnn3 --generator dnn3 "$@"
