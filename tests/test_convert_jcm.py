"""jcm checkpoint reader: bytes, State layout, parameter trees, and the restored net's output."""

import functools
import hashlib
import json
import lzma

import flax.serialization
import jax
import numpy as np
import pytest
import refdata
from flax.traverse_util import empty_node, flatten_dict

from consistency.convert.jcm import (
    check_params,
    load_jcm_params,
    load_jcm_state,
    ncsnpp_from_jcm_config,
    read_jcm_bytes,
)
from consistency.core import parameterization

CASES = refdata.cases("jcm_ncsnpp")


@pytest.fixture(scope="module")
def ckpt(case):
    """The fixture's json, npz and checkpoint path."""
    spec = json.loads(case["files"][".json"].read_text())
    return {
        "spec": spec,
        "ref": dict(np.load(case["files"][".npz"])),
        "path": case["files"][".msgpack.xz"],
    }


def _flat(tree) -> dict:
    """'/'-joined paths; empty dicts kept as leaves (jcm's model_state and optax's empty states)."""
    return {"/".join(k): v for k, v in flatten_dict(tree, keep_empty_nodes=True).items()}


def _npz_tree(ref: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in ref.items() if k.startswith(prefix)}


@pytest.mark.parametrize("case", CASES, scope="module")
def test_xz_is_unwrapped_to_the_exact_bytes(ckpt):
    raw = read_jcm_bytes(ckpt["path"])
    meta = ckpt["spec"]["checkpoint"]
    assert len(raw) == meta["raw_bytes"]
    assert hashlib.sha256(raw).hexdigest() == meta["sha256"]


@pytest.mark.parametrize("case", CASES, scope="module")
def test_state_matches_the_recorded_layout(ckpt):
    state = _flat(load_jcm_state(ckpt["path"]))
    layout = {e["path"]: e for e in ckpt["spec"]["checkpoint"]["layout"]}
    assert sorted(set(layout) - set(state)) == []
    assert sorted(set(state) - set(layout)) == []
    for path, entry in layout.items():
        value = state[path]
        if entry["dtype"] == "empty_dict":
            assert value is empty_node, path
            continue
        value = np.asarray(value)
        assert [list(value.shape), str(value.dtype)] == [entry["shape"], entry["dtype"]], path
        total = float(value.astype(np.float64).sum())
        assert total == pytest.approx(entry["sum"], rel=1e-9, abs=1e-12), path


@pytest.mark.parametrize("case", CASES, scope="module")
def test_params_ema_equals_the_fixture_params_bit_for_bit(ckpt):
    got = _flat(load_jcm_params(ckpt["path"]))
    want = _npz_tree(ckpt["ref"], "params/")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("case", CASES, scope="module")
def test_online_params_differ_only_in_the_trained_leaves(ckpt):
    online = _flat(load_jcm_params(ckpt["path"], which="params"))
    ema = _npz_tree(ckpt["ref"], "params/")
    changed = {k for k in ema if not np.array_equal(online[k], ema[k])}
    assert changed == set(ckpt["spec"]["checkpoint"]["grad_leaves"])
    for name, value in _npz_tree(ckpt["ref"], "train_params/").items():
        np.testing.assert_array_equal(online[name], value, err_msg=name)


@pytest.mark.parametrize("case", CASES, scope="module")
def test_which_tree_errors_name_the_choices(ckpt):
    with pytest.raises(KeyError, match=r"no 'target_params'.*'params_ema', 'params'"):
        load_jcm_params(ckpt["path"], which="target_params")
    with pytest.raises(ValueError, match="unknown parameter tree: 'ema'"):
        load_jcm_params(ckpt["path"], which="ema")


@pytest.mark.parametrize("case", CASES, scope="module")
def test_raw_msgpack_and_state_with_target(ckpt, tmp_path):
    state = load_jcm_state(ckpt["path"])
    raw_path = tmp_path / "checkpoint_1"
    raw_path.write_bytes(read_jcm_bytes(ckpt["path"]))
    np.testing.assert_array_equal(
        load_jcm_params(raw_path)["Conv_0"]["kernel"], state["params_ema"]["Conv_0"]["kernel"]
    )
    # StateWithTarget (CT): the same State plus target_params.
    with_target = dict(state, target_params=state["params"])
    target_path = tmp_path / "checkpoint_ct"
    target_path.write_bytes(flax.serialization.msgpack_serialize(with_target))
    np.testing.assert_array_equal(
        load_jcm_params(target_path, which="target_params")["Conv_1"]["bias"],
        state["params"]["Conv_1"]["bias"],
    )


@pytest.mark.parametrize("case", CASES, scope="module")
def test_missing_or_unexpected_state_keys_are_named(ckpt, tmp_path):
    state = load_jcm_state(ckpt["path"])
    bad = {k: v for k, v in state.items() if k != "rng_state"} | {"extra_head": {}}
    path = tmp_path / "bad.xz"
    path.write_bytes(lzma.compress(flax.serialization.msgpack_serialize(bad)))
    with pytest.raises(
        KeyError, match=r"missing keys \['rng_state'\], unexpected \['extra_head'\]"
    ):
        load_jcm_params(path)


@pytest.mark.parametrize("case", CASES, scope="module")
def test_converted_params_reproduce_net_out(ckpt):
    ref = ckpt["ref"]
    params = load_jcm_params(ckpt["path"])
    net = ncsnpp_from_jcm_config(ckpt["spec"]["config"]["model"])
    x, t = ref["net_in_x"], ref["net_cond_t"]
    init = functools.partial(net.init, train=False)
    check_params(params, jax.eval_shape(init, jax.random.key(0), x, t)["params"])
    # Few runs: a low optimisation level compiles faster on CPU.
    apply = jax.jit(
        lambda x, t: net.apply({"params": params}, x, t, train=False),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    out = np.asarray(apply(x, t))
    err, scale = np.max(np.abs(out - ref["net_out"])), np.max(np.abs(ref["net_out"]))
    assert err <= 1e-4 * scale, (err, scale)


@pytest.mark.parametrize("case", CASES, scope="module")
def test_denoiser_and_consistency_function_of_the_restored_net(ckpt):
    """jcm's EDM denoiser and consistency function (c_noise = 0.25 ln t), at t and t2."""
    ref = ckpt["ref"]
    params = load_jcm_params(ckpt["path"])
    net = ncsnpp_from_jcm_config(ckpt["spec"]["config"]["model"])
    F = lambda x_in, c: net.apply({"params": params}, x_in, c, train=False)
    noise_cond = parameterization.get_noise_conditioning("ncsnpp")
    wrapped = {
        "denoiser": parameterization.edm_scalings, "distiller": parameterization.boundary_scalings
    }  # fmt: skip
    fast = {"xla_backend_optimization_level": 0}
    for name, scalings in wrapped.items():
        fn = functools.partial(
            parameterization.precondition, F, scalings=scalings, noise_cond=noise_cond
        )
        fn = jax.jit(fn, compiler_options=fast)
        for suffix, x, t in (("", "x", "t"), ("_t2", "x2", "t2")):
            want = ref[f"{name}_out{suffix}"]
            refdata.assert_close_scaled(fn(ref[x], ref[t]), want, 1e-4, f"{name}_out{suffix}")


@pytest.mark.parametrize("case", CASES, scope="module")
def test_check_params_names_the_offending_path(ckpt):
    params = load_jcm_params(ckpt["path"])
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    check_params(params, template)
    with pytest.raises(KeyError, match=r"under /Conv_0: missing \['bias'\]"):
        check_params({**params, "Conv_0": {"kernel": params["Conv_0"]["kernel"]}}, template)
    with pytest.raises(KeyError, match=r"unexpected \['Extra_0'\]"):
        check_params({**params, "Extra_0": {}}, template)
    wrong = {**params, "Conv_1": {**params["Conv_1"], "bias": np.zeros(7, np.float32)}}
    with pytest.raises(ValueError, match=r"/Conv_1/bias: shape \(7,\)"):
        check_params(wrong, template)


@pytest.mark.parametrize("case", CASES, scope="module")
@pytest.mark.parametrize("key, value", [("resblock_type", "ddpm"), ("progressive", "output_skip")])
def test_unimplemented_jcm_config_values_raise(ckpt, key, value):
    config = dict(ckpt["spec"]["config"]["model"], **{key: value})
    with pytest.raises(ValueError, match=f"model.{key}={value!r} is not implemented"):
        ncsnpp_from_jcm_config(config)
