"""AutoencoderKL against diffusers' outputs on every `vae_kl` fixture (float32 and bfloat16)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata
from flax import traverse_util

from consistency.convert.diffusers import read_safetensors
from consistency.convert.diffusers_export import write_safetensors
from consistency.convert.diffusers_vae import (
    WEIGHTS,
    autoencoder_kwargs,
    export_diffusers_vae,
    load_diffusers_vae,
    param_shapes,
)
from consistency.models.autoencoder_kl import AutoencoderKL

CASES = refdata.cases("vae_kl")
NETWORK_RTOL = 1e-4  # max |ours - diffusers| <= 1e-4 max |diffusers|, float32
# bfloat16 compute (float32 params, GroupNorm and softmax) rounds each op at 2^-8 = 3.9e-3; on
# vae_kl_tiny this adds up to 1.4e-2 of scale for the posterior mean, 1.6e-2 for the decoder and
# 3.8e-2 for the round trip. A wiring or dtype error gives O(1); the bound leaves room for deeper
# networks.
BF16_RTOL = 1e-1
# fixture key -> what of ours it is compared with (all NCHW in the fixture, NHWC here).
QUANTITIES = (
    "enc/encoder_out",
    "enc/moments",
    "enc/mean",
    "enc/logvar",
    "enc/std",
    "enc/sample",
    "enc/sample_scaled",
    "dec/post_quant_conv_out",
    "dec/output",
    "roundtrip/mode",
    "roundtrip/sampled",
)


def _outputs(model: AutoencoderKL, params, images, noise, latents) -> dict:
    """Every compared quantity, from the fixture's images, posterior noise and latents."""

    def run(mod: AutoencoderKL):
        posterior = mod.encode(images)
        sample = posterior.sample(noise)
        return {
            "enc/encoder_out": mod.encoder(images),
            "enc/moments": mod.quant_conv(mod.encoder(images)),
            "enc/mean": posterior.mean,
            "enc/logvar": posterior.logvar,
            "enc/std": posterior.std,
            "enc/sample": sample,
            "enc/sample_scaled": mod.scale_latents(sample),
            "enc/kl": posterior.kl(),
            "dec/post_quant_conv_out": mod.post_quant_conv(latents),
            "dec/output": mod.decode(latents),
            "roundtrip/mode": mod(images),
            "roundtrip/sampled": mod(images, noise),
            "latents/encoded": mod.encode_latents(images, noise),
            "latents/decoded": mod.decode_latents(mod.scale_latents(latents)),
        }

    out = jax.jit(lambda p: model.apply(p, method=run))(params)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


@pytest.fixture(scope="module", params=CASES)
def case(request):
    files = request.param["files"]
    meta = refdata.load_json(files[".json"])
    ref = dict(np.load(files[".npz"]))
    folder = refdata.fixture_dir() / meta["folder"]
    inputs = [refdata.nhwc(ref[k]) for k in ("images", "enc/noise", "dec/latents")]
    runs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model, params, config = load_diffusers_vae(folder, dtype=dtype)
        runs[jnp.dtype(dtype).name] = _outputs(model, params, *inputs)
    return dict(meta=meta, ref=ref, folder=folder, model=model, config=config, runs=runs)


def test_config_is_the_fixtures(case):
    meta, model = case["meta"], case["model"]
    saved = meta["config_saved"]
    assert case["config"] == json.loads((case["folder"] / "config.json").read_text())
    assert model.block_out_channels == tuple(saved["block_out_channels"])
    assert model.layers_per_block == saved["layers_per_block"]
    assert model.norm_num_groups == saved["norm_num_groups"]
    assert model.scaling_factor == pytest.approx(saved["scaling_factor"])
    assert model.shift_factor == (saved["shift_factor"] or 0.0)
    n = sum(np.prod(s.shape) for s in jax.tree.leaves(param_shapes(model)))
    assert n == meta["num_parameters"]


@pytest.mark.parametrize("key", QUANTITIES)
def test_float32_matches_diffusers(case, key):
    ours, ref = case["runs"]["float32"][key], refdata.nhwc(case["ref"][key])
    refdata.assert_close_scaled(ours, ref, NETWORK_RTOL, key)


@pytest.mark.parametrize("key", QUANTITIES)
def test_bfloat16_compute_within_its_bound(case, key):
    ours, ref = case["runs"]["bfloat16"][key], refdata.nhwc(case["ref"][key])
    refdata.assert_close_scaled(ours, ref, BF16_RTOL, key)


def test_fused_attention_kernel_matches(case):
    """JAX's dot_product_attention ('xla') in the mid blocks gives the same decoder output."""
    model, params, _ = load_diffusers_vae(case["folder"], attention_impl="xla")
    latents = refdata.nhwc(case["ref"]["dec/latents"])
    out = jax.jit(lambda p: model.apply(p, latents, method="decode"))(params)
    refdata.assert_close_scaled(out, refdata.nhwc(case["ref"]["dec/output"]), NETWORK_RTOL)


def test_float32_matches_the_float64_rerun(case):
    for key in ("enc/mean", "enc/logvar"):
        ours, ref = case["runs"]["float32"][key], refdata.nhwc(case["ref"][f"{key}_f64"])
        refdata.assert_close_scaled(ours, ref, NETWORK_RTOL, key)


def test_posterior_formulas(case):
    """sample = mean + std noise, scaled latents, KL(q || N(0, I)) in float64 from the fixture."""
    ref, run = case["ref"], case["runs"]["float32"]
    mean, logvar = ref["enc/mean"].astype(np.float64), ref["enc/logvar"].astype(np.float64)
    kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    refdata.assert_close_scaled(run["enc/kl"], kl, NETWORK_RTOL, "kl")
    refdata.assert_close_scaled(
        run["latents/encoded"], refdata.nhwc(ref["enc/sample_scaled"]), NETWORK_RTOL, "encoded"
    )
    refdata.assert_close_scaled(
        run["latents/decoded"], refdata.nhwc(ref["dec/output"]), NETWORK_RTOL, "decoded"
    )


def test_legacy_attention_names_and_1x1_conv_shapes(case, tmp_path):
    """query/key/value/proj_attn stored as 1x1 convs load onto the same params."""
    state = read_safetensors(case["folder"] / WEIGHTS[0])
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for name, value in state.items():
        for new, was in legacy.items():
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{was}.")
                value = value[..., None, None] if value.ndim == 2 else value
        old[name] = value
    assert sum(v.ndim == 4 for v in old.values()) > sum(v.ndim == 4 for v in state.values())
    shutil.copy(case["folder"] / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / WEIGHTS[0], old)
    _, params, _ = load_diffusers_vae(tmp_path)
    _, want, _ = load_diffusers_vae(case["folder"])
    flat, flat_want = (traverse_util.flatten_dict(p) for p in (params, want))
    assert flat.keys() == flat_want.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], flat_want[k], "/".join(k))


def test_export_writes_the_fixture_folder_byte_for_byte(case, tmp_path):
    model, params, config = load_diffusers_vae(case["folder"])
    out = export_diffusers_vae(params, model, tmp_path / "vae", sample_size=config["sample_size"])
    for name in ("config.json", WEIGHTS[0]):
        assert (out / name).read_bytes() == (case["folder"] / name).read_bytes(), name
    with pytest.raises(FileExistsError):
        export_diffusers_vae(params, model, out, sample_size=config["sample_size"])


def test_missing_tensor_is_named(case, tmp_path):
    state = read_safetensors(case["folder"] / WEIGHTS[0])
    del state["decoder.conv_out.bias"]
    shutil.copy(case["folder"] / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / WEIGHTS[0], state)
    with pytest.raises(KeyError, match="decoder/conv_out/bias"):
        load_diffusers_vae(tmp_path)


@pytest.mark.parametrize(
    "key,value",
    [
        ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"]),
        ("latents_mean", [0.0, 0.0, 0.0, 0.0]),  # without latents_std
        ("latents_std", [1.0]),  # without latents_mean
        ("act_fn", "tanh"),
        ("norm_num_groups", 5),
        ("_class_name", "AutoencoderTiny"),
        ("norm_type", "spatial"),
    ],
)
def test_unsupported_config_key_is_named(key, value, tmp_path):
    folder = CASES[0].values[0]["files"]["config.json"].parent
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=f"config {key}="):
        autoencoder_kwargs({**config, key: value})
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    shutil.copy(folder / WEIGHTS[0], tmp_path / WEIGHTS[0])
    with pytest.raises(ValueError, match=f"config {key}="):
        load_diffusers_vae(tmp_path)


def test_variants_without_quant_convs_or_attention():
    """Flux-style config switches: the param tree follows them; shapes follow the levels."""
    model = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=3,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        shift_factor=0.1,
    )
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: no compile
    names = ["/".join(k) for k in traverse_util.flatten_dict(params["params"])]
    assert not [n for n in names if "quant_conv" in n or "attentions" in n]
    assert "decoder/up_blocks_0/resnets_2/conv2/kernel" in names
    z = jax.eval_shape(lambda p, x: model.apply(p, x, method="encode").mean, params, x)
    assert z.shape == (2, 4, 4, 3)
    decoded = jax.eval_shape(lambda p, z: model.apply(p, z, method="decode"), params, z)
    assert decoded.shape == x.shape
    z = jnp.linspace(-1, 1, 12)
    np.testing.assert_allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-6)


def test_per_channel_latent_statistics(case, tmp_path):
    """latents_mean / latents_std (diffusers: (z - mean) * scaling / std; decode the inverse) are
    read, applied per channel, written back, and checked for length and sign."""
    folder = case["folder"]
    config = json.loads((folder / "config.json").read_text())
    channels = config["latent_channels"]
    mean = [0.1 * (i + 1) for i in range(channels)]
    std = [0.5 + 0.25 * i for i in range(channels)]
    stats = {**config, "latents_mean": mean, "latents_std": std, "shift_factor": None}
    kwargs = autoencoder_kwargs(stats)
    assert kwargs["latents_mean"] == tuple(mean) and kwargs["latents_std"] == tuple(std)
    model = AutoencoderKL(**kwargs)
    z = jax.random.normal(jax.random.key(1), (2, 3, 3, channels))
    want = (np.asarray(z) - np.asarray(mean)) * config["scaling_factor"] / np.asarray(std)
    np.testing.assert_allclose(model.scale_latents(z), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-5)
    # The exporter writes what it read; the reader refuses a wrong length, a zero std, or a shift.
    _, params, _ = load_diffusers_vae(folder)
    out = export_diffusers_vae(params, model, tmp_path / "vae", sample_size=config["sample_size"])
    written = json.loads((out / "config.json").read_text())
    assert (written["latents_mean"], written["latents_std"]) == (mean, std)
    for key, value, why in (
        ("latents_mean", mean[:-1], "one value per latent channel"),
        ("latents_std", [0.0] * channels, "must be > 0"),
        ("shift_factor", 0.5, "not both"),
    ):
        with pytest.raises(ValueError, match=f"config {key}=.*{why}"):
            autoencoder_kwargs({**stats, key: value})
