"""study_fashion_mnist_dnn3: does tuning rescue VPN on Fashion-MNIST with the DNN3 base? (tune_spaces/study_axes.py)

    vpn-dist prep fashion-mnist --source DIR --out data/fm --val 10000
    vpn-dist study --spec study_fashion_mnist_dnn3 --data data/fm --out reproduction/tuned-fashion-mnist-dnn3
"""
from tune_spaces.study_axes import study

STUDY = study("fashion-mnist", "dnn3", "Fashion-MNIST, DNN3 base: the baseline alone against VPN (DNN3 generator, "
                                       "joint training), 40 trials each, 40 epochs at most.")
