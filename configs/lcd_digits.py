"""Guided consistency distillation (LCM's recipe in pixel space) on the bundled digits.

:teacher is edm_digits made class-conditional with a null class (label dropout 0.1, for
classifier-free guidance); :student (the default) distils it on the guided PF-ODE. Guidance is
LCM's convention throughout: the teacher is D(y) + w (D(y) - D(null)), the usual scale 1 + w;
the student takes w (training.guidance_min/max in training, sampling.guidance when sampled).
Pairs skip k = 20 points of a 360-point grid in one Heun step (LCM: 20 of 1,000), so the
student sees about as many distinct pairs as cd_digits' N = 18. The w range and
guidance_embed_dim are starting points for the digits, not tuned values.

:vp_teacher is LCM's kind of teacher instead: a DDPM noise-prediction network (1,000 linear-beta
timesteps, eps-MSE, label dropout 0.1), sampled by DDIM; :vp_student distils it as LCM does:
pairs t -> t - 20 of its timesteps, one DDIM step of the guided teacher. The student is the same
network (it sees x_vp and the timestep) with EDM's boundary scalings at sigma(t = 0).

python main.py --config=configs/lcd_digits.py:teacher --workdir=runs/lcd_digits_teacher
python main.py --config=configs/lcd_digits.py --workdir=runs/lcd_digits \
  --config.training.teacher_checkpoint=runs/lcd_digits_teacher/checkpoints
python main.py --config=configs/lcd_digits.py:vp_teacher --workdir=runs/lcd_digits_vp_teacher
python main.py --config=configs/lcd_digits.py:vp_student --workdir=runs/lcd_digits_vp \
  --config.training.teacher_checkpoint=runs/lcd_digits_vp_teacher/checkpoints
"""

from configs import _digits

VARIANTS = ("student", "teacher", "vp_teacher", "vp_student")  # --config=FILE:ARG


def _conditional(config):
    config.data.update(class_conditional=True, num_classes=10)
    config.model.null_label = True  # the null class data.num_classes (one more label row)
    config.sampling.guidance = 1.0  # w: the teacher's CFG scale when sampled (usual scale 2)
    return config


def teacher():
    config = _conditional(_digits.digits())
    config.training.update(loss="edm", num_steps=2000, label_dropout=0.1)
    config.optim.update(optimizer="adam", lr=1e-3, warmup_steps=200)
    config.sampling.teacher_steps = 18  # Heun, 35 evaluations of the guided denoiser
    config.eval.settings = ("18",)
    return config


def student():
    config = _conditional(_digits.digits())
    config.model.guidance_embed_dim = 64
    config.training.update(
        loss="guided_cd",
        distance="l2",
        solver="heun",
        target_ema_mode="fixed",
        scale_mode="fixed",
        start_scales=360,
        end_scales=360,
        skip_steps=20,
        guidance_min=0.0,
        guidance_max=4.0,
        start_ema=0.95,
        num_steps=2000,
        init_from_teacher=True,
        teacher_checkpoint="runs/lcd_digits_teacher/checkpoints",
    )
    config.sampling.update(steps=18, ts=())
    config.eval.settings = ("1", "0,11,17")
    return config


def _vp(config):
    config.model.parameterization = "vp_eps"  # model.vp: DDPM's 1,000 linear betas
    return config


def vp_teacher():
    config = _vp(teacher())
    config.training.loss = "ddpm"
    config.sampling.teacher_steps = 50  # DDIM steps (LCM's teacher grid: 50 of the 1,000)
    config.eval.settings = ("50",)
    return config


def vp_student():
    config = _vp(student())
    config.training.update(
        solver="ddim",  # LCM's DDIMSolver step t -> t - 20 ('dpm_solver_2': 2nd order)
        skip_steps=20,
        teacher_checkpoint="runs/lcd_digits_vp_teacher/checkpoints",
    )
    # An eps network's f moves by sigma F: up to sigma(999) = 157 times the EDM student's output
    # scale. At lr 4e-4 the loss diverged within 5 steps (a 400-step teacher); 2e-5 is stable.
    config.optim.lr = 2e-5
    return config


def get_config(arg: str = "student"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    builders = {"student": student, "teacher": teacher}
    return {**builders, "vp_teacher": vp_teacher, "vp_student": vp_student}[arg]()
