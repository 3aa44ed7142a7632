"""The learned adaptive loss weighting w_phi(c_noise) of EDM2 and sCM on Fourier features."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency.models.ncsnpp_layers import GaussianFourierProjection


class LogVariance(nn.Module):
    """w(c) = Linear([sin 2 pi W c, cos 2 pi W c]) with W ~ N(0, scale^2) fixed; zero at init.

    Like the networks it sees only the noise input c_noise; one scalar per example.
    """

    features: int = 128
    scale: float = 1.0

    @nn.compact
    def __call__(self, noise_cond: jax.Array) -> jax.Array:
        feats = GaussianFourierProjection(self.features // 2, self.scale)(noise_cond)
        out = nn.Dense(1, kernel_init=nn.initializers.zeros)(feats)
        return out[:, 0].astype(jnp.float32)
