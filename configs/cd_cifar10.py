"""CD on CIFAR-10 (jcm cifar10_ve_cd.py + launch.sh): N=18 Heun, mu=0, RAdam, 800k steps.

Pick the metric with the argument: --config=configs/cd_cifar10.py:lpips (or l1, l2).
"""

from configs import _paper

LR = {"l1": 2e-4, "l2": 4e-4, "lpips": 4e-4}  # launch.sh lines 17, 20, 23


VARIANTS = ("l1", "l2", "lpips")  # --config=FILE:ARG


def get_config(metric: str = "lpips"):
    config = _paper.cifar10(_paper.new())
    # jcm CD has no target network (mu = 0: the target is stop_gradient of the online params).
    _paper.cd(config, metric, num_scales=18, target_ema=0.0, lr=LR.get(metric, 4e-4), steps=800000)
    config.sampling.update(steps=18, ts=())  # one step; (0, 11, 17) for two (notebook example)
    config.eval.settings = ("1", "0,11,17")
    return config
