"""The diffusion rows: EDM and DDPM teachers, and the latent models' KL autoencoder."""

import dataclasses
from typing import ClassVar

from consistency.core import distances, losses, vp
from consistency.experiment.methods.base import (
    VP_PARAMETERIZATIONS,
    Method,
    _dropped_labels,
    _label_dropout_fields,
    vp_schedule,
)


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
