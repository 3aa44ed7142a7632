"""VGG16 convolutional features (torchvision `features[0:30]`) with the five LPIPS taps."""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision vgg16().features: (index of the conv in the Sequential, output channels). A 2x2
# pool follows indices 2, 7, 14 and 21 (Sequential indices 4, 9, 16, 23); the taps are the ReLUs
# after indices 2, 7, 14, 21 and 28 (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_CONVS = (
    (0, 64),
    (2, 64),
    (5, 128),
    (7, 128),
    (10, 256),
    (12, 256),
    (14, 256),
    (17, 512),
    (19, 512),
    (21, 512),
    (24, 512),
    (26, 512),
    (28, 512),
)
VGG16_TAPS = (2, 7, 14, 21, 28)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """relu1_2 .. relu5_3 of VGG16 on NHWC input already normalised for the network.

    pool: "max" (torchvision, the LPIPS package and jcm) or "avg" (piq with replace_pooling=True,
    which the PyTorch cm code uses). dtype: compute dtype of the convolutions; params stay float32.
    """

    pool: str = "max"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if self.pool == "max":
            pool_fn = nn.max_pool
        elif self.pool == "avg":
            pool_fn = nn.avg_pool
        else:
            raise ValueError(f"unknown VGG pooling: {self.pool!r}; choose one of 'max', 'avg'")
        taps = []
        for index, channels in VGG16_CONVS:
            if index in (5, 10, 17, 24):
                x = pool_fn(x, (2, 2), strides=(2, 2))
            conv = nn.Conv(
                channels,
                (3, 3),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                name=f"features_{index}",
            )
            x = nn.relu(conv(x))
            if index in VGG16_TAPS:
                taps.append(x)
        return taps


def vgg16_params_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """torchvision VGG16 state dict (`features.{i}.weight` OIHW, `.bias`) -> VGG16Features params.

    Keys outside `features.*` (the classifier of a full torchvision checkpoint) are ignored; a
    missing conv or a shape that does not match VGG16 raises.
    """
    params = {}
    in_channels = 3
    for index, channels in VGG16_CONVS:
        weight = np.asarray(state_dict[f"features.{index}.weight"], np.float32)
        bias = np.asarray(state_dict[f"features.{index}.bias"], np.float32)
        if weight.shape != (channels, in_channels, 3, 3) or bias.shape != (channels,):
            raise ValueError(
                f"features.{index}: shapes {weight.shape}, {bias.shape} do not match VGG16's "
                f"({channels}, {in_channels}, 3, 3), ({channels},)"
            )
        params[f"features_{index}"] = {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}
        in_channels = channels
    return params
