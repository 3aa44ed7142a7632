"""LPIPS v0.1 (VGG16) perceptual distance in Flax, with weight loading from the PyTorch files."""

import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from consistency.io import torch_pt
from consistency.measure.vgg import VGG16_TAP_CHANNELS, VGG16Features, vgg16_params_from_torch

# The LPIPS ScalingLayer for inputs in [-1, 1]; equal to ImageNet mean/std applied to (x + 1) / 2.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# The paper's code (cm, jcm) upsamples images smaller than this to RESIZE_TO before LPIPS.
RESIZE_BELOW = 256
RESIZE_TO = 224


def resize_for_lpips(x: jax.Array, size: int = RESIZE_TO) -> jax.Array:
    """Bilinear resize of NHWC images to size x size (224) when they are smaller than 256 px.

    No antialias, half-pixel centres: torch `F.interpolate(mode='bilinear', align_corners=False)`
    as cm calls it, and `jax.image.resize(..., 'bilinear')` as jcm calls it (equal when upsampling).
    """
    batch, height, width, channels = x.shape
    if min(height, width) >= RESIZE_BELOW:
        return x
    shape = (batch, size, size, channels)
    return jax.image.resize(x, shape, method="bilinear", antialias=False)


def normalize_channels(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    """f / (sqrt(sum_c f^2) + eps) per pixel; eps is added to the norm, not under the root."""
    sum_sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    # sqrt has an infinite derivative at 0 (an all-zero ReLU pixel): keep the gradient finite.
    positive = sum_sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
    return f / (norm + eps)


class LPIPS(nn.Module):
    """Per-layer LPIPS terms [B, 5] of NHWC images in [-1, 1]; their sum over layers is LPIPS.

    term_l = mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 ), with f_l the VGG16 relu{1_2..5_3} maps,
    n the channel-unit normalisation and w_l >= 0 the linear heads (1x1 conv, no bias).
    pool: "max" (LPIPS package, jcm) or "avg" (piq replace_pooling=True, as PyTorch cm uses).
    resize: upsample images below 256 px to 224 first, as the paper's code does.
    dtype: compute dtype of the VGG convolutions (e.g. bfloat16); the rest runs in float32.
    """

    pool: str = "max"
    resize: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"LPIPS needs two NHWC batches of one shape, got {x.shape}, {y.shape}")
        batch = x.shape[0]
        both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
        if self.resize:
            both = resize_for_lpips(both)
        both = (both - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
        taps = VGG16Features(pool=self.pool, dtype=self.dtype, name="vgg")(both.astype(self.dtype))
        terms = []
        for k, f in enumerate(taps):
            f = normalize_channels(f.astype(jnp.float32))
            diff = jnp.square(f[:batch] - f[batch:])
            head = nn.Dense(1, use_bias=False, name=f"lin{k}")(diff)
            terms.append(jnp.mean(head, axis=(1, 2, 3)))
        out = jnp.stack(terms, axis=1)
        assert out.shape == (batch, len(VGG16_TAP_CHANNELS))
        return out


def lpips_distance(
    params: Mapping,
    x: jax.Array,
    y: jax.Array,
    *,
    pool: str = "max",
    resize: bool = True,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """d(x, y) = sum_l LPIPS term_l, per example [B], for NHWC images in [-1, 1].

    The params are frozen (stop_gradient): gradients flow to x and y only.
    """
    model = LPIPS(pool=pool, resize=resize, dtype=dtype)
    variables = {"params": jax.lax.stop_gradient(params)}
    out = jnp.sum(model.apply(variables, x, y), axis=1)
    assert out.shape == (x.shape[0],)
    return out


def make_lpips_distance(
    params: Mapping, *, pool: str = "max", resize: bool = True, dtype: jnp.dtype = jnp.float32
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """fn(x, y) -> [B] LPIPS distances with the params bound: the signature of the core distances.

    The callable is a pytree (`jax.tree_util.Partial`) whose leaves are the params. Passed as an
    argument of a jitted function, the params enter as device buffers; closed over inside one,
    they are embedded in the program as constants (correct, but the compile is slower).
    """
    bound = functools.partial(lpips_distance, pool=pool, resize=resize, dtype=dtype)
    return jax.tree_util.Partial(bound, jax.tree.map(jnp.asarray, dict(params)))


def lpips_params_from_torch(
    vgg_state: Mapping[str, np.ndarray], lin_state: Mapping[str, np.ndarray]
) -> dict:
    """torchvision VGG16 state dict + LPIPS v0.1 head state dict (`lin{k}.model.1.weight`,
    shape (1, C, 1, 1)) -> LPIPS params."""
    params = {"vgg": vgg16_params_from_torch(vgg_state)}
    for k, channels in enumerate(VGG16_TAP_CHANNELS):
        weight = np.asarray(lin_state[f"lin{k}.model.1.weight"], np.float32)
        if weight.shape != (1, channels, 1, 1):
            raise ValueError(
                f"lin{k}.model.1.weight has shape {weight.shape}, not (1,{channels},1,1)"
            )
        params[f"lin{k}"] = {"kernel": weight.reshape(1, channels).T}
    return params


def load_lpips_params(vgg_path: str, lin_path: str) -> dict:
    """LPIPS params from the files users download: torchvision `vgg16-397923af.pth` (ImageNet
    VGG16) and the LPIPS package's `weights/v0.1/vgg.pth` heads."""

    read = torch_pt.load_torch_state_dict  # the torch-free reader
    return lpips_params_from_torch(read(vgg_path), read(lin_path))
