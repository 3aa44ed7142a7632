"""Config -> functions: the network, the preconditioned model functions, optimiser and loss."""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from consistency import distances, losses, ode, parameterization, schedules
from consistency.models.adm import ADMUNet, attention_ds
from consistency.models.ncsnpp import NCSNpp
from consistency.models.unet import UNet
from consistency.optim import learning_rate_schedule, make_optimizer

MODELS = ("unet", "ncsnpp", "adm")
LOSSES = ("edm", "cd", "ct")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Network:
    """A sigma-agnostic Flax network with its noise-conditioning convention."""

    module: nn.Module
    noise_cond: str  # 'adm' (250 ln sigma) or 'ncsnpp' (0.25 ln sigma)
    takes_labels: bool  # whether __call__ accepts class labels y

    def apply(self, params, x_in, c_noise, y, dropout_key):
        """F(x_in, c_noise[, y]); dropout is active exactly when a dropout key is given."""
        train = dropout_key is not None
        rngs = {"dropout": dropout_key} if train else {}
        if self.takes_labels:
            return self.module.apply({"params": params}, x_in, c_noise, y, train=train, rngs=rngs)
        return self.module.apply({"params": params}, x_in, c_noise, train=train, rngs=rngs)

    def init(self, key, x, y):
        c = jnp.zeros(x.shape[:1], jnp.float32)
        args = (x, c, y) if self.takes_labels else (x, c)
        return self.module.init({"params": key}, *args, train=False)["params"]


def _choice(value, allowed, key):
    if value not in allowed:
        raise ValueError(f"unknown {key}: {value!r}; choose one of {allowed}")
    return value


def build_network(config: ml_collections.ConfigDict) -> Network:
    """The configured network (unet, ncsnpp or adm), sized for the configured data."""
    m, d = config.model, config.data
    dtype = DTYPES[_choice(m.dtype, tuple(DTYPES), "model.dtype")]
    impl = None if m.attention_impl == "none" else m.attention_impl
    num_classes = d.num_classes if d.class_conditional else 0
    name = _choice(m.name, MODELS, "model.name")
    common = dict(dropout=m.dropout, dtype=dtype, attention_impl=impl)
    if name == "unet":
        module = UNet(out_channels=d.num_channels, num_classes=num_classes, **m.unet, **common)
        return Network(module, "adm", takes_labels=True)
    if name == "ncsnpp":
        if num_classes:
            raise ValueError("model.name='ncsnpp' has no class conditioning; set class_conditional")
        return Network(NCSNpp(**m.ncsnpp, **common), "ncsnpp", takes_labels=False)
    a = m.adm
    module = ADMUNet(
        model_channels=a.model_channels, out_channels=d.num_channels,
        num_res_blocks=a.num_res_blocks, channel_mult=tuple(a.channel_mult),
        attention_resolutions=attention_ds(d.image_size, tuple(a.attention_resolutions)),
        num_classes=num_classes or None, num_heads=a.num_heads,
        num_head_channels=a.num_head_channels, use_scale_shift_norm=a.use_scale_shift_norm,
        resblock_updown=a.resblock_updown, **common,
    )  # fmt: skip
    return Network(module, "adm", takes_labels=bool(num_classes))


def model_fn(network: Network, config, kind: str) -> Callable:
    """fn(params, x, sigma[B], y, dropout_key) -> c_skip x + c_out F: consistency fn or denoiser.

    kind 'consistency' uses the boundary-condition scalings, 'edm' the EDM teacher scalings.
    """
    m = config.model
    if kind == "consistency":
        scalings = functools.partial(
            parameterization.boundary_scalings, sigma_data=m.sigma_data, sigma_min=m.sigma_min
        )
    else:
        scalings = functools.partial(parameterization.edm_scalings, sigma_data=m.sigma_data)
    noise_cond = parameterization.get_noise_conditioning(network.noise_cond)

    def fn(params, x, sigma, y, dropout_key):
        net = lambda x_in, c: network.apply(params, x_in, c, y, dropout_key)  # noqa: E731
        return parameterization.precondition(
            net, x, sigma, scalings=scalings, noise_cond=noise_cond
        )

    return fn


def optimizer(config):
    """The configured optax optimiser."""
    o = config.optim
    return make_optimizer(
        o.optimizer, lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
        weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip,
    )  # fmt: skip


def learning_rate(config):
    """step -> learning rate of the configured optimiser."""
    return learning_rate_schedule(config.optim.lr, config.optim.warmup_steps)


def schedule_fn(config) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """step -> (mu(k), N(k)) of the configured curriculum."""
    t = config.training
    total = t.total_steps if t.total_steps > 0 else t.num_steps
    return functools.partial(
        schedules.ema_and_scales, target_ema_mode=t.target_ema_mode, scale_mode=t.scale_mode,
        start_ema=t.start_ema, start_scales=t.start_scales, end_scales=t.end_scales,
        total_steps=total, distill_steps_per_iter=t.distill_steps_per_iter,
    )  # fmt: skip


def distance_fn(config, lpips_distance=None):
    """The configured per-example distance; LPIPS must be built by the caller and passed in."""
    t, d = config.training, config.data
    if t.distance == "lpips":
        if lpips_distance is None:
            raise ValueError("training.distance='lpips' needs training.lpips_vgg and lpips_lin")
        return lpips_distance
    dim = d.image_size * d.image_size * d.num_channels
    return distances.get_distance(
        t.distance, data_dim=dim, huber_c=t.huber_c if t.huber_c >= 0 else None
    )


def loss_fn(config, network: Network, distance) -> Callable:
    """fn(params, target_params, teacher_params, batch, key, step) -> (per-example [B], metrics)."""
    t, m = config.training, config.model
    name = _choice(t.loss, LOSSES, "training.loss")
    edm = model_fn(network, config, "edm")
    cm = model_fn(network, config, "consistency")
    schedule = schedule_fn(config)
    weighting = parameterization.get_weighting(t.weighting, sigma_data=m.sigma_data)
    grid = dict(sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=m.rho)
    solver = ode.get_solver(t.solver)

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
        if name == "ct":
            return losses.consistency_training_loss(
                consistency, params, target_params, x0, key, **kw
            )
        teacher = lambda x, s: edm(teacher_params, x, s, y, None)  # noqa: E731
        return losses.consistency_distillation_loss(
            consistency, params, target_params, teacher, solver, x0, key, **kw
        )

    return fn
