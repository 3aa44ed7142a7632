"""Gaussian mixtures as exact yardsticks: analytic denoiser, exact PF-ODE map, SW2 and MMD.

p(x0) = sum_k w_k N(m_k, s_k^2 I), so the ideal denoiser D*(x, sigma) = E[x0 | x0 + sigma z = x]
is a posterior-weighted sum of component means and the PF-ODE map f*(x, sigma) is integrated in
float64 (scipy DOP853). `make_reference` and `make_scorer` score a consistency function against
them. Used by benchmarks/quality_toy.py and its tests.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp

from consistency.core import ode, samplers, schedules

SIGMA_MIN, SIGMA_MAX, RHO = schedules.SIGMA_MIN, schedules.SIGMA_MAX, schedules.RHO
ODE_RTOL = 1e-9
SEED = 0
SAMPLE_GRID = 40  # sampling indices live on the 40-point Karras grid (the paper's CIFAR-10 ts)
SAMPLE_TS = {1: (0, 39), 2: (0, 22, 39), 4: (0, 12, 22, 30, 39)}
ODE_CHECK_RTOL = 1e-7
# The 18-point Karras grid less sigma_min, where f(x, sigma_min) = x holds by construction.
EVAL_SIGMAS = schedules.karras_sigmas_float64(
    np.arange(17), 18, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO
)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """p(x0) = sum_k w_k N(m_k, s_k^2 I)."""

    weights: np.ndarray  # [K]
    means: np.ndarray  # [K, d]
    stds: np.ndarray  # [K]


def make_mixture(dim: int) -> Mixture:
    """2-D: 8 unequal modes on a circle of radius 0.7; d > 2: 12 random modes; std ~0.5 a coord."""
    if dim == 2:
        angle = 2 * np.pi * np.arange(8) / 8
        means = 0.7 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        return Mixture(np.linspace(1.0, 2.0, 8) / 12.0, means, 0.05 + 0.05 * (np.arange(8) % 2))
    rng = np.random.default_rng(dim)
    return Mixture(
        rng.dirichlet(np.full(12, 5.0)), rng.normal(0, 0.45, (12, dim)), rng.uniform(0.05, 0.15, 12)
    )


def sample_mixture(mix: Mixture, key: jax.Array, n: int) -> jax.Array:
    """x0 ~ p: a component k ~ w, then m_k + s_k z (float32)."""
    k_comp, k_z = jax.random.split(key)
    comp = jax.random.categorical(
        k_comp, jnp.log(jnp.asarray(mix.weights, jnp.float32)), shape=(n,)
    )
    z = jax.random.normal(k_z, (n, mix.means.shape[1]), jnp.float32)
    means, stds = jnp.asarray(mix.means, jnp.float32), jnp.asarray(mix.stds, jnp.float32)
    return means[comp] + stds[comp][:, None] * z


def denoiser(mix: Mixture, x, sigma, xp=jnp):
    """D*(x, s) = sum_k r_k(x) (m_k + a_k (x - m_k)), a_k = s_k^2/v_k, r_k ~ w_k N(x; m_k, v_k I).

    v_k = s_k^2 + s^2. `xp` is numpy (float64, for f*) or jax.numpy (float32, the CD teacher);
    sigma is [B] or a scalar. |x - m_k|^2 is expanded into matmuls: no [B, K, d] intermediate.
    """
    sigma = xp.broadcast_to(xp.asarray(sigma, x.dtype), x.shape[:1])
    means, stds = xp.asarray(mix.means, x.dtype), xp.asarray(mix.stds, x.dtype)
    var = stds[None] ** 2 + sigma[:, None] ** 2  # [B, K]
    sq = xp.sum(x**2, axis=1, keepdims=True) - 2 * x @ means.T + xp.sum(means**2, axis=1)[None]
    logp = xp.log(xp.asarray(mix.weights, x.dtype))[None] - 0.5 * (
        sq / var + x.shape[1] * xp.log(var)
    )
    resp = xp.exp(logp - xp.max(logp, axis=1, keepdims=True))
    resp = resp / xp.sum(resp, axis=1, keepdims=True)
    shrink = stds[None] ** 2 / var
    return xp.sum(resp * shrink, axis=1, keepdims=True) * x + (resp * (1 - shrink)) @ means


def exact_flow(mix: Mixture, x, sigma, *, rtol: float = ODE_RTOL) -> np.ndarray:
    """f*(x, s): dx/ds = (x - D*(x, s))/s from s down to sigma_min, float64 DOP853.

    Solved in u in [0, 1] with ln s(u) = (1-u) ln s + u ln sigma_min per example, where the ODE
    reads dx/du = (x - D*) (ln sigma_min - ln s): one solve for points at different sigmas.
    """
    x = np.asarray(x, np.float64)
    log_s = np.log(np.broadcast_to(np.asarray(sigma, np.float64), x.shape[:1]))
    rate = (np.log(SIGMA_MIN) - log_s)[:, None]

    def rhs(u, flat):
        y = flat.reshape(x.shape)
        s = np.exp((1 - u) * log_s + u * np.log(SIGMA_MIN))
        return ((y - denoiser(mix, y, s, xp=np)) * rate).reshape(-1)

    sol = solve_ivp(
        rhs, (0.0, 1.0), x.reshape(-1), method="DOP853", rtol=rtol, atol=rtol, t_eval=[1.0]
    )
    if not sol.success:
        raise RuntimeError(f"exact PF-ODE solve failed: {sol.message}")
    return sol.y[:, -1].reshape(x.shape)


def sliced_w2(a, b, *, num_projections: int = 256, seed: int = SEED) -> float:
    """SW2 = sqrt(E_theta W2^2(<theta, a>, <theta, b>)), theta uniform on the sphere; |a| = |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"sliced_w2 needs equal-size sets, got {a.shape} and {b.shape}")
    theta = np.random.default_rng(seed).normal(size=(a.shape[1], num_projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    pa, pb = np.sort(a @ theta, axis=0), np.sort(b @ theta, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None] - 2 * a @ b.T, 0.0)


def median_bandwidth(a) -> float:
    """The median pairwise distance of a set (the MMD kernel's fixed bandwidth)."""
    d2 = _sq_dists(np.asarray(a, np.float64), np.asarray(a, np.float64))
    return float(np.sqrt(np.median(d2[np.triu_indices(len(d2), 1)])))


def mmd2_unbiased(a, b, *, bandwidth: float) -> float:
    """MMD_u^2, k = exp(-|x-y|^2/(2 h^2)): off-diagonal means of k_aa and k_bb, - 2 mean k_ab."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    k = lambda u, v: np.exp(-_sq_dists(u, v) / (2 * bandwidth**2))
    n, m = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    within = (kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (
        m * (m - 1)
    )
    return float(within - 2 * k(a, b).mean())


def sample_sets(fn, x_T: jax.Array, key: jax.Array) -> dict:
    """{K: K-step samples} by Algorithm 1 at the SAMPLE_TS indices of the 40-point grid."""
    out = {}
    for k, ts in SAMPLE_TS.items():
        sigmas = jnp.asarray(samplers.index_sigmas(ts, SAMPLE_GRID))
        noise = jax.random.normal(key, (k - 1, *x_T.shape)) if k > 1 else None
        out[str(k)] = samplers.multistep_sample(
            fn, x_T, sigmas, noise, clip_denoised=False, clip_output=False
        )
    return out


@dataclasses.dataclass(frozen=True)
class Reference:
    """What every method of one mixture is scored against (the same draws for all: paired)."""

    mix: Mixture
    ref: np.ndarray  # fresh true samples
    x_T: jax.Array  # sigma_max z, the sampler's start
    renoise_key: jax.Array
    x_eval: np.ndarray  # x0 + sigma z at the evaluation sigmas
    s_eval: np.ndarray
    f_eval: np.ndarray  # f*(x_eval, s_eval)
    bandwidth: float
    n_mmd: int

    def quality(self, samples) -> dict:
        """SW2 against all reference samples, unbiased MMD^2 against the first n_mmd."""
        n = self.n_mmd
        mmd2 = mmd2_unbiased(samples[:n], self.ref[:n], bandwidth=self.bandwidth)
        return {"sw2": sliced_w2(samples, self.ref), "mmd2": mmd2}


def heun_35(denoise, x_T: jax.Array) -> np.ndarray:
    """EDM's Heun sampler on the 18-point Karras grid (35 network evaluations) from x_T."""
    sigmas = schedules.karras_sigmas(18, append_zero=True)
    return np.asarray(
        jax.jit(lambda x: ode.heun_sampler(denoise, x, sigmas, clip_denoised=False))(x_T)
    )


def make_reference(dim: int, settings) -> tuple[Reference, dict, dict]:
    """The reference, the baselines (second true set, exact ODE, EDM Heun) and ODE diagnostics.

    `settings` gives n_samples (SW2 sets), n_mmd, n_points (per evaluation sigma) and n_check.
    """
    mix = make_mixture(dim)
    keys = jax.random.split(jax.random.key(SEED + 1), 6)
    ref = np.asarray(sample_mixture(mix, keys[0], settings.n_samples))
    x_T = SIGMA_MAX * jax.random.normal(keys[1], (settings.n_samples, dim))
    z = jax.random.normal(keys[2], (len(EVAL_SIGMAS), settings.n_points, dim))
    x0 = sample_mixture(mix, keys[3], settings.n_points)
    x_eval = np.asarray(x0[None] + EVAL_SIGMAS[:, None, None] * z).reshape(-1, dim)
    s_eval = np.repeat(EVAL_SIGMAS, settings.n_points).astype(np.float32)
    x_all = np.concatenate([x_eval, np.asarray(x_T)])
    s_all = np.append(s_eval, np.full(len(x_T), SIGMA_MAX, np.float32))
    start = time.perf_counter()
    f_all = exact_flow(mix, x_all, s_all)
    ode_s = time.perf_counter() - start
    check = np.linspace(0, len(x_all) - 1, settings.n_check).astype(int)  # every sigma and x_T
    loose = exact_flow(mix, x_all[check], s_all[check], rtol=ODE_CHECK_RTOL)
    reference = Reference(
        mix,
        ref,
        x_T,
        keys[4],
        x_eval,
        s_eval,
        f_all[: len(x_eval)],
        median_bandwidth(ref[: settings.n_mmd]),
        settings.n_mmd,
    )
    baselines = {
        "true (second set)": np.asarray(sample_mixture(mix, keys[5], settings.n_samples)),
        "exact ODE f*(80 z)": f_all[len(x_eval) :],
        "EDM Heun, 35 NFE": heun_35(functools.partial(denoiser, mix), x_T),
    }
    info = {"mmd_bandwidth": reference.bandwidth, "ode_s": round(ode_s, 1),
            "ode_loose_tolerance_change": float(np.abs(f_all[check] - loose).max())}  # fmt: skip
    return reference, {k: reference.quality(v) for k, v in baselines.items()}, info


def make_scorer(cm, r: Reference):
    """params -> E||f_theta - f*|| over EVAL_SIGMAS (overall, per sigma) and 1/2/4-step quality.

    `cm(params, x, sigma)` is the consistency function scored.
    """

    @jax.jit
    def outputs(params):
        fn = lambda x, s: cm(params, x, s)
        return fn(jnp.asarray(r.x_eval), jnp.asarray(r.s_eval)), sample_sets(
            fn, r.x_T, r.renoise_key
        )

    def score(params) -> dict:
        out, sets = jax.tree.map(np.asarray, outputs(params))
        err = np.linalg.norm(out - r.f_eval, axis=1).reshape(len(EVAL_SIGMAS), -1).mean(1)
        return {
            "consistency_error": float(err.mean()), "consistency_error_per_sigma": err.tolist(),
            "samples": {k: r.quality(v) for k, v in sets.items()},
        }  # fmt: skip

    return score
