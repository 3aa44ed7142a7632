"""The FID Inception-v3 (TF 2015-12-05 graph as pytorch-fid ports it): pool3, sFID, logits."""

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

INPUT_SIZE = 299
NUM_CLASSES = 1008  # the 2015 graph's classifier: 1000 ImageNet classes plus 8 unused
BN_EPS = 1e-3
# sFID features: the ADM evaluator reads `mixed_6/conv:0` and keeps channels [..., :7]. The TF
# graph numbers its blocks mixed (5b), mixed_1 (5c), mixed_2 (5d), mixed_3 (6a), mixed_4..mixed_7
# (6b..6e), so mixed_6 is Mixed_6d here, and `conv` is its 1x1 branch after BN and ReLU, which is
# also the first 192 channels of the block output. Flattened in (H, W, C) order as TF's NHWC
# reshape does, so means and covariances are comparable with ADM reference batches (mu_s, sigma_s).
SPATIAL_BLOCK = "Mixed_6d"
SPATIAL_CHANNELS = 7


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((self.padding[0], self.padding[0]), (self.padding[1], self.padding[1]))
        x = nn.Conv(self.features, self.kernel, self.strides, pad, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over the valid pixels only (torch count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    """Mixed_5b..5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | factorised 7x7 | doubled factorised 7x7 | avgpool-1x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    pool: "avg" (Mixed_7b, valid pixels only) or "max" (Mixed_7c; the TF graph's quirk that
    pytorch-fid keeps).
    """

    pool: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3a = BasicConv(384, **row, name="branch3x3_2a")(b3)
        b3b = BasicConv(384, **col, name="branch3x3_2b")(b3)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bda = BasicConv(384, **row, name="branch3x3dbl_3a")(bd)
        bdb = BasicConv(384, **col, name="branch3x3dbl_3b")(bd)
        if self.pool == "avg":
            pooled = avg_pool_3x3(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"unknown InceptionE pool: {self.pool!r}; choose one of 'avg', 'max'")
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


# The 299 px resize before the network, as each FID protocol does it: pytorch-fid's torch
# bilinear (half-pixel centres), the ADM evaluator's TF1 ResizeBilinear (legacy: source = y S/299,
# used for the ImageNet/LSUN tables) and clean-fid's legacy_tensorflow (the same legacy map by
# torch's affine_grid + grid_sample in float32, used by the CIFAR-10 code).
RESIZES = ("torch", "tf1", "clean_legacy")


def _torch_linspace(n: int) -> np.ndarray:
    """torch.linspace(-1, 1, n) in float32: start + i step, the second half from the end."""
    f = np.float32
    i, step = np.arange(n), f(2.0 / (n - 1))
    first = f(-1) + i.astype(f) * step
    second = f(1) - (n - 1 - i).astype(f) * step
    return np.where(i < n // 2, first, second).astype(f)


def resize_weights(size: int, protocol: str, out: int = INPUT_SIZE) -> np.ndarray:
    """The (out, size) bilinear interpolation matrix of a resize protocol (rows sum to 1).

    A separable resize is W @ image @ W^T per channel. Source coordinates: torch src =
    max((y + 0.5) size/out - 0.5, 0); tf1 src = y float32(size/out); clean_legacy the same
    legacy map through clean-fid's affine grid (theta_02 = 1/size - 1/out, align_corners=False,
    border padding), computed in float32 as torch does. Neighbours floor(src) and the next one,
    clamped at the edge.
    """
    f, y = np.float32, np.arange(out)
    if protocol == "torch":
        src = np.maximum((y + 0.5) * size / out - 0.5, 0.0)
    elif protocol == "tf1":
        src = y.astype(f) * f(size / out)
    elif protocol == "clean_legacy":
        base = (_torch_linspace(out) * f(out - 1) / f(out)).astype(f)
        x = (base + f(1 / size - 1 / out)).astype(f)
        src = np.clip(((x + f(1)) * f(size) - f(1)) / f(2), 0, size - 1)
    else:
        raise ValueError(f"unknown Inception resize protocol {protocol!r}; choose one of {RESIZES}")
    src = np.asarray(src, np.float64)
    i0 = np.floor(src).astype(int)
    i1, frac = np.minimum(i0 + 1, size - 1), src - i0
    weights = np.zeros((out, size))
    np.add.at(weights, (y, i0), 1.0 - frac)
    np.add.at(weights, (y, i1), frac)
    return weights.astype(np.float32)


def resize_for_inception(x: jax.Array, protocol: str = "torch") -> jax.Array:
    """Bilinear resize of NHWC images to 299x299 by a FID protocol (RESIZES), no antialias.

    'torch' is `F.interpolate(size=299, mode='bilinear', align_corners=False)` as pytorch-fid
    calls it (jax.image.resize, half-pixel centres); 'tf1' and 'clean_legacy' apply
    resize_weights' matrices.
    """
    batch, height, width, channels = x.shape
    if (height, width) == (INPUT_SIZE, INPUT_SIZE):
        return x
    if protocol == "torch":
        shape = (batch, INPUT_SIZE, INPUT_SIZE, channels)
        return jax.image.resize(x, shape, method="bilinear", antialias=False)
    rows = jnp.asarray(resize_weights(height, protocol))
    cols = jnp.asarray(resize_weights(width, protocol))
    return jnp.einsum("yh,bhwc,xw->byxc", rows, x, cols, precision="highest")


def preprocess_for_inception(
    images: jax.Array, *, resize: bool = True, protocol: str = "torch"
) -> jax.Array:
    """x -> 2x - 1 after the 299 px resize, for images in [0, 1] (uint8 images are divided by
    255 first, so ADM's uint8 batches and float samples meet the network the same way)."""
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    if resize:
        x = resize_for_inception(x, protocol)
    return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
    """Features of NHWC RGB images (float in [0, 1], or uint8 in [0, 255]) for FID, sFID and IS.

    Returns {"pool3": [B, 2048], "spatial": [B, 17*17*7] (sFID, see SPATIAL_BLOCK),
    "logits": [B, 1008] (fc with bias, as torchvision), "logits_nobias": pool3 @ W (what the ADM
    evaluator's Inception Score uses)}. Sows block0..block2 (after each stem max pool and after
    Mixed_6e) into "intermediates" for bisecting.
    """

    resize_input: bool = True
    resize_protocol: str = "torch"  # one of RESIZES

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = preprocess_for_inception(
            images, resize=self.resize_input, protocol=self.resize_protocol
        )
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3_stride2(x)
        self.sow("intermediates", "block0", x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = max_pool_3x3_stride2(x)
        self.sow("intermediates", "block1", x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name=SPATIAL_BLOCK)(x)
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = InceptionC(192, name="Mixed_6e")(x)
        self.sow("intermediates", "block2", x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, name="fc")
        logits = fc(pool3)
        return {
            "pool3": pool3,
            "spatial": spatial,
            "logits": logits,
            "logits_nobias": pool3 @ fc.variables["params"]["kernel"],
        }


def make_inception_fn(
    variables: Mapping, *, resize_input: bool = True, resize_protocol: str = "torch"
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted images -> {"pool3", "spatial", "logits", "logits_nobias"} with variables bound.

    The variables are a jit argument, not a closed-over constant, so the program stays small.
    """
    if resize_protocol not in RESIZES:
        raise ValueError(f"unknown resize protocol {resize_protocol!r}; choose one of {RESIZES}")
    model = FIDInceptionV3(resize_input=resize_input, resize_protocol=resize_protocol)
    apply = jax.jit(model.apply)
    frozen = jax.tree.map(jnp.asarray, dict(variables))
    return lambda images: apply(frozen, images)


def _expected_shapes() -> dict:
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}


def _torch_leaf(parts: list[str], value: np.ndarray) -> tuple[str, str, np.ndarray]:
    """(collection, flax leaf name, array) for one torch tensor of the FID Inception."""
    owner, leaf = parts[-2], parts[-1]
    if owner == "conv" and leaf == "weight":
        return "params", "kernel", value.transpose(2, 3, 1, 0)
    if owner == "bn":
        table = {"weight": ("params", "scale"), "bias": ("params", "bias")}
        table |= {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
        if leaf in table:
            return *table[leaf], value
    if owner == "fc":
        if leaf == "weight":
            return "params", "kernel", value.T
        if leaf == "bias":
            return "params", "bias", value
    raise ValueError(f"unexpected tensor {'.'.join(parts)!r} in an FID Inception state dict")


def inception_variables_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """pytorch-fid state dict (`Conv2d_1a_3x3.conv.weight`, `....bn.running_var`, `fc.weight`, ...)
    -> {"params", "batch_stats"} of FIDInceptionV3; strict, like torch's load_state_dict."""
    variables = {"params": {}, "batch_stats": {}}
    for name, value in state_dict.items():
        parts = name.split(".")
        if parts[-1] == "num_batches_tracked":  # a training counter, unused in eval
            continue
        collection, leaf, array = _torch_leaf(parts, np.asarray(value, np.float32))
        node = variables[collection]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[leaf] = array
    expected = {k: v.shape for k, v in flatten_dict(_expected_shapes(), sep="/").items()}
    got = {k: v.shape for k, v in flatten_dict(variables, sep="/").items()}
    if got != expected:
        wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        details = [f"{k}: expected {expected.get(k)}, got {got.get(k)}" for k in wrong[:10]]
        raise ValueError("state dict does not match FIDInceptionV3: " + "; ".join(details))
    return variables


def load_inception_variables(path: str) -> dict:
    """FIDInceptionV3 variables from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`."""
    from consistency.io.torch_pt import load_torch_state_dict

    return inception_variables_from_torch(load_torch_state_dict(path))
