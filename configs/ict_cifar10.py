"""iCT on CIFAR-10 (Song & Dhariwal 2023): NCSN++ (Fourier scale 0.02, dropout 0.3), batch 1024,
RAdam, 400k steps, 2-step sampling at sigma 0.821 (reference notes §1.1)."""

from configs import _paper, _successors


def get_config():
    config = _paper.cifar10(_paper.new())
    _successors.ict(config, steps=400000)
    config.model.ncsnpp.fourier_scale = 0.02  # iCT: 16 -> 0.02, less sensitive to sigma
    config.model.dropout = 0.3  # iCT; online and target passes share the dropout mask
    config.training.batch_size = 1024  # ECT README's iCT row: bs 1024, 400k iterations
    config.training.ema_rates = (0.99993,)  # [R] iCT's CIFAR-10 EMA
    config.optim.update(optimizer="radam", lr=1e-4, warmup_steps=0)  # RAdam [V]; lr [R]
    config.sampling.sigmas = (80.0, _successors.ICT_MID_SIGMA["cifar10"])
    return config
