"""ECT on the bundled digits: tune the edm_digits teacher into a CM, q = 2 every 250 steps.

Run edm_digits first, then --config.training.teacher_checkpoint=EDM_WORKDIR/checkpoints.
"""

from configs import _digits, _successors


def get_config():
    config = _digits.digits()
    _successors.ect(config, q=2.0, huber_c=0.0, stage_steps=250, steps=2000)
    config.training.teacher_checkpoint = "runs/edm_digits/checkpoints"
    config.sampling.sigmas = (80.0, _successors.ICT_MID_SIGMA["cifar10"])
    return config
