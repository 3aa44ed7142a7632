"""The method table's common parts: the row base class, the model functions a loss calls and the
config readers the rows share."""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from consistency.core import distances, guidance, keys, parameterization, vp
from consistency.core.schedules import Curriculum, NoiseGrid

INDEX_SAMPLINGS = ("uniform", "lognormal")
ECT_SCALINGS = ("edm", "boundary")  # the scalings ECT trains with (it samples with boundary)
# How a method's models are sampled ('autoencoder': not at all; latent.vae reads its export).
SAMPLERS = ("consistency", "diffusion", "progressive", "autoencoder")
ALL_DISTANCES = distances.DISTANCES + ("lpips",)
VP_PARAMETERIZATIONS = tuple(vp.VP_PREDICTIONS)  # discrete VP (DDPM) networks: eps or v
TEACHERS = ("edm", "ddpm")  # rows whose runs are CD teachers (diffusion models)


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """The network as the functions a loss calls: fn(params, x, sigma [B], y, dropout_key)."""

    consistency: Callable  # f_theta: the boundary scalings (TrigFlow: its single form)
    denoiser: Callable  # D_theta: the EDM scalings (TrigFlow: its single form)
    raw: Callable  # F_theta(params, x_in, c_noise, y, key): the bare network (sCM)
    log_weight: Callable | None = None  # (params, c_noise) -> sCM's learned weighting w
    autoencode: Callable | None = None  # (params, x, key) -> (D(z), KL [B]): an autoencoder
    # D of the teacher's network when it differs from the student's (a guided student's teacher
    # has no w input); None: `denoiser`.
    teacher: Callable | None = None

    def teacher_denoiser(self) -> Callable:
        return self.denoiser if self.teacher is None else self.teacher


class Method:
    """A row of the table. Subclasses are frozen dataclasses of the method's hyper-parameters."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False  # a frozen teacher's params enter the loss
    samples_as: ClassVar[str] = "consistency"  # one of SAMPLERS
    # model.parameterization values it trains (TrigFlow: one form for denoiser and f_theta).
    parameterizations: ClassVar[tuple[str, ...]] = ("edm", "trigflow")
    needs_logvar: ClassVar[bool] = False  # sCM's learned weighting (model.logvar_features > 0)
    # A guided student (model.guidance_embed_dim > 0: LCM's w, embedded) may be trained.
    guided: ClassVar[bool] = False
    takes_skip: ClassVar[bool] = False  # training.skip_steps: pairs k points apart on the grid
    # training.distance values it takes (() = it has its own); aliases say what a name means here.
    distances: ClassVar[tuple[str, ...]] = ()
    distance_aliases: ClassVar[dict[str, str]] = {}

    @property
    def keeps_target(self) -> bool:
        """Whether the state keeps a target copy theta- (else theta- = stop_gradient(theta))."""
        return False

    @property
    def curriculum(self) -> Curriculum | None:
        return None

    def restarts(self, step: jax.Array) -> jax.Array | None:
        """Whether the student restarts from its EMA with a fresh optimiser at this step."""
        return None

    def schedule(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """step -> (mu(k), N(k)): the target EMA rate and the grid size (0 without a grid)."""
        if self.curriculum is None:
            return jnp.float32(0.0), jnp.int32(0)
        return self.curriculum(step)

    def loss(
        self, fns: ModelFns, distance, params, target_params, teacher_params, batch, key, step
    ):
        """(per-example losses [B], metrics with 'sigma' [B]) of one batch {'image', 'label'}."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config) -> "Method":
        raise NotImplementedError


def noise_grid(config) -> NoiseGrid:
    """The configured noise range and Karras exponent (model.sigma_min, sigma_max, rho); a VP
    model's range is its timesteps' levels sigma(0), sigma(T-1) (model.sigma_min/max unused)."""
    m = config.model
    discrete = vp_schedule(config)
    if discrete is not None:
        sigmas = discrete.sigmas()
        return NoiseGrid(sigma_min=float(sigmas[0]), sigma_max=float(sigmas[-1]), rho=m.rho)
    return NoiseGrid(sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho)


def vp_schedule(config) -> vp.VPSchedule | None:
    """The DDPM schedule (model.vp.*) of a model.parameterization='vp_eps' / 'vp_v' network."""
    m = config.model
    if m.parameterization not in vp.VP_PREDICTIONS:
        return None
    v = m.vp
    return vp.VPSchedule(
        num_train_timesteps=v.num_train_timesteps,
        beta_start=v.beta_start,
        beta_end=v.beta_end,
        beta_schedule=v.beta_schedule,
        prediction=vp.VP_PREDICTIONS[m.parameterization],
    )


def _vp_problems(config) -> list[str]:
    """model.vp.* of a VP network, one line per bad key."""
    v, out = config.model.vp, []
    n = v.num_train_timesteps
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        out.append(f"model.vp.num_train_timesteps={n!r}: must be an integer >= 2 (DDPM: 1000)")
    if v.beta_schedule not in vp.BETA_SCHEDULES:
        out.append(
            f"model.vp.beta_schedule: unknown {v.beta_schedule!r}; choose one of "
            f"{vp.BETA_SCHEDULES}"
        )
    if not 0 < v.beta_start <= v.beta_end < 1:
        out.append(
            f"model.vp.beta_start={v.beta_start}, beta_end={v.beta_end}: need 0 < beta_start "
            "<= beta_end < 1 (DDPM: 0.0001, 0.02; Stable Diffusion: 0.00085, 0.012)"
        )
    return out


def _curriculum(config, **overrides) -> Curriculum:
    t = config.training
    fields = dict(
        target_ema_mode=t.target_ema_mode,
        scale_mode=t.scale_mode,
        start_ema=t.start_ema,
        start_scales=t.start_scales,
        end_scales=t.end_scales,
        total_steps=t.total_steps if t.total_steps > 0 else t.num_steps,
        distill_steps_per_iter=t.distill_steps_per_iter,
    )
    try:
        return Curriculum(**{**fields, **overrides})
    except ValueError as e:  # the schedule's messages start with the key
        raise ValueError(f"training.{e}") from None


def _weighting(name: str, sigma_data: float):
    return parameterization.get_weighting(name, sigma_data=sigma_data)


def _dropped_labels(y, key, rate: float, null_class: int):
    """y with each label -> null_class at `rate` (CFG teachers), from a key of its own, so runs
    without dropout draw as before."""
    if rate <= 0:
        return y
    k_drop = keys.fold_in(key, 0x1AB)
    return guidance.drop_labels(y, k_drop, rate=rate, null_class=null_class)


def _label_dropout_fields(config) -> dict[str, Any]:
    """training.label_dropout and the null class, checked (the teachers' rows)."""
    t, d, m = config.training, config.data, config.model
    if not 0 <= t.label_dropout < 1:
        raise ValueError(f"training.label_dropout={t.label_dropout}: must be in [0, 1)")
    if t.label_dropout > 0 and not (d.class_conditional and m.null_label):
        raise ValueError(
            "training.label_dropout > 0 needs data.class_conditional and model.null_label "
            "(the null class data.num_classes)"
        )
    return dict(label_dropout=t.label_dropout, null_class=d.num_classes)


def _guidance_fields(config) -> dict[str, Any]:
    """A guided student's w range (training.guidance_min/max), checked (guided_cd, ct)."""
    t = config.training
    if not t.guidance_min <= t.guidance_max:
        raise ValueError(
            f"training.guidance_min={t.guidance_min} > training.guidance_max="
            f"{t.guidance_max}: give w_min <= w_max"
        )
    return dict(guided_net=True, w_min=t.guidance_min, w_max=t.guidance_max)
