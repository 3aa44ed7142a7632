"""A small convolutional classifier of 8x8 grey digits; its penultimate features: the digits FID."""

import flax.linen as nn
import jax


class DigitsClassifier(nn.Module):
    """{"features": [B, features], "logits": [B, num_classes]} of NHWC images in [-1, 1].

    3x3 conv (width) -> 3x3 stride-2 conv (2 width) -> dense (features) -> dense (classes), ReLU
    after each hidden layer; "features" is the last hidden layer (after its ReLU, as Inception's
    pool3), the space in which the digits FID is measured.
    """

    width: int = 32
    features: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = nn.relu(nn.Conv(self.width, (3, 3), name="conv0")(x))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2, name="conv1")(x))
        x = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.features, name="hidden")(x))
        return {"features": h, "logits": nn.Dense(self.num_classes, name="out")(h)}
