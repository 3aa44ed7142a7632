"""ECT on ImageNet 64 (locuslab/ect imgnet branch run_imgnet_ecm.sh): q = 4, c = 0.06, Adam,
bs 128, 12.8 Mimg = 100k steps, 2-step sigma 1.526. ECT tunes EDM2-S; here the cm ADM teacher."""

from configs import _paper, _successors


def get_config():
    config = _paper.imagenet64(_paper.new())
    # tick 6.4 kimg x double 500 = 3.2 Mimg = 25k steps of 128 per stage.
    _successors.ect(config, q=4.0, huber_c=0.06, stage_steps=25000, steps=100000)
    config.data.random_flip = False  # ct_train.py --xflip default
    config.model.dtype = "float32"  # --fp16=0
    config.training.batch_size = 128
    _paper.ema(config, (0.9999,), 0.9999)  # [R] (ECT's ImageNet branch uses post-hoc EMA)
    config.optim.update(optimizer="adam", lr=1e-3, warmup_steps=0)  # [R] ct_train.py default lr
    config.sampling.sigmas = (80.0, _successors.ICT_MID_SIGMA["imagenet64"])
    return config
