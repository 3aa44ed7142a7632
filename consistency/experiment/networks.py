"""Config -> functions: the network, the preconditioned model functions, optimiser and loss."""

import dataclasses
import functools
import pathlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from consistency.core import distances, keys, parameterization
from consistency.experiment import methods
from consistency.measure import lpips
from consistency.models.adm import ADMUNet, attention_ds
from consistency.models.autoencoder_kl import AutoencoderKL
from consistency.models.logvar import LogVariance
from consistency.models.ncsnpp import NCSNpp
from consistency.models.unet import UNet

MODELS = ("unet", "ncsnpp", "adm", "autoencoder_kl")  # autoencoder_kl: training.loss='vae'


PARAMETERIZATIONS = ("edm", "trigflow") + methods.VP_PARAMETERIZATIONS


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
    guided: bool = False  # takes LCM's guidance scale w [B] (model.guidance_embed_dim > 0)

    @property
    def draws_dropout(self) -> bool:
        """Whether training draws dropout masks (model.dropout > 0; `train` switches only them)."""
        return getattr(self.module, "dropout", 0.0) > 0

    def apply(self, params, x_in, c_noise, y, dropout_key, guidance=None):
        """F(x_in, c_noise[, y][, w]); dropout is active exactly when a dropout key is given.

        guidance: w [B], given exactly when the network is guided. dropout_key may be one key
        per example [B] (keys.is_batch): each example's mask is the one it would draw alone, so
        with dropout the network runs per example (vmap); without, once on the batch."""
        params = params["net"] if self.logvar is not None else params
        train = dropout_key is not None

        def run(params, x_in, c_noise, y, rngs, guidance):
            args = (x_in, c_noise, y) if self.takes_labels else (x_in, c_noise)
            kw = {"guidance": guidance} if self.guided else {}
            return self.module.apply({"params": params}, *args, train=train, rngs=rngs, **kw)

        if self.guided and guidance is None:
            raise ValueError("this network is guided (model.guidance_embed_dim > 0): pass w")
        if self.remat != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICIES[self.remat])
        if not train or (keys.is_batch(dropout_key) and not self.draws_dropout):
            # No mask to draw (eval, or rate 0: Dropout returns before asking for an rng).
            return run(params, x_in, c_noise, y, {}, guidance)
        per = lambda k, x, c, y, w: run(params, x, c, y, {"dropout": k}, w)
        return keys.per_example(per, dropout_key, x_in, c_noise, y, guidance)

    def unguided(self) -> "Network":
        """The same network without the guidance input: the guided student's teacher."""
        if not self.guided:
            return self
        return dataclasses.replace(
            self, module=self.module.clone(guidance_embed_dim=0), guided=False
        )

    def init(self, key, x, y):
        if isinstance(self.module, AutoencoderKL):
            return self.module.init({"params": key}, x)["params"]
        c = jnp.zeros(x.shape[:1], jnp.float32)
        args = (x, c, y) if self.takes_labels else (x, c)
        kw = {"guidance": c} if self.guided else {}
        net = self.module.init({"params": key}, *args, train=False, **kw)["params"]
        if self.logvar is None:
            return net
        logvar = self.logvar.init({"params": jax.random.fold_in(key, 1)}, c)["params"]
        return {"net": net, "logvar": logvar}

    def autoencode(self, params, x, key):
        """(D(z), KL(q(z|x) || N(0, I)) [B]) of an autoencoder; z = mean + std eps, eps from key
        (or eps_i from key i of keys [B]: one encoder and decoder pass on the batch)."""

        def run(module, x):
            posterior = module.encode(x)
            noise = keys.normal(key, posterior.mean.shape, posterior.mean.dtype)
            return module.decode(posterior.sample(noise)), posterior.kl()

        return self.module.apply({"params": params}, x, method=run)

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
    # model.null_label: one more embedding row, the null class d.num_classes (CFG).
    num_classes = d.num_classes + bool(m.null_label) if d.class_conditional else 0
    name = _choice(m.name, MODELS, "model.name")
    if name == "autoencoder_kl":
        a = m.autoencoder_kl
        module = AutoencoderKL(
            in_channels=d.num_channels,
            out_channels=d.num_channels,
            block_out_channels=tuple(a.block_out_channels),
            layers_per_block=a.layers_per_block,
            latent_channels=a.latent_channels,
            norm_num_groups=a.norm_num_groups,
            mid_block_add_attention=a.mid_block_add_attention,
            dtype=dtype,
            attention_impl=impl,
        )
        return Network(module, "none", takes_labels=False)
    common = dict(dropout=m.dropout, dtype=dtype, attention_impl=impl)
    w_dim = m.guidance_embed_dim  # > 0: LCM's guidance-scale input (a guided CD student)
    if name == "unet":
        module = UNet(
            out_channels=d.num_channels,
            num_classes=num_classes,
            guidance_embed_dim=w_dim,
            **m.unet,
            **common,
        )
        return Network(module, "adm", takes_labels=True, guided=w_dim > 0)
    if name == "ncsnpp":
        if num_classes:
            raise ValueError("model.name='ncsnpp' has no class conditioning; set class_conditional")
        if w_dim:
            raise ValueError("model.name='ncsnpp' takes no guidance: model.guidance_embed_dim=0")
        return Network(NCSNpp(**m.ncsnpp, **common), "ncsnpp", takes_labels=False)
    a = m.adm
    module = ADMUNet(
        model_channels=a.model_channels,
        out_channels=d.num_channels,
        num_res_blocks=a.num_res_blocks,
        channel_mult=tuple(a.channel_mult),
        attention_resolutions=attention_ds(d.image_size, tuple(a.attention_resolutions)),
        num_classes=num_classes or None,
        num_heads=a.num_heads,
        num_head_channels=a.num_head_channels,
        use_scale_shift_norm=a.use_scale_shift_norm,
        resblock_updown=a.resblock_updown,
        guidance_embed_dim=w_dim,
        **common,
        dropout_min_ds=d.image_size // a.dropout_resolution if a.dropout_resolution > 0 else 1,
    )
    return Network(module, "adm", takes_labels=bool(num_classes), guided=w_dim > 0)


def model_fn(network: Network, config, kind: str) -> Callable:
    """fn(params, x, sigma[B], y, dropout_key, guidance=None) -> c_skip x + c_out F: consistency
    fn or denoiser; guidance is w [B] of a guided network.

    kind 'consistency' uses the boundary-condition scalings, 'edm' the EDM teacher scalings. A VP
    network (vp_eps / vp_v) sees c_in x = x_vp and its timestep c_noise = t(sigma); its denoiser
    is D = x - sigma eps (or the v form), its consistency function EDM's boundary scalings on
    that D with the boundary at sigma(t = 0) (parameterization.vp_boundary_scalings).
    """
    m = config.model
    chosen = _choice(m.parameterization, PARAMETERIZATIONS, "model.parameterization")
    if chosen in methods.VP_PARAMETERIZATIONS:
        scalings, noise_cond = _vp_scalings(config, kind)
    elif chosen == "trigflow":
        # sCM: one form for denoiser and consistency function, c_noise = t = arctan(sigma/sd).
        scalings = functools.partial(parameterization.trigflow_scalings, sigma_data=m.sigma_data)
        noise_cond = functools.partial(parameterization.trigflow_time, sigma_data=m.sigma_data)
    else:
        noise_cond = parameterization.get_noise_conditioning(network.noise_cond)
        if kind == "consistency":
            scalings = functools.partial(
                parameterization.boundary_scalings, sigma_data=m.sigma_data, sigma_min=m.sigma_min
            )
        else:
            scalings = functools.partial(parameterization.edm_scalings, sigma_data=m.sigma_data)

    def fn(params, x, sigma, y, dropout_key, guidance=None):
        net = lambda x_in, c: network.apply(params, x_in, c, y, dropout_key, guidance)
        return parameterization.precondition(
            net, x, sigma, scalings=scalings, noise_cond=noise_cond
        )

    return fn


def _vp_scalings(config, kind: str):
    """(scalings, c_noise) of a VP network: the denoiser's or the consistency function's."""
    discrete, grid = methods.vp_schedule(config), methods.noise_grid(config)
    noise_cond = functools.partial(parameterization.vp_timestep, sigmas=discrete.sigmas())
    if kind == "consistency":
        scalings = functools.partial(
            parameterization.vp_boundary_scalings,
            prediction=discrete.prediction,
            sigma_data=config.model.sigma_data,
            sigma_min=grid.sigma_min,
        )
    else:
        scalings = functools.partial(parameterization.vp_scalings, prediction=discrete.prediction)
    return scalings, noise_cond


def model_fns(network: Network, config) -> methods.ModelFns:
    """The network as the functions the method table's losses call (a guided student's teacher
    is the same network without the guidance input)."""
    if isinstance(network.module, AutoencoderKL):  # training.loss='vae': no noise levels
        return methods.ModelFns(None, None, None, autoencode=network.autoencode)
    return methods.ModelFns(
        consistency=model_fn(network, config, "consistency"),
        denoiser=model_fn(network, config, "edm"),
        raw=trigflow_net_fn(network),
        log_weight=network.log_weight if network.logvar is not None else None,
        teacher=model_fn(network.unguided(), config, "edm") if network.guided else None,
    )


def student_from_teacher(network: Network, init_params, teacher_params):
    """A student's initial params copied from its teacher: the teacher's tree, plus the fresh
    (zero) guidance projection of a guided student, which so starts as the teacher at every w."""
    if not network.guided:
        return teacher_params
    return {**init_params, **teacher_params}


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
    name = methods.distance_name(methods.row(t.loss), t.distance)
    huber_c = t.huber_c if t.huber_c >= 0 else None
    return jax.tree_util.Partial(distances.get_distance(name, data_dim=dim, huber_c=huber_c))


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


def trigflow_net_fn(network: Network) -> Callable:
    """fn(params, x_in, t, y, dropout_key) -> F_theta(x_in, t): the raw TrigFlow network (sCM)."""
    return lambda params, x_in, t, y, key: network.apply(params, x_in, t, y, key)
