"""The method table: each training method is one row, a frozen object of its hyper-parameters.

A row's class attributes are its properties (whether it needs a teacher, how its models are
sampled, what parameterization and distances it takes); its fields are read from the config once,
by `from_config`; its `loss` returns per-example losses [B] and metrics. Nothing here is called
with the config inside jitted code. Adding a method: a loss in core/losses.py and a row here.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from consistency.core import distances, guidance, losses, ode, parameterization, schedules, vp
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


@dataclasses.dataclass(frozen=True)
class EDM(Method):
    """EDM denoising score matching: the diffusion teachers."""

    name: ClassVar[str] = "edm"
    samples_as: ClassVar[str] = "diffusion"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    label_dropout: float = 0.0  # labels -> null_class with this probability (CFG teachers)
    null_class: int = -1

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        y = _dropped_labels(batch["label"], key, self.label_dropout, self.null_class)
        return losses.edm_loss(
            lambda p, x, s, k: fns.denoiser(p, x, s, y, k),
            params,
            batch["image"],
            key,
            sigma_data=self.sigma_data,
            p_mean=self.p_mean,
            p_std=self.p_std,
        )

    @classmethod
    def from_config(cls, config):
        t = config.training
        return cls(
            sigma_data=config.model.sigma_data,
            p_mean=t.edm_p_mean,
            p_std=t.edm_p_std,
            **_label_dropout_fields(config),
        )


def _dropped_labels(y, key, rate: float, null_class: int):
    """y with each label -> null_class at `rate` (CFG teachers), from a key of its own, so runs
    without dropout draw as before."""
    if rate <= 0:
        return y
    k_drop = jax.random.fold_in(key, 0x1AB)
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


@dataclasses.dataclass(frozen=True)
class DDPM(Method):
    """DDPM (Ho et al. 2020): a discrete VP teacher, the eps- or v-MSE at uniform timesteps.

    The network sees x_vp = c_in x and the integer timestep, as diffusers' UNets; as a denoiser
    (model.parameterization='vp_eps' / 'vp_v') it is D = x - sigma eps in EDM variables, so it
    is sampled (DDIM) and distilled (cd, guided_cd) like an EDM teacher on its timesteps' levels.
    """

    name: ClassVar[str] = "ddpm"
    samples_as: ClassVar[str] = "diffusion"
    parameterizations: ClassVar[tuple[str, ...]] = VP_PARAMETERIZATIONS
    discrete: vp.VPSchedule = vp.VPSchedule()
    label_dropout: float = 0.0  # labels -> null_class with this probability (CFG teachers)
    null_class: int = -1

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        y = _dropped_labels(batch["label"], key, self.label_dropout, self.null_class)
        return losses.ddpm_loss(
            lambda p, x_in, t, k: fns.raw(p, x_in, t, y, k),
            params,
            batch["image"],
            key,
            alphas_cumprod=self.discrete.alphas_cumprod(),
            prediction=self.discrete.prediction,
        )

    @classmethod
    def from_config(cls, config):
        discrete = vp_schedule(config)
        if discrete is None:
            raise ValueError(
                f"model.parameterization={config.model.parameterization!r}: training.loss='ddpm' "
                f"takes one of {VP_PARAMETERIZATIONS}"
            )
        return cls(discrete=discrete, **_label_dropout_fields(config))


@dataclasses.dataclass(frozen=True)
class CT(Method):
    """Discrete consistency training (and iCT: mu = 0, lognormal pairs, 1/dt, pseudo-Huber)."""

    name: ClassVar[str] = "ct"
    distances: ClassVar[tuple[str, ...]] = ALL_DISTANCES
    takes_skip: ClassVar[bool] = True
    guided: ClassVar[bool] = True  # LCF: fine-tune a guided student, w given to both copies
    grid: NoiseGrid = NoiseGrid()
    schedule_spec: Curriculum = Curriculum()
    weighting: str = "uniform"
    sigma_data: float = 0.5
    index_sampling: str = "uniform"
    p_mean: float = -1.1  # iCT's lognormal pairs
    p_std: float = 2.0
    skip_steps: int = 1  # pairs (t_i, t_{i+k}) of the N-point grid (LCM's skipping step)
    guided_net: bool = False  # the network takes w (model.guidance_embed_dim > 0)
    w_min: float = 0.0  # a guided network's w ~ U[w_min, w_max] per example
    w_max: float = 0.0

    @property
    def curriculum(self) -> Curriculum:
        return self.schedule_spec

    def sample_w(self, key, batch: int) -> jax.Array:
        """w ~ U[w_min, w_max] per example, from a key of its own (the pairs draw as unguided)."""
        k_w = jax.random.fold_in(key, 0x6C3)
        return jax.random.uniform(k_w, (batch,), minval=self.w_min, maxval=self.w_max)

    @property
    def keeps_target(self) -> bool:
        c = self.schedule_spec
        return not (c.target_ema_mode == "fixed" and c.start_ema == 0.0)

    def index_sampler(self):
        """key, batch, N -> grid indices: None (uniform) or iCT's discretised lognormal."""
        if self.index_sampling == "uniform":
            return None

        def sample(key, batch, num_scales):
            return schedules.sample_lognormal_indices(
                key,
                batch,
                num_scales,
                max_scales=self.schedule_spec.max_scales,
                p_mean=self.p_mean,
                p_std=self.p_std,
                **self.grid.kwargs(),
            )

        return sample

    def _kwargs(self, distance, step):
        _, num_scales = self.schedule(step)
        return dict(
            num_scales=num_scales,
            distance=distance,
            index_sampler=self.index_sampler(),
            weighting=_weighting(self.weighting, self.sigma_data),
            skip=self.skip_steps,
            **self.grid.kwargs(),
        )

    def _target(self, params, target_params):
        return target_params if self.keeps_target else params  # stop_gradient is in the loss

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        """CT; a guided network (LCF, Luo et al. 2023) is the online and the target f(x, t, y, w)
        at one w per example."""
        y = batch["label"]
        w = self.sample_w(key, y.shape[0]) if self.guided_net else None
        kw = {} if w is None else {"guidance": w}
        per, metrics = losses.consistency_training_loss(
            lambda p, x, s, k: fns.consistency(p, x, s, y, k, **kw),
            params,
            self._target(params, target_params),
            batch["image"],
            key,
            **self._kwargs(distance, step),
        )
        return per, metrics if w is None else {**metrics, "w": w}

    @classmethod
    def _fields(cls, config) -> dict[str, Any]:
        t = config.training
        if t.scale_mode == "progdist":
            raise ValueError(
                f"training.scale_mode='progdist' is progressive distillation's curriculum; "
                f"use training.loss='pd' (not {cls.name!r})"
            )
        curriculum = _curriculum(config)
        cls._check_pairs(config, curriculum)
        return dict(
            grid=noise_grid(config),
            schedule_spec=curriculum,
            weighting=t.weighting,
            sigma_data=config.model.sigma_data,
            index_sampling=t.index_sampling,
            p_mean=t.p_mean,
            p_std=t.p_std,
            skip_steps=t.skip_steps,
        )

    @classmethod
    def _check_pairs(cls, config, curriculum: Curriculum) -> None:
        """training.skip_steps and index_sampling against the smallest grid N(0)."""
        t = config.training
        first_n = int(curriculum(jnp.int32(0))[1])  # N(k) only grows: the smallest grid
        if t.skip_steps > 1 and t.index_sampling != "uniform":
            raise ValueError(
                f"training.skip_steps={t.skip_steps} takes training.index_sampling='uniform' "
                f"(not {t.index_sampling!r}); or set training.skip_steps=1"
            )
        if not 1 <= t.skip_steps < first_n:
            raise ValueError(
                f"training.skip_steps={t.skip_steps}: must be in [1, N - 1] for the smallest grid "
                f"N = {first_n} (training.start_scales); lower it or raise the grid size"
            )

    @classmethod
    def from_config(cls, config):
        guided = config.model.guidance_embed_dim > 0
        return cls(**cls._fields(config), **(_guidance_fields(config) if guided else {}))


def _guidance_fields(config) -> dict[str, Any]:
    """A guided student's w range (training.guidance_min/max), checked (guided_cd, ct)."""
    t = config.training
    if not t.guidance_min <= t.guidance_max:
        raise ValueError(
            f"training.guidance_min={t.guidance_min} > training.guidance_max="
            f"{t.guidance_max}: give w_min <= w_max"
        )
    return dict(guided_net=True, w_min=t.guidance_min, w_max=t.guidance_max)


@dataclasses.dataclass(frozen=True)
class CD(CT):
    """Discrete consistency distillation: one ODE step (Heun, Euler, DDIM, DPM-Solver-2) of the
    frozen teacher. A VP teacher (model.parameterization='vp_eps' / 'vp_v', a 'ddpm' run) is
    distilled on its own timesteps: the pairs t -> max(t - k, 0) of LCM's grid (k =
    training.skip_steps), the student f_theta the same network with EDM's boundary scalings
    (parameterization.vp_boundary_scalings, boundary at sigma(t = 0))."""

    name: ClassVar[str] = "cd"
    needs_teacher: ClassVar[bool] = True
    guided: ClassVar[bool] = False  # its teacher step has no w: guided_cd
    parameterizations: ClassVar[tuple[str, ...]] = ("edm", "trigflow") + VP_PARAMETERIZATIONS
    solver: str = "heun"
    discrete: vp.VPSchedule | None = None  # a VP teacher's schedule: its timesteps are the grid

    def _kwargs(self, distance, step):
        kw = super()._kwargs(distance, step)
        if self.discrete is None:
            return kw
        return {**kw, "sigma_table": self.discrete.sigmas()}

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        y = batch["label"]
        return losses.consistency_distillation_loss(
            lambda p, x, s, k: fns.consistency(p, x, s, y, k),
            params,
            self._target(params, target_params),
            lambda x, s: fns.teacher_denoiser()(teacher_params, x, s, y, None),
            ode.get_solver(self.solver),
            batch["image"],
            key,
            **self._kwargs(distance, step),
        )

    @classmethod
    def _fields(cls, config) -> dict[str, Any]:
        return {**super()._fields(config), "discrete": vp_schedule(config)}

    @classmethod
    def _check_pairs(cls, config, curriculum: Curriculum) -> None:
        """A VP teacher's grid is its T timesteps (LCM's pairs): k in [1, T-1], fixed, uniform."""
        discrete, t = vp_schedule(config), config.training
        if discrete is None:
            return super()._check_pairs(config, curriculum)
        n = discrete.num_train_timesteps
        if t.scale_mode != "fixed" or t.index_sampling != "uniform":
            raise ValueError(
                f"training.scale_mode={t.scale_mode!r}, index_sampling={t.index_sampling!r}: a VP "
                f"teacher's grid is its model.vp.num_train_timesteps={n} timesteps; set "
                "scale_mode='fixed' and index_sampling='uniform'"
            )
        if not 1 <= t.skip_steps < n:
            raise ValueError(
                f"training.skip_steps={t.skip_steps}: must be in [1, {n - 1}] for the VP "
                f"teacher's model.vp.num_train_timesteps={n} timesteps (LCM: 20 of 1,000)"
            )

    @classmethod
    def from_config(cls, config):
        return cls(**cls._fields(config), solver=config.training.solver)


@dataclasses.dataclass(frozen=True)
class GuidedCD(CD):
    """Guided CD (LCM, Luo et al. 2023): CD on the classifier-free-guided PF-ODE, w embedded.

    Per example w ~ U[w_min, w_max]; the teacher step (training.solver, `skip_steps` grid points
    at once; a VP teacher's DDIM step is LCM's) runs on D_w = D(x, s, y) + w (D(x, s, y) -
    D(x, s, null)), LCM's convention (the usual guidance scale is 1 + w; w = 0: the
    conditional teacher). Guiding D guides x0 and eps
    alike, as LCM does. The student and its EMA target f(x, t, y, w) see the same w.
    """

    name: ClassVar[str] = "guided_cd"
    guided: ClassVar[bool] = True
    null_class: int = -1

    def guided_teacher(self, denoise: Callable, teacher_params, y, w) -> Callable:
        """(x, s) -> D_w: the conditional and null-class calls batched into one."""
        null = jnp.full_like(y, self.null_class)

        def fn(x, s):
            s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x.shape[:1])
            twice = lambda a, b: jnp.concatenate([a, b])
            both = denoise(teacher_params, twice(x, x), twice(s, s), twice(y, null), None)
            cond, uncond = jnp.split(both, 2)
            return guidance.guided_lcm(cond, uncond, w=w)

        return fn

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        y = batch["label"]
        w = self.sample_w(key, y.shape[0])
        per, metrics = losses.consistency_distillation_loss(
            lambda p, x, s, k: fns.consistency(p, x, s, y, k, guidance=w),
            params,
            self._target(params, target_params),
            self.guided_teacher(fns.teacher_denoiser(), teacher_params, y, w),
            ode.get_solver(self.solver),
            batch["image"],
            key,
            **self._kwargs(distance, step),
        )
        return per, {**metrics, "w": w}

    @classmethod
    def from_config(cls, config):
        t, d, m = config.training, config.data, config.model
        if not (d.class_conditional and m.null_label):
            raise ValueError(
                "training.loss='guided_cd' needs data.class_conditional and model.null_label "
                "(a teacher trained with training.label_dropout > 0)"
            )
        if m.guidance_embed_dim < 1:
            raise ValueError(
                "training.loss='guided_cd' needs model.guidance_embed_dim > 0 (the student's w "
                "input; LCM: 256)"
            )
        return cls(
            **cls._fields(config),
            **_guidance_fields(config),
            solver=t.solver,
            null_class=d.num_classes,
        )


@dataclasses.dataclass(frozen=True)
class PD(Method):
    """Progressive distillation (Salimans & Ho 2022; the CM paper's baseline, jcm).

    The student D_theta (EDM scalings) learns in one Euler step what the teacher does in two;
    N halves every `distill_steps_per_iter` steps (schedules.progdist_num_scales). The teacher is
    the target copy: the EDM teacher at first, then at each halving the student's EMA, which the
    student restarts from with a fresh optimiser (jcm train.py).
    """

    name: ClassVar[str] = "pd"
    needs_teacher: ClassVar[bool] = True
    samples_as: ClassVar[str] = "progressive"
    distances: ClassVar[tuple[str, ...]] = ALL_DISTANCES
    grid: NoiseGrid = NoiseGrid()
    start_scales: int = 4096
    distill_steps_per_iter: int = 50000
    weighting: str = "truncated-snr"
    sigma_data: float = 0.5

    @property
    def curriculum(self) -> Curriculum:
        return Curriculum(
            target_ema_mode="fixed",
            scale_mode="progdist",
            start_ema=1.0,
            start_scales=self.start_scales,
            end_scales=self.start_scales,
            distill_steps_per_iter=self.distill_steps_per_iter,
        )

    @property
    def keeps_target(self) -> bool:
        return True  # the current stage's teacher

    def restarts(self, step: jax.Array) -> jax.Array:
        """At the first step of every stage after the first (N just halved)."""
        _, now = self.schedule(step)
        _, before = self.schedule(jnp.maximum(step - 1, 0))
        return (step > 0) & (now != before)

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        y = batch["label"]
        _, num_scales = self.schedule(step)
        return losses.progressive_distillation_loss(
            lambda p, x, s, k: fns.denoiser(p, x, s, y, k),
            params,
            lambda x, s: fns.denoiser(target_params, x, s, y, None),
            batch["image"],
            key,
            num_scales=num_scales,
            distance=distance,
            weighting=_weighting(self.weighting, self.sigma_data),
            **self.grid.kwargs(),
        )

    @classmethod
    def from_config(cls, config):
        t = config.training
        return cls(
            grid=noise_grid(config),
            start_scales=t.start_scales,
            distill_steps_per_iter=t.distill_steps_per_iter,
            weighting=t.weighting,
            sigma_data=config.model.sigma_data,
        )


@dataclasses.dataclass(frozen=True)
class ECT(Method):
    """ECT (Geng et al. 2024): tune a diffusion model, dt = t - r shrinking by q every stage."""

    name: ClassVar[str] = "ect"
    distances: ClassVar[tuple[str, ...]] = ALL_DISTANCES
    weighting: str = "karras"
    sigma_data: float = 0.5
    sigma_min: float = schedules.SIGMA_MIN
    p_mean: float = -1.1
    p_std: float = 2.0
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    stage_steps: int = 25000
    # The reference trains with the EDM scalings (boundary at r = 0, where its target is x0) and
    # samples with the boundary ones; 'boundary' trains the sampled function (an ablation).
    scalings: str = "edm"

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        y = batch["label"]
        fn = fns.denoiser if self.scalings == "edm" else fns.consistency
        return losses.easy_consistency_loss(
            lambda p, x, s, k: fn(p, x, s, y, k),
            params,
            batch["image"],
            key,
            step,
            distance=distance,
            weighting=_weighting(self.weighting, self.sigma_data),
            p_mean=self.p_mean,
            p_std=self.p_std,
            q=self.q,
            k=self.k,
            b=self.b,
            stage_steps=self.stage_steps,
            r_min=0.0 if self.scalings == "edm" else self.sigma_min,
        )

    @classmethod
    def from_config(cls, config):
        t, m = config.training, config.model
        return cls(
            weighting=t.weighting,
            sigma_data=m.sigma_data,
            sigma_min=m.sigma_min,
            p_mean=t.p_mean,
            p_std=t.p_std,
            q=t.ect_q,
            k=t.ect_k,
            b=t.ect_b,
            stage_steps=t.ect_stage_steps,
            scalings=t.ect_scalings,
        )


@dataclasses.dataclass(frozen=True)
class CTContinuous(Method):
    """The CM paper's continuous-time CT (jcm): the tangent with the data's score estimate."""

    name: ClassVar[str] = "ct_continuous"
    # jcm's continuous-time 'l2' is the norm of the tangent, not the per-pixel mean of CD/CT.
    distances: ClassVar[tuple[str, ...]] = ("l1", "l2")
    distance_aliases: ClassVar[dict[str, str]] = {"l2": "l2_norm"}
    grid: NoiseGrid = NoiseGrid()
    stopgrad: bool = False
    weighting: str = "uniform"
    sigma_data: float = 0.5

    def _teacher(self, fns, teacher_params, y):
        return None

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        y = batch["label"]
        return losses.continuous_consistency_loss(
            lambda p, x, s, k: fns.consistency(p, x, s, y, k),
            params,
            batch["image"],
            key,
            teacher_denoise=self._teacher(fns, teacher_params, y),
            stopgrad=self.stopgrad,
            distance=distance,
            weighting=_weighting(self.weighting, self.sigma_data),
            **self.grid.kwargs(),
        )

    @classmethod
    def from_config(cls, config):
        t = config.training
        if t.continuous_stopgrad and t.distance != "l2":
            raise ValueError(
                f"training.continuous_stopgrad needs training.distance='l2' (jcm's pseudo-loss "
                f"of the l2 norm), not {t.distance!r}"
            )
        return cls(
            grid=noise_grid(config),
            stopgrad=t.continuous_stopgrad,
            weighting=t.weighting,
            sigma_data=config.model.sigma_data,
        )


@dataclasses.dataclass(frozen=True)
class CDContinuous(CTContinuous):
    """The CM paper's continuous-time CD (jcm): the tangent along the teacher's PF-ODE."""

    name: ClassVar[str] = "cd_continuous"
    needs_teacher: ClassVar[bool] = True

    def _teacher(self, fns, teacher_params, y):
        return lambda x, s: fns.denoiser(teacher_params, x, s, y, None)


@dataclasses.dataclass(frozen=True)
class SCT(Method):
    """sCT (Lu & Song 2024): TrigFlow, the JVP tangent normalised, the learned weighting."""

    name: ClassVar[str] = "sct"
    parameterizations: ClassVar[tuple[str, ...]] = ("trigflow",)
    needs_logvar: ClassVar[bool] = True
    sigma_data: float = 0.5
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_c: float = 0.1
    warmup_steps: int = 10000

    def _velocity(self, fns, teacher_params, y):
        return None

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        y = batch["label"]
        return losses.scm_loss(
            lambda p, x_in, s, k: fns.raw(p, x_in, s, y, k),
            fns.log_weight,
            params,
            batch["image"],
            key,
            velocity_fn=self._velocity(fns, teacher_params, y),
            warmup=schedules.tangent_warmup(step, self.warmup_steps),
            sigma_data=self.sigma_data,
            p_mean=self.p_mean,
            p_std=self.p_std,
            tangent_c=self.tangent_c,
        )

    @classmethod
    def from_config(cls, config):
        t = config.training
        return cls(
            sigma_data=config.model.sigma_data,
            p_mean=t.p_mean,
            p_std=t.p_std,
            tangent_c=t.scm_tangent_c,
            warmup_steps=t.scm_warmup_steps,
        )


@dataclasses.dataclass(frozen=True)
class SCD(SCT):
    """sCD (Lu & Song 2024): sCT with the TrigFlow teacher's velocity as dx/dt."""

    name: ClassVar[str] = "scd"
    needs_teacher: ClassVar[bool] = True

    def _velocity(self, fns, teacher_params, y):
        sd = self.sigma_data
        return lambda x, t: sd * fns.raw(teacher_params, x / sd, t, y, None)


@dataclasses.dataclass(frozen=True)
class VAE(Method):
    """The KL autoencoder of latent models (LDM's first stage, without its GAN): a reconstruction
    distance + kl_weight KL; the run exports a diffusers vae/ folder that latent.vae reads."""

    name: ClassVar[str] = "vae"
    samples_as: ClassVar[str] = "autoencoder"
    distances: ClassVar[tuple[str, ...]] = ("l1", "l2", "lpips")
    kl_weight: float = 1e-6
    lpips_weight: float = 0.0  # > 0: l1 + lpips_weight x the injected distance (LPIPS)

    def loss(self, fns, distance, params, target_params, teacher_params, batch, key, step):
        return losses.autoencoder_loss(
            fns.autoencode,
            params,
            batch["image"],
            key,
            distance=distance,
            kl_weight=self.kl_weight,
            pixel_distance=distances.l1 if self.lpips_weight > 0 else None,
            perceptual_weight=self.lpips_weight,
        )

    @classmethod
    def from_config(cls, config):
        t = config.training
        if config.model.name != "autoencoder_kl":
            raise ValueError(
                f"training.loss='vae' trains model.name='autoencoder_kl', not {config.model.name!r}"
            )
        if t.vae_kl_weight < 0 or t.vae_lpips_weight < 0:
            raise ValueError("training.vae_kl_weight and training.vae_lpips_weight must be >= 0")
        lpips_weight = t.vae_lpips_weight if t.distance == "lpips" else 0.0
        return cls(kl_weight=t.vae_kl_weight, lpips_weight=lpips_weight)


# The table: training.loss -> its row.
# DDPM: the discrete VP (eps / v) teachers that cd and guided_cd also distil.
# VAE: the autoencoder of latent models (latent.vae), sampled by no mode.
ROWS = (EDM, CD, CT, PD, ECT, CDContinuous, CTContinuous, SCT, SCD, GuidedCD, VAE, DDPM)
METHODS: dict[str, type[Method]] = {row.name: row for row in ROWS}
LOSSES = tuple(METHODS)


def row(name: str) -> type[Method]:
    """The method class of training.loss `name` (its properties, without building it)."""
    if name not in METHODS:
        raise ValueError(f"training.loss: unknown {name!r}; choose one of {LOSSES}")
    return METHODS[name]


def from_config(config) -> Method:
    """The configured method: its row filled from config.training and config.model."""
    return row(config.training.loss).from_config(config)


def distance_name(method: Method | type[Method], name: str) -> str:
    """What training.distance `name` means for this method (e.g. the tangent's norm for 'l2')."""
    if method.distances and name not in method.distances:
        raise ValueError(
            f"training.distance={name!r} is not supported by training.loss={method.name!r}; "
            f"choose one of {method.distances}"
        )
    return method.distance_aliases.get(name, name)


def problems(config) -> list[str]:
    """Every inconsistency between the configured method and the rest of the config."""
    t, m = config.training, config.model
    if t.loss not in METHODS:
        return [f"training.loss: unknown {t.loss!r}; choose one of {LOSSES}"]
    cls = METHODS[t.loss]
    out = []
    if m.parameterization not in cls.parameterizations:
        out.append(
            f"model.parameterization={m.parameterization!r}: training.loss={t.loss!r} takes "
            f"one of {cls.parameterizations}"
        )
    if m.parameterization in VP_PARAMETERIZATIONS:
        out += _vp_problems(config)
    if cls.needs_logvar and m.logvar_features < 1:
        out.append(
            f"model.logvar_features: training.loss={t.loss!r} needs > 0 (the learned weighting)"
        )
    if t.index_sampling not in INDEX_SAMPLINGS:
        out.append(
            f"training.index_sampling: unknown {t.index_sampling!r}; choose one of "
            f"{INDEX_SAMPLINGS}"
        )
    if t.ect_scalings not in ECT_SCALINGS:
        out.append(
            f"training.ect_scalings: unknown {t.ect_scalings!r}; choose one of {ECT_SCALINGS}"
        )
    if t.weighting not in parameterization.WEIGHTINGS:
        out.append(
            f"training.weighting: unknown {t.weighting!r}; choose one of "
            f"{parameterization.WEIGHTINGS}"
        )
    if m.guidance_embed_dim > 0 and not cls.guided:
        out.append(
            f"model.guidance_embed_dim={m.guidance_embed_dim}: training.loss={t.loss!r} does not "
            "train a guided student; set it to 0 (or training.loss='guided_cd'; 'ct' fine-tunes "
            "one: LCF)"
        )
    if t.skip_steps != 1 and not cls.takes_skip:
        out.append(
            f"training.skip_steps={t.skip_steps}: training.loss={t.loss!r} has no grid pairs to "
            "skip (only cd, ct and guided_cd); set it to 1"
        )
    if t.solver not in ode.SOLVERS:
        out.append(f"training.solver: unknown {t.solver!r}; choose one of {ode.SOLVERS}")
    if t.distance not in ALL_DISTANCES:
        out.append(f"training.distance: unknown {t.distance!r}; choose one of {ALL_DISTANCES}")
    else:
        try:
            distance_name(cls, t.distance)
        except ValueError as e:
            out.append(str(e))
    if out:
        return out
    try:
        from_config(config)  # the row's own checks (curriculum modes, combinations)
    except ValueError as e:
        out.append(str(e))
    return out
