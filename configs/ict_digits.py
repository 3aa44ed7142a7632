"""iCT on the bundled digits from scratch: mu = 0, pseudo-Huber, lognormal pairs, 1/dt weights,
N(k) 11 -> 1281 doubling over the run; 2-step samples at sigma 0.821. Minutes on CPU."""

from configs import _digits, _successors


def get_config():
    config = _digits.digits()
    _successors.ict(config, steps=2000)
    config.sampling.sigmas = (80.0, _successors.ICT_MID_SIGMA["cifar10"])
    config.eval.settings = ("1", "sigma=80,0.821")  # one step, two at 0.821 (also in training)
    return config
