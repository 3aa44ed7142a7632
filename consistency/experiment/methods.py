"""The method table: each training method's loss, built from the config."""

import functools
from collections.abc import Callable

import jax

from consistency.core import distances, losses, ode, parameterization, schedules
from consistency.experiment.networks import Network, _choice, model_fn, trigflow_net_fn

LOSSES = ("edm", "cd", "ct", "ect", "cd_continuous", "ct_continuous", "sct", "scd")


ECT_SCALINGS = ("edm", "boundary")  # the scalings ECT trains with (it samples with boundary)


# Losses whose target network is stop_gradient(params) by definition: no target copy is kept.
ONLINE_TARGET_LOSSES = ("ect", "cd_continuous", "ct_continuous", "sct", "scd")


INDEX_SAMPLINGS = ("uniform", "lognormal")


def schedule_fn(config) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """step -> (mu(k), N(k)) of the configured curriculum."""
    t = config.training
    total = t.total_steps if t.total_steps > 0 else t.num_steps
    return functools.partial(
        schedules.ema_and_scales, target_ema_mode=t.target_ema_mode, scale_mode=t.scale_mode,
        start_ema=t.start_ema, start_scales=t.start_scales, end_scales=t.end_scales,
        total_steps=total, distill_steps_per_iter=t.distill_steps_per_iter,
    )  # fmt: skip


def loss_fn(config, network: Network, distance) -> Callable:
    """fn(params, target_params, teacher_params, batch, key, step) -> (per-example [B], metrics)."""
    t, m = config.training, config.model
    name = _choice(t.loss, LOSSES, "training.loss")
    if name in ONLINE_TARGET_LOSSES:
        return _successor_loss_fn(config, network, distance)
    edm = model_fn(network, config, "edm")
    cm = model_fn(network, config, "consistency")
    schedule = schedule_fn(config)
    weighting = parameterization.get_weighting(t.weighting, sigma_data=m.sigma_data)
    grid = dict(sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho)
    solver = ode.get_solver(t.solver)
    sampler = index_sampler(config)
    online = online_target(config)

    def fn(params, target_params, teacher_params, batch, key, step):
        x0, y = batch["image"], batch["label"]
        if name == "edm":
            denoise = lambda p, x, s, k: edm(p, x, s, y, k)  # noqa: E731
            return losses.edm_loss(
                denoise, params, x0, key, sigma_data=m.sigma_data, p_mean=t.edm_p_mean,
                p_std=t.edm_p_std,
            )  # fmt: skip
        _, num_scales = schedule(step)
        consistency = lambda p, x, s, k: cm(p, x, s, y, k)  # noqa: E731
        kw = dict(num_scales=num_scales, distance=distance, weighting=weighting, **grid)
        kw.update(index_sampler=sampler)
        target_params = params if online else target_params  # stop_gradient is in the loss
        if name == "ct":
            return losses.consistency_training_loss(
                consistency, params, target_params, x0, key, **kw
            )
        teacher = lambda x, s: edm(teacher_params, x, s, y, None)  # noqa: E731
        return losses.consistency_distillation_loss(
            consistency, params, target_params, teacher, solver, x0, key, **kw
        )

    return fn


def online_target(config) -> bool:
    """Whether the target network is stop_gradient(params): no EMA target copy is kept.

    True for ECT, continuous-time and sCM losses, and for CD/CT with a fixed mu = 0 (iCT).
    """
    t = config.training
    if t.loss in ONLINE_TARGET_LOSSES:
        return True
    fixed_zero = t.target_ema_mode == "fixed" and t.start_ema == 0.0
    return t.loss in ("cd", "ct") and fixed_zero and t.scale_mode != "progdist"


def index_sampler(config) -> Callable | None:
    """key, batch, N -> grid indices of CD/CT: None (uniform) or iCT's discretised lognormal."""
    t, m = config.training, config.model
    if _choice(t.index_sampling, INDEX_SAMPLINGS, "training.index_sampling") == "uniform":
        return None
    max_scales = schedules.max_num_scales(
        t.scale_mode, start_scales=t.start_scales, end_scales=t.end_scales
    )
    return functools.partial(
        schedules.sample_lognormal_indices, max_scales=max_scales, p_mean=t.p_mean,
        p_std=t.p_std, sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho,
    )  # fmt: skip


def _successor_loss_fn(config, network: Network, distance) -> Callable:
    """The loss fn of ECT, continuous-time CD/CT and sCT/sCD (targets are sg(params))."""
    t, m = config.training, config.model
    name = t.loss
    weighting = parameterization.get_weighting(t.weighting, sigma_data=m.sigma_data)
    cm = model_fn(network, config, "consistency")
    edm = model_fn(network, config, "edm")
    net = trigflow_net_fn(network)
    if name in ("sct", "scd") and (m.parameterization != "trigflow" or network.logvar is None):
        raise ValueError(f"training.loss={name!r} needs model.parameterization='trigflow' and "
                         "model.logvar_features > 0")  # fmt: skip
    if name in ("cd_continuous", "ct_continuous") and t.distance == "l2":
        distance = distances.l2_norm  # jcm's continuous-time 'l2' is the norm of the tangent

    def fn(params, target_params, teacher_params, batch, key, step):
        x0, y = batch["image"], batch["label"]
        consistency = lambda p, x, s, k: cm(p, x, s, y, k)  # noqa: E731
        if name == "ect":
            # The reference trains with the EDM scalings (boundary at r = 0, where its target is
            # x0) and samples with the boundary ones; 'boundary' trains the sampled function.
            edm_train = _choice(t.ect_scalings, ECT_SCALINGS, "training.ect_scalings") == "edm"
            ect_fn = (lambda p, x, s, k: edm(p, x, s, y, k)) if edm_train else consistency
            return losses.easy_consistency_loss(
                ect_fn, params, x0, key, step, distance=distance, weighting=weighting,
                p_mean=t.p_mean, p_std=t.p_std, q=t.ect_q, k=t.ect_k, b=t.ect_b,
                stage_steps=t.ect_stage_steps, r_min=0.0 if edm_train else m.sigma_min,
            )  # fmt: skip
        if name in ("cd_continuous", "ct_continuous"):
            teacher = None
            if name == "cd_continuous":
                teacher = lambda x, s: edm(teacher_params, x, s, y, None)  # noqa: E731
            return losses.continuous_consistency_loss(
                consistency, params, x0, key, teacher_denoise=teacher,
                stopgrad=t.continuous_stopgrad, distance=distance, weighting=weighting,
                sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho,
            )  # fmt: skip
        velocity = None
        if name == "scd":
            sd = m.sigma_data
            velocity = lambda x, s: sd * net(teacher_params, x / sd, s, y, None)  # noqa: E731
        return losses.scm_loss(
            lambda p, x_in, s, k: net(p, x_in, s, y, k), network.log_weight, params, x0, key,
            velocity_fn=velocity, warmup=schedules.tangent_warmup(step, t.scm_warmup_steps),
            sigma_data=m.sigma_data, p_mean=t.p_mean, p_std=t.p_std, tangent_c=t.scm_tangent_c,
        )  # fmt: skip

    return fn
