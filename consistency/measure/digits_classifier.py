"""A small convolutional classifier of grey images; its penultimate features: the digits FID."""

from collections.abc import Sequence

import flax.linen as nn
import jax


class DigitsClassifier(nn.Module):
    """{"features": [B, features], "logits": [B, num_classes]} of NHWC images in [-1, 1].

    3x3 convs of width, 2 width, 4 width, ... with the given strides (digits 8x8: (1, 2);
    Fashion-MNIST 32x32: (1, 2, 2), one more halving) -> dense (features) -> dense (classes),
    ReLU after each hidden layer; "features" is the last hidden layer (after its ReLU, as
    Inception's pool3), the space in which the digits FID is measured.
    """

    width: int = 32
    features: int = 64
    num_classes: int = 10
    strides: Sequence[int] = (1, 2)

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        for i, stride in enumerate(self.strides):
            conv = nn.Conv(self.width * 2**i, (3, 3), strides=stride, name=f"conv{i}")
            x = nn.relu(conv(x))
        x = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.features, name="hidden")(x))
        return {"features": h, "logits": nn.Dense(self.num_classes, name="out")(h)}
