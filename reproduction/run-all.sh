#!/usr/bin/env bash
# Every grid under reproduction/, in priority order, each resumable: run it again after an interruption and it
# continues from runs.csv (finished runs never rerun). Usage: reproduction/run-all.sh [DATA_DIR] [SHARED_DATASETS]
# Environment: VPN (the vpn-dist command, default .venv/bin/vpn-dist), PY (its python, default .venv/bin/python), OUT
# (where the grids go, default reproduction).
# On a cluster, submit the same `vpn-dist reproduce` lines with `ray job submit` (docs/reproduction.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data}
SHARED=${2:-../shared/datasets}
VPN=${VPN:-.venv/bin/vpn-dist}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-reproduction}

prep() {  # prep FORMAT SOURCE OUT [args]: once; a complete prepared set is left as it is
  [ -f "$3/meta.json" ] || $VPN prep "$1" ${2:+--source "$2"} --out "$3" "${@:4}"
}

grid() {  # grid NAME [reproduce args]: start the grid, or resume it where it stopped
  $VPN reproduce --out "$OUT/$1" "${@:2}" $([ -f "$OUT/$1/reproduce.json" ] && echo --resume)
}

ADAM=(--set train.optimizer=adam --set train.lr_schedule=constant)  # the authors' Adam: constant lr, decay 5e-4

prep fashion-mnist "$SHARED/fashion-mnist" "$DATA/fm" --val 10000
grid fashion-mnist-sgd --table 1 --table 2 --data "$DATA/fm" --seeds 5 --bases sr,dnn3 --generators dnn3
grid fashion-mnist-adam --table 1 --table 2 --data "$DATA/fm" --seeds 5 --bases sr,dnn3 --generators dnn3 "${ADAM[@]}"

prep synthetic "" "$DATA/syn" --val 500 --seed 0
grid synthetic-sgd --table 1 --modes baseline,joint --data "$DATA/syn" --seeds 5 --bases dnn3 \
    --generators dnn3,resnet18
# Section 4.3 again where the generator's noise grows (under SGD it stays near 1e-4): the authors' Adam
grid synthetic-adam --table 1 --modes baseline,joint --data "$DATA/syn" --seeds 5 --bases dnn3 --generators dnn3 \
    "${ADAM[@]}"

prep cifar10 "$SHARED/cifar10" "$DATA/c10" --val 10000
# The optimizer fingerprint on a second data set: the baselines under the authors' Adam
grid cifar10-adam-baselines --table 1 --modes baseline --data "$DATA/c10" --seeds 3 --bases sr,dnn3 "${ADAM[@]}"
grid cifar10-sgd --table 1 --table 2 --data "$DATA/c10" --seeds 3 --bases sr,dnn3 --generators dnn3

# The controls and the deciding cells (each resumes from its committed runs.csv)
# Is VPN's Adam effect more than noise of its size? Isotropic noise at each seed's learned mean sigma
grid fashion-mnist-adam-isotropic --table 1 --modes baseline,isotropic --data "$DATA/fm" --seeds 5 --bases dnn3 \
    --generators dnn3 --sigma-from "$OUT/fashion-mnist-adam" "${ADAM[@]}"
# The conditioning: the ResNet-18 generator with gamma = 0 and with the authors' 0.01 / (K - 1) (K = 4)
grid synthetic-sgd-gamma0 --table 1 --modes baseline,joint --data "$DATA/syn" --seeds 3 --bases dnn3 \
    --generators resnet18 --set vpn.gamma=0
grid synthetic-sgd-gamma-authors --table 1 --modes baseline,joint --data "$DATA/syn" --seeds 3 --bases dnn3 \
    --generators resnet18 --set vpn.gamma=0.0033333333
# Figure 3, the effect of m: m = 1 and the baselines are fashion-mnist-adam's (the same seeds, data and settings).
# The three grids side by side: one after another, each one's last run would leave CPUs idle.
figure3=()
for m in 2 4 8; do
    grid fashion-mnist-adam-m$m --table 1 --modes joint --data "$DATA/fm" --seeds 3 --bases dnn3 \
        --generators dnn3 --set vpn.m=$m "${ADAM[@]}" &
    figure3+=($!)
done
for pid in "${figure3[@]}"; do wait "$pid"; done
$PY reproduction/figure3-m/draw.py 1="$OUT/fashion-mnist-adam" 2="$OUT/fashion-mnist-adam-m2" \
    4="$OUT/fashion-mnist-adam-m4" 8="$OUT/fashion-mnist-adam-m8"
# CIFAR-10 under the authors' Adam, where the DNN3 base is not underfit and the generator's noise grows: 5 seeds, as
# the intervals of the first 3 still held the paper's gains
grid cifar10-adam --table 1 --table 2 --data "$DATA/c10" --seeds 5 --bases sr,dnn3 --generators dnn3 "${ADAM[@]}"
