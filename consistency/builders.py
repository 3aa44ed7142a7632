"""Config -> functions: the network, the preconditioned model functions, optimiser and loss."""

import dataclasses
import functools
import pathlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from consistency import distances, losses, ode, parameterization, schedules
from consistency.models import lpips
from consistency.models.adm import ADMUNet, attention_ds
from consistency.models.logvar import LogVariance
from consistency.models.ncsnpp import NCSNpp
from consistency.models.unet import UNet
from consistency.optim import learning_rate_schedule, make_optimizer

MODELS = ("unet", "ncsnpp", "adm")
LOSSES = ("edm", "cd", "ct", "ect", "cd_continuous", "ct_continuous", "sct", "scd")
ECT_SCALINGS = ("edm", "boundary")  # the scalings ECT trains with (it samples with boundary)
# Losses whose target network is stop_gradient(params) by definition: no target copy is kept.
ONLINE_TARGET_LOSSES = ("ect", "cd_continuous", "ct_continuous", "sct", "scd")
PARAMETERIZATIONS = ("edm", "trigflow")
INDEX_SAMPLINGS = ("uniform", "lognormal")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LPIPS_POOLS = ("max", "avg")  # VGG16 pooling: LPIPS package and jcm | piq, as PyTorch cm
# model.remat -> what the backward pass keeps of the network's forward pass (the rest is
# recomputed): everything | only conv/matmul outputs (norms, activations recomputed) | nothing.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class Network:
    """A sigma-agnostic Flax network with its noise-conditioning convention."""

    module: nn.Module
    noise_cond: str  # 'adm' (250 ln sigma) or 'ncsnpp' (0.25 ln sigma)
    takes_labels: bool  # whether __call__ accepts class labels y
    # sCM's learned weighting w(c_noise); with it, params are {'net': ..., 'logvar': ...}.
    logvar: nn.Module | None = None
    remat: str = "none"  # a key of REMAT_POLICIES: rematerialisation of the whole network

    def apply(self, params, x_in, c_noise, y, dropout_key):
        """F(x_in, c_noise[, y]); dropout is active exactly when a dropout key is given."""
        params = params["net"] if self.logvar is not None else params
        train = dropout_key is not None
        rngs = {"dropout": dropout_key} if train else {}

        def run(params, x_in, c_noise, y, rngs):
            if self.takes_labels:
                return self.module.apply(
                    {"params": params}, x_in, c_noise, y, train=train, rngs=rngs
                )
            return self.module.apply({"params": params}, x_in, c_noise, train=train, rngs=rngs)

        if self.remat != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICIES[self.remat])
        return run(params, x_in, c_noise, y, rngs)

    def init(self, key, x, y):
        c = jnp.zeros(x.shape[:1], jnp.float32)
        args = (x, c, y) if self.takes_labels else (x, c)
        net = self.module.init({"params": key}, *args, train=False)["params"]
        if self.logvar is None:
            return net
        logvar = self.logvar.init({"params": jax.random.fold_in(key, 1)}, c)["params"]
        return {"net": net, "logvar": logvar}

    def log_weight(self, params, c_noise):
        """The adaptive weighting w(c_noise) [B] (sCM); needs the logvar module."""
        return self.logvar.apply({"params": params["logvar"]}, c_noise)


def _choice(value, allowed, key):
    if value not in allowed:
        raise ValueError(f"unknown {key}: {value!r}; choose one of {allowed}")
    return value


def build_network(config: ml_collections.ConfigDict) -> Network:
    """The configured network, with sCM's learned weighting when model.logvar_features > 0."""
    remat = _choice(config.model.remat, tuple(REMAT_POLICIES), "model.remat")
    network = dataclasses.replace(_network(config), remat=remat)
    if config.model.logvar_features > 0:
        return dataclasses.replace(network, logvar=LogVariance(config.model.logvar_features))
    return network


def _network(config: ml_collections.ConfigDict) -> Network:
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
        dropout_min_ds=d.image_size // a.dropout_resolution if a.dropout_resolution > 0 else 1,
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
    if _choice(m.parameterization, PARAMETERIZATIONS, "model.parameterization") == "trigflow":
        # sCM: one form for denoiser and consistency function, c_noise = t = arctan(sigma/sd).
        scalings = functools.partial(parameterization.trigflow_scalings, sigma_data=m.sigma_data)
        noise_cond = functools.partial(parameterization.trigflow_time, sigma_data=m.sigma_data)

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


def distance_fn(config, lpips_params=None) -> jax.tree_util.Partial:
    """The configured per-example distance fn(x, y) -> [B], as a pytree (jax.tree_util.Partial).

    Give it to jitted code as an argument: LPIPS's frozen VGG16 and head params are its leaves,
    so they enter as device buffers (closed over, they would be baked into the program as
    ~117 MB of constants). lpips_params replaces reading training.lpips_vgg / lpips_lin.
    """
    t, d = config.training, config.data
    if t.distance == "lpips":
        params = lpips_params_from_config(config) if lpips_params is None else lpips_params
        pool = _choice(t.lpips_pool, LPIPS_POOLS, "training.lpips_pool")
        fn = functools.partial(_lpips_any_channels, pool=pool, resize_to=t.lpips_resize)
        return jax.tree_util.Partial(fn, jax.tree.map(jnp.asarray, params))
    dim = d.image_size * d.image_size * d.num_channels
    return jax.tree_util.Partial(
        distances.get_distance(
            t.distance, data_dim=dim, huber_c=t.huber_c if t.huber_c >= 0 else None
        )
    )


def lpips_params_from_config(config) -> dict:
    """LPIPS params read from training.lpips_vgg and training.lpips_lin (torch-free .pth reader)."""
    t = config.training
    missing = [f"training.{k}" for k in ("lpips_vgg", "lpips_lin") if not t[k]]
    if missing:
        raise ValueError(
            f"training.distance='lpips' needs {' and '.join(missing)}: the torchvision VGG16 "
            "state dict (vgg16-397923af.pth) and the LPIPS v0.1 heads (lpips weights/v0.1/vgg.pth)"
        )
    for key in ("lpips_vgg", "lpips_lin"):
        if not pathlib.Path(t[key]).is_file():
            raise FileNotFoundError(f"training.{key}: no such file {t[key]!r}")
    return lpips.load_lpips_params(t.lpips_vgg, t.lpips_lin)


def _lpips_any_channels(params, x, y, *, pool: str, resize_to: int) -> jax.Array:
    """LPIPS [B] of NHWC images in [-1, 1]; grey images are repeated to RGB (VGG16 takes three
    channels), and images below 256 px upsampled to resize_to first (224 as the paper's code)."""
    if x.shape[-1] == 1:
        x, y = jnp.repeat(x, 3, axis=-1), jnp.repeat(y, 3, axis=-1)
    if resize_to > 0:
        x, y = lpips.resize_for_lpips(x, resize_to), lpips.resize_for_lpips(y, resize_to)
    return lpips.lpips_distance(params, x, y, pool=pool, resize=False)


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


def trigflow_net_fn(network: Network) -> Callable:
    """fn(params, x_in, t, y, dropout_key) -> F_theta(x_in, t): the raw TrigFlow network (sCM)."""
    return lambda params, x_in, t, y, key: network.apply(params, x_in, t, y, key)


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
