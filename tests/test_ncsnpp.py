"""NCSN++: parity with the jcm fixtures, the full CIFAR-10 parameter layout, jvp, dropout, bf16."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata
from flax.traverse_util import flatten_dict, unflatten_dict

from consistency.convert.jcm import check_params, ncsnpp_from_jcm_config
from consistency.models.ncsnpp import NCSNpp
from consistency.models.ncsnpp_layers import positional_embedding

# Each test program runs a few times at most: compiling fast matters more than running fast.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _top_level_calls(module, method_name: str) -> bool:
    return len(module.path) == 1 and method_name == "__call__"


@pytest.fixture(scope="module")
def tiny(case):
    """The fixture's network, params and I/O; one jitted apply that also returns intermediates."""
    spec = json.loads(case["files"][".json"].read_text())
    ref = dict(np.load(case["files"][".npz"]))
    params = unflatten_dict(
        {tuple(k.split("/")[1:]): v for k, v in ref.items() if k.startswith("params/")}
    )
    net = ncsnpp_from_jcm_config(spec["config"]["model"])
    apply = _jit(
        functools.partial(
            net.apply,
            train=False,
            capture_intermediates=_top_level_calls,
            mutable=["intermediates"],
        )
    )
    return {"spec": spec, "ref": ref, "params": params, "net": net, "apply": apply}


def _max_err(out, ref) -> tuple[float, float]:
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref))), float(np.max(np.abs(ref)))


def _assert_close(out, ref, what: str, rel: float = 1e-4) -> None:
    err, scale = _max_err(out, ref)
    assert np.shape(out) == ref.shape, (what, np.shape(out), ref.shape)
    assert err <= rel * scale, f"{what}: max|err| {err:.3g} > {rel} * max|ref| {scale:.3g}"


@pytest.mark.parametrize("case", refdata.cases("jcm_ncsnpp"), scope="module")
@pytest.mark.parametrize("suffix", ["", "_t2"])
def test_net_out_matches_jcm(tiny, suffix):
    ref = tiny["ref"]
    out, _ = tiny["apply"](
        {"params": tiny["params"]}, ref["net_in_x" + suffix], ref["net_cond_t" + suffix]
    )
    assert out.dtype == jnp.float32
    _assert_close(out, ref["net_out" + suffix], "net_out" + suffix)


@pytest.mark.parametrize("case", refdata.cases("jcm_ncsnpp"), scope="module")
def test_top_level_intermediates_match_jcm(tiny, case):
    inter_ref = np.load(case["files"]["_intermediates.npz"])
    assert sorted(inter_ref.files) == sorted(tiny["spec"]["intermediates"]["keys"])
    ref = tiny["ref"]
    _, state = tiny["apply"]({"params": tiny["params"]}, ref["net_in_x"], ref["net_cond_t"])
    captured = state["intermediates"]
    extra = set(captured) - set(inter_ref.files)
    assert not extra, f"top-level modules the reference does not have: {sorted(extra)}"
    for name in inter_ref.files:
        (out,) = captured[name]["__call__"]  # each top-level module is called exactly once
        _assert_close(out, inter_ref[name], name)


@pytest.mark.parametrize("case", refdata.cases("jcm_ncsnpp"), scope="module")
def test_fixture_params_fit_the_model_tree(tiny):
    ref = tiny["ref"]
    x, t = ref["net_in_x"], ref["net_cond_t"]
    init = functools.partial(tiny["net"].init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), x, t)
    assert set(shapes) == {"params"}
    check_params(tiny["params"], shapes["params"])
    leaves = jax.tree.leaves(shapes["params"])
    assert len(leaves) == tiny["spec"]["n_leaves"]
    assert sum(int(np.prod(p.shape)) for p in leaves) == tiny["spec"]["n_params"]


@pytest.mark.parametrize("case", refdata.cases("jcm_shapes"))
def test_full_model_parameter_shapes(case):
    spec = json.loads(case["files"][".json"].read_text())
    expected = {name: (tuple(shape), dtype) for name, shape, dtype in spec["params"]}
    net = ncsnpp_from_jcm_config(spec["model_config"])
    # The json stores no channel count; the first conv's input width is the image's channels.
    channels = expected["Conv_0/kernel"][0][2]
    size = spec["image_size"]
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    variables = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), x, t)
    assert sorted(variables) == sorted(spec["collections"])
    got = {
        "/".join(path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in flatten_dict(variables["params"]).items()
    }
    assert sorted(set(expected) - set(got)) == [], "missing leaves"
    assert sorted(set(got) - set(expected)) == [], "unexpected leaves"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong, wrong
    assert len(got) == spec["n_leaves"]
    assert sum(int(np.prod(s)) for s, _ in got.values()) == spec["n_params"]


@pytest.mark.parametrize("case", refdata.cases("jcm_ncsnpp"), scope="module")
def test_jvp_through_the_network(tiny):
    """jax.jvp runs (continuous-time CM needs it) and its tangent matches a central difference."""
    ref, params, net = tiny["ref"], {"params": tiny["params"]}, tiny["net"]
    x, t = jnp.asarray(ref["net_in_x"]), jnp.asarray(ref["net_cond_t"])
    dx = jax.random.normal(jax.random.key(1), x.shape)
    dt = jnp.full(t.shape, 0.01)  # Fourier W is ~30: keep the phase change per unit step small
    f = lambda x, t: net.apply(params, x, t, train=False)
    out, tangent = _jit(lambda x, t: jax.jvp(f, (x, t), (dx, dt)))(x, t)
    _assert_close(out, ref["net_out"], "jvp primal")
    eps = 1e-2
    plus, _ = tiny["apply"](params, x + eps * dx, t + eps * dt)
    minus, _ = tiny["apply"](params, x - eps * dx, t - eps * dt)
    _assert_close(tangent, np.asarray((plus - minus) / (2 * eps)), "jvp tangent", rel=1e-2)


@pytest.mark.parametrize("case", refdata.cases("jcm_ncsnpp"), scope="module")
def test_dropout_uses_the_dropout_rng_only_in_training(tiny):
    ref, params = tiny["ref"], {"params": tiny["params"]}
    net = tiny["net"].clone(dropout=0.2)
    x, t = ref["net_in_x"], ref["net_cond_t"]
    train = _jit(lambda key: net.apply(params, x, t, train=True, rngs={"dropout": key}))
    # rbg keys: threefry's hash, once per dropout layer, triples the compile time on CPU.
    a, b, c = (train(jax.random.key(k, impl="rbg")) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - c)) > 1e-3
    # The same net with train=False is the dropout-free one that matched net_out.
    assert np.max(np.abs(a - ref["net_out"])) > 1e-3


_HEAVY = ("conv_general_dilated", "dot_general")


def _equations(jaxpr):
    """Every equation of a jaxpr, descending into sub-jaxprs (pjit, custom_jvp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if hasattr(sub, "eqns"):
                yield from _equations(sub)


@pytest.mark.parametrize("case", refdata.cases("jcm_ncsnpp"), scope="module")
def test_bfloat16_compute_keeps_float32_params(tiny):
    ref, params = tiny["ref"], {"params": tiny["params"]}
    net = tiny["net"].clone(dtype=jnp.bfloat16)
    x, t = ref["net_in_x"], ref["net_cond_t"]
    shapes = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), x, t)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    apply = lambda x, t: net.apply(params, x, t, train=False)
    heavy = [e for e in _equations(jax.make_jaxpr(apply)(x, t).jaxpr) if e.primitive.name in _HEAVY]
    assert heavy and all(v.aval.dtype == jnp.bfloat16 for e in heavy for v in e.invars)
    out = _jit(apply)(x, t)
    assert out.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits; through ~20 blocks a few percent of the output scale is expected.
    _assert_close(out, ref["net_out"], "bf16 net_out", rel=0.1)


def test_positional_embedding_formula_and_model():
    t = jnp.array([0.0, 3.5])
    emb = positional_embedding(t, 8, max_positions=10000)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3.5 * freqs), np.cos(3.5 * freqs)]))
    np.testing.assert_array_equal(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    net = NCSNpp(
        nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), embedding_type="positional"
    )
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    shapes = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), x, t)
    assert "GaussianFourierProjection_0" not in shapes["params"]
    assert shapes["params"]["Dense_0"]["kernel"].shape == (16, 64)


@pytest.mark.parametrize(
    "field, value", [("embedding_type", "learned"), ("progressive_input", "input_skip")]
)
def test_unknown_choices_raise(field, value):
    net = NCSNpp(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), **{field: value})
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    with pytest.raises(ValueError, match=f"unknown {field}"):
        jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), x, t)
