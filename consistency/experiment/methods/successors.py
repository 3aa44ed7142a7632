"""The successors' rows: ECT, continuous-time CD/CT and sCM's sCT/sCD."""

import dataclasses
from typing import ClassVar

from consistency.core import continuous_losses, losses, schedules
from consistency.core.schedules import NoiseGrid
from consistency.experiment.methods.base import (
    ALL_DISTANCES,
    Method,
    _weighting,
    noise_grid,
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
        return continuous_losses.continuous_consistency_loss(
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
        return continuous_losses.scm_loss(
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
