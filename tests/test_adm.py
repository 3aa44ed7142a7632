"""ADM UNet against the paper's PyTorch UNet outputs, loaded through the .pt reader."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata
from flax import traverse_util

from consistency.convert.cm_pt import load_cm_checkpoint
from consistency.models.adm import adm_from_create_model_args, attention_ds
from consistency.models.adm_layers import ResBlock

CASES = refdata.cases("adm")


def nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1)


def _inputs(ref: dict, model) -> tuple:
    """(x NHWC, noise_cond, y): the network's input is c_in * x (io/model_input), 250 ln sigma."""
    y = jnp.asarray(ref["io/labels"]) if model.num_classes is not None else None
    return jnp.asarray(nhwc(ref["io/model_input"])), jnp.asarray(ref["io/t_input"]), y


def _load(case) -> dict:
    """Metadata, npz arrays, model from the create_model args, params, output of one fixture."""
    files = case["files"]
    meta = json.loads(files[".json"].read_text())
    ref = dict(np.load(files[".npz"]))
    model = adm_from_create_model_args(meta["create_model_kwargs"])
    params = load_cm_checkpoint(files[".pt"], model)
    x, t, y = _inputs(ref, model)
    apply = jax.jit(model.apply)
    out = np.asarray(apply(params, x, t, y))
    return dict(meta=meta, ref=ref, model=model, params=params, apply=apply, out=out,
                name=case["name"])  # fmt: skip


@pytest.fixture(scope="module", params=CASES)
def loaded(request):
    """Every fixture of kind `adm`."""
    return _load(request.param)


@pytest.fixture(scope="module")
def first():
    """Checks of code paths rather than of weights: one fixture is enough (compiles are slow)."""
    return _load(CASES[0].values[0])


def test_helper_reproduces_unet_constructor_args(loaded):
    meta, model = loaded["meta"], loaded["model"]
    kw = meta["UNetModel_kwargs"]
    assert model.attention_resolutions == tuple(kw["attention_resolutions"])
    assert model.attention_resolutions == tuple(meta["attention_ds"])
    assert model.channel_mult == tuple(kw["channel_mult"])
    assert model.num_classes == kw["num_classes"]
    assert (model.model_channels, model.out_channels) == (kw["model_channels"], kw["out_channels"])
    assert model.num_res_blocks == kw["num_res_blocks"]
    assert (model.num_heads, model.num_head_channels) == (kw["num_heads"], kw["num_head_channels"])
    assert model.use_scale_shift_norm == kw["use_scale_shift_norm"]
    assert model.resblock_updown == kw["resblock_updown"]
    assert model.conv_resample == kw["conv_resample"] and kw["dims"] == 2
    assert model.dropout == kw["dropout"]
    size = meta["create_model_kwargs"]["image_size"]
    res = meta["create_model_kwargs"]["attention_resolutions"]
    assert attention_ds(size, res) == tuple(meta["attention_ds"])


def test_param_count_and_attention_blocks(loaded):
    meta, params = loaded["meta"], loaded["params"]["params"]
    flat = traverse_util.flatten_dict(params)
    assert sum(v.size for v in flat.values()) == meta["num_parameters"]
    qkv = {k[0]: v.shape for k, v in flat.items() if k[1:] == ("qkv", "kernel")}
    expected = {b["name"].replace(".", "_"): b["channels"] for b in meta["attention_blocks"]}
    assert {k: s[0] for k, s in qkv.items()} == expected
    assert all(s[1] == 3 * s[0] for s in qkv.values())
    in_channels = meta["UNetModel_kwargs"]["in_channels"]
    assert flat[("input_blocks_0_0", "kernel")].shape[2] == in_channels


def test_output_matches_reference(loaded):
    ref = nhwc(loaded["ref"]["io/model_output"])
    err = np.abs(loaded["out"] - ref).max()
    scale = np.abs(ref).max()
    print(f"{loaded['name']}: max |out - ref| = {err:.3g} (max |ref| = {scale:.3g})")
    np.testing.assert_allclose(loaded["out"], ref, rtol=0, atol=1e-4 * scale)


def test_bf16_compute_stays_close(first):
    model, params = first["model"], first["params"]
    bf16 = model.clone(dtype=jnp.bfloat16)
    out = jax.jit(bf16.apply)(params, *_inputs(first["ref"], model))
    assert out.dtype == jnp.float32  # the head runs in float32
    rel = np.abs(np.asarray(out) - first["out"]).max() / np.abs(first["out"]).max()
    assert 0 < rel < 5e-2, rel


def test_dropout_needs_rng_and_acts_only_in_training(first):
    """On the full model only traced (an rng is demanded); the effect on one ResBlock (cheap)."""
    model, params = first["model"].clone(dropout=0.5), first["params"]
    x, t, y = _inputs(first["ref"], model)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: model.apply(params, x, t, y, train=True))
    block = ResBlock(32, dropout=0.5)
    h, emb = jnp.ones((1, 4, 4, 32)), jnp.ones((1, 16))
    p = block.init(jax.random.key(0), h, emb, False)
    p = jax.tree.map(lambda a: a + 0.1, p)  # the zero-initialised output conv would hide dropout
    rngs = {"dropout": jax.random.key(1)}
    a, b = block.apply(p, h, emb, True, rngs=rngs), block.apply(p, h, emb, False, rngs=rngs)
    np.testing.assert_array_equal(b, block.apply(p, h, emb, False))
    assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_dropout_only_at_coarse_resolutions(first):
    """dropout_min_ds (iCT/sCM: feature maps <= 16): finer blocks run without dropout."""
    model, params = first["model"], first["params"]
    x, t, y = _inputs(first["ref"], model)
    coarsest = 2 ** (len(model.channel_mult) - 1)
    none = model.clone(dropout=0.5, dropout_min_ds=2 * coarsest)
    jax.eval_shape(lambda: none.apply(params, x, t, y, train=True))  # no dropout rng needed
    with pytest.raises(Exception, match="dropout"):
        some = model.clone(dropout=0.5, dropout_min_ds=coarsest)
        jax.eval_shape(lambda: some.apply(params, x, t, y, train=True))


def test_labels_required_exactly_when_class_conditional(loaded):
    model, params = loaded["model"], loaded["params"]
    x, t, y = _inputs(loaded["ref"], model)
    wrong = jnp.zeros(x.shape[0], jnp.int32) if y is None else None
    with pytest.raises(ValueError, match="class-conditional"):
        jax.eval_shape(model.apply, params, x, t, wrong)


def test_forward_mode_jvp_matches_finite_differences(first):
    """jax.jvp in (x, noise_cond) equals the central difference (F(p + h v) - F(p - h v)) / 2h."""
    model, params, apply = first["model"], first["params"], first["apply"]
    x, t, y = _inputs(first["ref"], model)
    kx, kt = jax.random.split(jax.random.key(1))
    vx, vt = jax.random.normal(kx, x.shape), jax.random.normal(kt, t.shape)
    f = lambda x, t: model.apply(params, x, t, y)
    primal, jv = jax.jit(lambda a, b: jax.jvp(f, (a, b), (vx, vt)))(x, t)
    np.testing.assert_allclose(primal, first["out"], atol=1e-5)
    h = 1e-2
    fd = (apply(params, x + h * vx, t + h * vt, y) - apply(params, x - h * vx, t - h * vt, y)) / (
        2 * h
    )
    scale = float(jnp.abs(jv).max())
    assert scale > 1e-2
    np.testing.assert_allclose(jv, fd, rtol=0, atol=2e-3 * scale)
