"""sCM on the bundled digits: :sct (default), :scd, or :teacher (the TrigFlow diffusion model).

Run :teacher first (--workdir=runs/trigflow_digits); :sct and :scd start from its EMA (sCD also
distils it). Tangent warm-up over 500 steps (the paper's 10k, scaled to the run).
"""

from configs import _digits, _successors

TEACHER = "runs/trigflow_digits/checkpoints"


VARIANTS = ("sct", "scd", "teacher")  # --config=FILE:ARG


def get_config(kind: str = "sct"):
    config = _digits.digits()
    if kind == "teacher":
        _successors.trigflow(config)
        config.training.update(loss="edm", num_steps=2000)
        config.optim.update(optimizer="adam", lr=1e-3, warmup_steps=200)  # as edm_digits
        config.sampling.teacher_steps = 18
        config.eval.settings = ("18",)
        return config
    _successors.scm(config, kind, p_mean=-1.0, p_std=1.4, steps=2000)
    config.training.update(scm_warmup_steps=500, teacher_checkpoint=TEACHER)
    config.optim.update(optimizer="radam", lr=4e-4, beta2=0.99)
    return config
