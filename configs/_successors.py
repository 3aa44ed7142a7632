"""Method settings of iCT, ECT, sCM and the CM paper's continuous-time CD/CT, shared by configs.

Sources are the reference notes (successors-and-evaluation.md §1-3, official-implementations.md
§2.9); [R] marks a value recalled there and not verified against the paper.
"""

import math

SCM_MID_T = 1.1  # sCM App. G: 2-step sampling at t = 1.1 ...
SCM_MID_SIGMA = 0.5 * math.tan(SCM_MID_T)  # ... = EDM sigma sd tan t = 0.98238 (sd = 0.5)
CONTINUOUS_VARIANTS = ("cd-l2", "cd-l2-stopgrad", "ct-l2")
ICT_MID_SIGMA = {"cifar10": 0.821, "imagenet64": 1.526}  # iCT/ECT 2-step sigma (ECT --mid_t)


def ict(config, *, steps: int):
    """iCT (Song & Dhariwal 2023): CT with mu = 0, pseudo-Huber, lognormal pairs, 1/dt, N(k) x2."""
    config.training.update(
        loss="ct",
        distance="pseudo_huber",
        huber_c=-1.0,  # c = 0.00054 sqrt(d): 0.0299 on CIFAR-10
        weighting="ict",  # lambda = 1/(sigma_{i+1} - sigma_i), iCT's increasing indices
        index_sampling="lognormal",
        p_mean=-1.1,
        p_std=2.0,  # discretised lognormal pairs
        target_ema_mode="fixed",
        start_ema=0.0,  # theta- = stopgrad(theta): no EMA teacher
        scale_mode="exponential",
        start_scales=10,
        end_scales=1280,  # N = 11, 21, ..., 1281
        num_steps=steps,
        total_steps=steps,
        init_from_teacher=False,
        teacher_checkpoint="",
    )
    return config


def ect(config, *, q: float, huber_c: float, stage_steps: int, steps: int):
    """ECT (Geng et al. 2024, locuslab/ect loss.py): tune a diffusion model, dt shrinks by q."""
    config.training.update(
        loss="ect",
        distance="pseudo_huber",
        huber_c=huber_c,  # sqrt(||d||^2 + c^2) - c
        weighting="karras",  # 'snrpk': 1/t^2 + 1/sd^2
        p_mean=-1.1,
        p_std=2.0,  # ln t ~ N(-1.1, 2^2)
        ect_q=q,
        ect_k=8.0,
        ect_b=1.0,  # r = t (1 - (1 + 8 sigmoid(-t)) / q^(stage+1))
        ect_stage_steps=stage_steps,
        num_steps=steps,
        init_from_teacher=True,
        teacher_checkpoint="",  # --transfer from an EDM model
    )
    return config


def scm(config, kind: str, *, p_mean: float, p_std: float, steps: int):
    """sCM (Lu & Song 2024, Alg. 1, App. G): TrigFlow, JVP tangent, adaptive weighting."""
    if kind not in ("sct", "scd"):
        raise ValueError(f"unknown sCM variant: {kind!r}; choose sct or scd")
    trigflow(config)
    config.training.update(
        loss=kind,
        p_mean=p_mean,
        p_std=p_std,  # ln(sd tan t) ~ N(P_mean, P_std^2)
        scm_tangent_c=0.1,
        scm_warmup_steps=10000,  # g/(||g|| + 0.1); r: 0 -> 1 over 10k steps
        num_steps=steps,
        init_from_teacher=True,
        teacher_checkpoint="",  # from the teacher's EMA
    )
    config.sampling.update(sigmas=(config.model.sigma_max, SCM_MID_SIGMA))
    return config


def trigflow(config):
    """TrigFlow network: c_noise = t, positional embeddings, a learned logvar (EDM2's 128)."""
    config.model.update(parameterization="trigflow", logvar_features=128)
    config.model.ncsnpp.embedding_type = "positional"
    return config


def continuous(config, variant: str):
    """The CM paper's continuous-time CD/CT as jcm (cifar10_ve_continuous.py, launch.sh)."""
    if variant not in CONTINUOUS_VARIANTS:
        raise ValueError(
            f"unknown continuous-time variant: {variant!r}; choose one of {CONTINUOUS_VARIANTS}"
        )
    ct = variant.startswith("ct")
    config.training.update(
        loss="ct_continuous" if ct else "cd_continuous",
        distance="l2",  # jcm's continuous 'l2': the norm of the tangent
        continuous_stopgrad=ct or variant.endswith("stopgrad"),  # CT: dsm_target + stopgrad
        weighting="uniform",
        init_from_teacher=True,
        teacher_checkpoint="",  # finetune=True
    )
    lr = 1e-3 if variant == "cd-l2" else 5e-6  # launch.sh: CD-l2 1e-3; stopgrad and CT 5e-6
    config.optim.update(optimizer="radam", lr=lr, warmup_steps=0, grad_clip=0.0)
    return config
