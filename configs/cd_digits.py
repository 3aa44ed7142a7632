"""CD on the bundled digits from the edm_digits teacher: N=18 Heun, mu=0.95, l2.

Run edm_digits first, then --config.training.teacher_checkpoint=EDM_WORKDIR/checkpoints.
"""

from configs import _digits


def get_config():
    config = _digits.digits()
    config.training.update(
        loss="cd",
        distance="l2",
        solver="heun",
        target_ema_mode="fixed",
        scale_mode="fixed",
        start_scales=18,
        end_scales=18,
        start_ema=0.95,
        num_steps=2000,
        init_from_teacher=True,
        teacher_checkpoint="runs/edm_digits/checkpoints",
    )
    config.sampling.update(steps=18, ts=())
    config.eval.settings = ("1", "0,11,17")
    return config
