"""Progressive distillation (Salimans & Ho 2022; the CM paper's baseline) on the bundled digits.

From the edm_digits teacher: the student learns in one Euler step what its teacher does in two;
N = 32 -> 16 -> 8 -> 4 -> 2 -> 1 student steps, 150 steps per stage (the last two stages twice
that), each stage restarting from the previous student's EMA with a fresh optimiser (jcm).
Run edm_digits first, then --config.training.teacher_checkpoint=EDM_WORKDIR/checkpoints.
"""

from configs import _digits


def get_config():
    config = _digits.digits()
    config.training.update(
        loss="pd",
        distance="l2",
        weighting="truncated-snr",
        start_scales=32,
        distill_steps_per_iter=150,
        num_steps=1200,
        init_from_teacher=True,
        teacher_checkpoint="runs/edm_digits/checkpoints",
    )
    # jcm's PD: Adam, gradient clipping at 1 (its lr 5e-5 with linear decay suits 50k-step stages).
    config.optim.update(optimizer="adam", lr=2e-4, grad_clip=1.0)
    config.eval.settings = ("1", "2")  # Euler steps of the student (its last stages: N = 2, 1)
    return config
