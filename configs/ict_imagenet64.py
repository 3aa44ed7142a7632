"""iCT on ImageNet 64 (Song & Dhariwal 2023): class-conditional ADM, dropout 0.2 at <= 16x16,
2-step sampling at sigma 1.526; batch and length [R] (reference notes §1.1)."""

from configs import _paper, _successors


def get_config():
    config = _paper.imagenet64(_paper.new())
    _successors.ict(config, steps=800000)  # [R] length
    config.model.dropout = 0.2  # iCT ImageNet-64 ...
    config.model.adm.dropout_resolution = 16  # ... at resolutions <= 16 only
    config.training.batch_size = 4096  # [R]
    _paper.ema(config, (0.99997,), 0.99997)  # [R] iCT's ImageNet EMA
    config.optim.update(optimizer="radam", lr=1e-4, warmup_steps=0)  # [R]
    config.sampling.sigmas = (80.0, _successors.ICT_MID_SIGMA["imagenet64"])
    return config
