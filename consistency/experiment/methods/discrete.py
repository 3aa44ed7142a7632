"""The paper's discrete-time rows: CT, CD, guided CD (LCM) and progressive distillation."""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from consistency.core import guidance, keys, losses, ode, schedules, vp
from consistency.core.schedules import Curriculum, NoiseGrid
from consistency.experiment.methods.base import (
    ALL_DISTANCES,
    VP_PARAMETERIZATIONS,
    Method,
    _curriculum,
    _guidance_fields,
    _weighting,
    noise_grid,
    vp_schedule,
)


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
        k_w = keys.fold_in(key, 0x6C3)
        return keys.uniform(k_w, (batch,), minval=self.w_min, maxval=self.w_max)

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
