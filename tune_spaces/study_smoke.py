"""study_smoke: the study machinery in a few minutes on a tiny set (the same spaces, 4 trials per arm, 2 epochs).

    vpn-dist prep synthetic --out data/syn-tiny --train-size 600 --test-size 200 --val 100 --classes 4 --size 16x16
    vpn-dist study --spec study_smoke --data data/syn-tiny --out runs/study-smoke
"""
from tune_spaces.study_axes import study

STUDY = study(None, "dnn3", "Smoke: 4 trials per arm, 2 epochs, any prepared set with a val split.", trials=4,
              epochs=2, fixed={"train.batch_size": 100, "train.epoch_eval_images": 0, "data.num_workers": 1},
              rerun_seeds=[1000, 1001], grace_period=1, reduction_factor=2)
