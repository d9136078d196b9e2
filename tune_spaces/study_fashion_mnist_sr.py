"""study_fashion_mnist_sr: does tuning rescue VPN on Fashion-MNIST with softmax regression? (tune_spaces/study_axes.py)

    vpn-dist prep fashion-mnist --source DIR --out data/fm --val 10000
    vpn-dist study --spec study_fashion_mnist_sr --data data/fm --out reproduction/tuned-fashion-mnist-sr
"""
from tune_spaces.study_axes import study

STUDY = study("fashion-mnist", "sr", "Fashion-MNIST, softmax regression base: the baseline alone against VPN (DNN3 "
                                     "generator, joint training), 40 trials each, 40 epochs at most.")
