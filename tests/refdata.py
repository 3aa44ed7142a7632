"""Discovery of the reference fixtures listed in MANIFEST.json, one test case per fixture."""

import json
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def fixture_dir() -> pathlib.Path:
    """The fixture directory: $CONSISTENCY_FIXTURES, else ../shared/fixtures from the repo root."""
    env = os.environ.get("CONSISTENCY_FIXTURES")
    return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


def cases(kind: str) -> list:
    """pytest params, one per fixture of `kind`: each a dict {name, files: {suffix: path}}."""
    manifest_path = fixture_dir() / "MANIFEST.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"no fixture manifest at {manifest_path}; set CONSISTENCY_FIXTURES to the fixture dir"
        )
    entries = json.loads(manifest_path.read_text())["kinds"].get(kind, [])
    if not entries:
        raise LookupError(f"MANIFEST.json lists no fixtures of kind {kind!r}")
    out = []
    for entry in entries:
        files = {}
        for f in entry["files"]:
            name = pathlib.Path(f).name
            suffix = name[len(entry["name"]) :] if name.startswith(entry["name"]) else name
            files[suffix] = fixture_dir() / f
        out.append(pytest.param({"name": entry["name"], "files": files}, id=entry["name"]))
    return out


def load_json(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def closed_form_net(f_params: dict):
    """The fixtures' closed-form 'network' F(x_in, t) = scale * act(a x_in + b t) + shift_t t."""
    import jax.numpy as jnp

    acts = {"tanh": jnp.tanh, "identity": lambda v: v, "sin": jnp.sin}
    if f_params["act"] not in acts:
        raise ValueError(f"fixture uses an activation this test does not know: {f_params['act']!r}")
    act = acts[f_params["act"]]

    def net(x_in, t):
        t = t.reshape(t.shape + (1,) * (x_in.ndim - t.ndim)).astype(jnp.float32)
        a, b = jnp.float32(f_params["a"]), jnp.float32(f_params["b"])
        scale, shift = jnp.float32(f_params["scale"]), jnp.float32(f_params["shift_t"])
        return scale * act(a * x_in + b * t) + shift * t

    return net


def nhwc(a):
    """NCHW (torch) -> NHWC, for any leading axes."""
    import numpy as np

    return np.moveaxis(np.asarray(a), -3, -1)


# Agreement required by the issues and the fixture README (relative to the reference's scale).
FORMULA_RTOL = 1e-5
SAMPLER_RTOL = 1e-4


def closed_form_denoiser(f_params: dict, *, distillation: bool, noise_cond: str = "adm"):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with the fixture's closed-form F."""
    import functools

    from consistency.core import parameterization as P

    scalings = P.boundary_scalings if distillation else P.edm_scalings
    return functools.partial(
        P.precondition,
        closed_form_net(f_params),
        scalings=scalings,
        noise_cond=P.get_noise_conditioning(noise_cond),
    )


def assert_close_scaled(actual, desired, rtol, err_msg=""):
    """max |a - d| <= rtol * max |d|: agreement relative to the output's scale."""
    import numpy as np

    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    err = np.max(np.abs(actual - desired))
    scale = max(np.max(np.abs(desired)), 1e-30)
    assert err <= rtol * scale, f"{err_msg}: max abs err {err:.3g} > {rtol} * {scale:.3g}"
    return err / scale


def closed_form_vp_net(f_params: dict, *, s: float | None = None):
    """The diffusers fixtures' model F(x, t) = a tanh(b x + c t/1000 + s) + d x, float32.

    t is the integer timestep ([B] or a scalar); `s` overrides f_params["s"] (vp_solvers gives
    s_cond / s_uncond separately).
    """
    import jax.numpy as jnp

    a, b, c, d = (jnp.float32(f_params[k]) for k in "abcd")
    shift = jnp.float32(f_params["s"] if s is None else s)

    def net(x, t):
        t = jnp.asarray(t).astype(jnp.float32)
        t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
        return a * jnp.tanh(b * x + c * (t / 1000) + shift) + d * x

    return net
