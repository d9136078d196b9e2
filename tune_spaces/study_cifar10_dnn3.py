"""study_cifar10_dnn3: does tuning rescue VPN on CIFAR-10 with the DNN3 base? (tune_spaces/study_axes.py)

    vpn-dist prep cifar10 --source DIR --out data/c10 --val 10000
    vpn-dist study --spec study_cifar10_dnn3 --data data/c10 --out reproduction/tuned-cifar10-dnn3
"""
from tune_spaces.study_axes import study

STUDY = study("cifar10", "dnn3", "CIFAR-10, DNN3 base: the baseline alone against VPN (DNN3 generator, joint "
                                 "training), 40 trials each, 40 epochs at most.")
