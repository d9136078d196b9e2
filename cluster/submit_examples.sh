#!/usr/bin/env bash
# Example `ray job submit` command lines for vpn-dist on a running Ray cluster
# (KubeRay RayCluster, `ray up cluster/aws-gpu.yaml`, or any Ray 2.58 cluster).
#
#   export RAY_ADDRESS=http://127.0.0.1:8265   # dashboard / job API (port-forward it)
#   cluster/submit_examples.sh train4          # one example; no argument lists them
#
# Every job uploads the repo (minus .venv, data, runs, .git: see
# cluster/runtime_env.yaml) and runs the `vpn-dist` command after `--` on the
# head node; with RAY_ADDRESS set, `vpn-dist` joins that cluster and places its
# Ray Train workers (1 GPU each) on the GPU nodes.
# Paths are cluster paths: .beton under /mnt/data, runs under /mnt/runs.
# tests/test_cluster_files.py parses every `vpn-dist ...` line below with the
# real CLI parser, so keep them valid.
set -euo pipefail

usage() {
    echo "usage: $0 EXAMPLE   (needs RAY_ADDRESS)"
    sed -n 's/^    \([a-z0-9-]*\))[[:space:]]*#\(.*\)$/  \1 -\2/p' "${BASH_SOURCE[0]}"
    echo "then: ray job logs --follow <submission-id>   |   ray job list"
}
if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then usage >&2; exit 2; fi

: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster job API, e.g. http://127.0.0.1:8265}"
export RAY_ADDRESS

cd "$(dirname "${BASH_SOURCE[0]}")/.."    # --working-dir . must be the repo root
STAMP="$(date +%Y%m%d-%H%M%S)"

case "${1:-}" in
    prep)   # convert CIFAR-10 to .beton on the shared /mnt/data volume (CPU only, runs on the head)
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-prep-cifar10-$STAMP" -- \
            vpn-dist prep cifar10 --source /mnt/data/raw/cifar10 --out /mnt/data/cifar10 --val 5000 --seed 0
        ;;
    train2)   # VPN joint training, ResNet-18 base + ResNet-18 generator, 2 GPU workers
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-train2-$STAMP" --no-wait -- \
            vpn-dist train --data /mnt/data/cifar10 --base resnet18 --generator resnet18 \
                --mode joint --epochs 200 --out /mnt/runs/cifar10-r18-joint-2gpu \
                --workers 2 --gpu --cpus-per-worker 6 \
                --set train.amp=bf16 --set train.batch_size=256 --set train.max_failures=2
        ;;
    train4)   # same on 4 GPU workers, VPN gamma/m overridden, dataloader threads set
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-train4-$STAMP" --no-wait -- \
            vpn-dist train --data /mnt/data/cifar10 --base resnet18 --generator resnet18 \
                --mode joint --epochs 200 --out /mnt/runs/cifar10-r18-joint-4gpu \
                --workers 4 --gpu --cpus-per-worker 6 \
                --set train.amp=bf16 --set train.batch_size=256 --set train.lr=0.001 \
                --set vpn.gamma=0.001 --set vpn.m=1 --set data.num_workers=4 \
                --set train.max_failures=2
        ;;
    train8)   # ResNet-50 base on 8 GPU workers, norm-bounded noise
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-train8-$STAMP" --no-wait -- \
            vpn-dist train --data /mnt/data/tiny-imagenet --base resnet50 --generator resnet18 \
                --mode joint --epochs 100 --out /mnt/runs/tiny-r50-joint-8gpu \
                --workers 8 --gpu --cpus-per-worker 6 \
                --set train.amp=bf16 --set train.batch_size=128 \
                --set vpn.bound=norm --set vpn.C=10 --set train.max_failures=3
        ;;
    baseline4)   # the no-noise baseline with the same budget, for comparison
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-baseline4-$STAMP" --no-wait -- \
            vpn-dist train --data /mnt/data/cifar10 --base resnet18 --generator none \
                --mode baseline --epochs 200 --out /mnt/runs/cifar10-r18-baseline-4gpu \
                --workers 4 --gpu --cpus-per-worker 6 --set train.amp=bf16
        ;;
    resume)   # continue train4 from its last checkpoint; the run's saved config is reused
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-resume4-$STAMP" --no-wait -- \
            vpn-dist train --resume /mnt/runs/cifar10-r18-joint-4gpu
        ;;
    eval)   # evaluate a finished run on its test split
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-eval-$STAMP" -- \
            vpn-dist eval --run /mnt/runs/cifar10-r18-joint-4gpu --data /mnt/data/cifar10
        ;;
    tune)   # the paper sweep over two data sets; 4 trials at a time, 1 GPU worker each
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-tune-paper-$STAMP" --no-wait -- \
            vpn-dist tune --space paper --data /mnt/data/cifar10 --data /mnt/data/fashion-mnist \
                --out /mnt/runs/tune-paper --samples 20 --max-concurrent 4 \
                --workers-per-trial 1 --gpu
        ;;
    tune-resume)   # pick up an interrupted sweep where it stopped
        ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
            --submission-id "vpn-tune-paper-resume-$STAMP" --no-wait -- \
            vpn-dist tune --space paper --data /mnt/data/cifar10 --data /mnt/data/fashion-mnist \
                --out /mnt/runs/tune-paper --samples 20 --max-concurrent 4 \
                --workers-per-trial 1 --gpu --resume
        ;;
    *)
        echo "unknown example: $1" >&2
        usage >&2
        exit 2
        ;;
esac
