"""The convert command: official fixture checkpoints -> our checkpoints that sample and teach."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import refdata
from flax import traverse_util
from test_convert_diffusers import diffusers_config, to_diffusers, write_safetensors

from configs import cd_cifar10, cd_imagenet64
from consistency.experiment import convert, networks, resume, sample
from consistency.io import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
JCM = refdata.cases("jcm_ncsnpp")[0].values[0]


def adm_overrides(create_model_kwargs: dict) -> dict:
    """Config keys (dotted) for cm's create_model arguments of a fixture."""
    a, ints = create_model_kwargs, lambda s: tuple(int(v) for v in s.split(","))
    return {
        "data.image_size": a["image_size"], "data.class_conditional": a["class_cond"],
        "model.adm.model_channels": a["num_channels"],
        "model.adm.channel_mult": ints(a["channel_mult"]),
        "model.adm.num_res_blocks": a["num_res_blocks"],
        "model.adm.attention_resolutions": ints(a["attention_resolutions"]),
        "model.adm.num_head_channels": a["num_head_channels"],
        "model.adm.num_heads": a["num_heads"],
        "model.adm.use_scale_shift_norm": a["use_scale_shift_norm"],
        "model.adm.resblock_updown": a["resblock_updown"], "model.dtype": "float32",
    }  # fmt: skip


def _small(config):
    config.sampling.update(num_samples=2, batch_size=2)
    return config


def adm_config(meta: dict):
    config = cd_imagenet64.get_config("l2")
    config.update_from_flattened_dict(adm_overrides(meta["create_model_kwargs"]))
    return _small(config)


def jcm_config(spec: dict):
    config = cd_cifar10.get_config("l2")
    c = spec["config"]["model"]
    config.data.image_size = spec["config"]["data"]["image_size"]
    config.model.dtype = "float32"
    config.model.ncsnpp.update(
        nf=c["nf"],
        ch_mult=tuple(c["ch_mult"]),
        num_res_blocks=c["num_res_blocks"],
        attn_resolutions=tuple(c["attn_resolutions"]),
        fourier_scale=float(c["fourier_scale"]),
        embedding_type=c["embedding_type"],
        init_scale=float(c["init_scale"]),
    )
    return _small(config)


def _flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _sample_and_check(config, workdir, params, network):
    """--mode=sample on the converted dir, and the sampler's float output is finite."""
    out = sample.run_sample(config, workdir)
    d = config.data
    images = np.load(out)["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (2, d.image_size, d.image_size, 3)
    assert images.std() > 0
    ids = np.arange(2)
    labels = jnp.asarray(sample.sample_labels(config, ids))
    x = sample.make_sample_fn(config, network)(params, jax.random.key(0), ids, labels)
    assert np.isfinite(np.asarray(x)).all()


@pytest.fixture(scope="module", params=refdata.cases("adm"))
def adm(request, tmp_path_factory):
    files = request.param["files"]
    meta = json.loads(files[".json"].read_text())
    config = adm_config(meta)
    out = tmp_path_factory.mktemp(request.param["name"])
    ckpt_dir, count = convert.convert(config, source="cm-pt", checkpoint=files[".pt"], out=out)
    return dict(files=files, meta=meta, config=config, out=out, ckpt_dir=ckpt_dir, count=count)


def test_adm_conversion_samples_and_reproduces_model_output(adm):
    config, ref = adm["config"], np.load(adm["files"][".npz"])
    assert adm["count"] == adm["meta"]["num_parameters"]
    params, meta, step = checkpoints.load_params(adm["ckpt_dir"])
    assert step == 0 and meta["model"] == "adm"
    network = networks.build_network(config)
    y = jnp.asarray(ref["io/labels"]) if config.data.class_conditional else None
    x_in, c_noise = refdata.nhwc(ref["io/model_input"]), ref["io/t_input"]
    raw = jax.jit(lambda p: network.apply(p, x_in, c_noise, y, None))(params)
    want = refdata.nhwc(ref["io/model_output"])
    np.testing.assert_allclose(raw, want, rtol=0, atol=1e-4 * np.abs(want).max())
    _sample_and_check(config, adm["out"], params, network)


def test_adm_conversion_is_a_cd_teacher(adm, tmp_path):
    config = adm["config"].copy_and_resolve_references()
    with pytest.raises(ValueError, match="must be a diffusion model"):  # converted as a CD model
        config.training.teacher_checkpoint = str(adm["ckpt_dir"])
        network = networks.build_network(config)
        expected = checkpoints.param_fingerprint(sample.abstract_params(config, network))
        resume.load_teacher(config, network, expected)
    ckpt_dir, _ = convert.convert(  # an official EDM teacher is converted as what it is
        config, source="cm-pt", checkpoint=adm["files"][".pt"], out=tmp_path, method="edm"
    )
    config.training.teacher_checkpoint = str(ckpt_dir)
    network = networks.build_network(config)
    expected = checkpoints.param_fingerprint(sample.abstract_params(config, network))
    teacher = resume.load_teacher(config, network, expected)
    want = _flat(
        convert.read_params("cm-pt", adm["files"][".pt"], sample.abstract_params(config, network))
    )
    got = _flat(teacher)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_diffusers_folder_converts_to_the_same_params(adm, tmp_path):
    state = {k: v for k, v in np.load(adm["files"][".npz"]).items() if "/" not in k}
    dconfig = diffusers_config(adm["meta"])
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dconfig))
    write_safetensors(
        tmp_path / "unet" / "diffusion_pytorch_model.safetensors", to_diffusers(state, dconfig)
    )
    ckpt_dir, _ = convert.convert(
        adm["config"], source="diffusers", checkpoint=tmp_path / "unet", out=tmp_path / "out"
    )
    got, want = checkpoints.load_params(ckpt_dir)[0], checkpoints.load_params(adm["ckpt_dir"])[0]
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    config = adm["config"].copy_and_resolve_references()
    config.model.adm.num_head_channels = 32  # same shapes, other heads: caught from config.json
    with pytest.raises(ValueError, match="attention heads at 32 channels"):
        convert.convert(
            config, source="diffusers", checkpoint=tmp_path / "unet", out=tmp_path / "x"
        )


def test_wrong_config_names_the_first_mismatching_key(adm, tmp_path):
    config = adm["config"].copy_and_resolve_references()
    config.model.adm.model_channels = 64
    with pytest.raises(
        ValueError, match=r"network of this config .*: time_embed\.0\.weight: converted shape"
    ):
        convert.convert(config, source="cm-pt", checkpoint=adm["files"][".pt"], out=tmp_path)
    config = adm["config"].copy_and_resolve_references()
    config.data.class_conditional = not config.data.class_conditional
    label = (
        "state-dict key 'label_emb.weight' has no"
        if config.data.class_conditional is False
        else r"model parameters not in the state dict: \['label_emb/embedding'\]"
    )
    with pytest.raises(ValueError, match=label):
        convert.convert(config, source="cm-pt", checkpoint=adm["files"][".pt"], out=tmp_path)
    with pytest.raises(ValueError, match="fill model.name='ncsnpp'"):
        convert.convert(
            adm["config"], source="jcm", checkpoint=JCM["files"][".msgpack.xz"], out=tmp_path
        )
    with pytest.raises(FileExistsError, match="choose a fresh --out"):
        convert.convert(
            adm["config"], source="cm-pt", checkpoint=adm["files"][".pt"], out=adm["out"]
        )


def test_jcm_conversion_equals_the_npz_params_and_samples(tmp_path):
    spec = json.loads(JCM["files"][".json"].read_text())
    ref = np.load(JCM["files"][".npz"])
    config = jcm_config(spec)
    ckpt, count = convert.convert(
        config, source="jcm", checkpoint=JCM["files"][".msgpack.xz"], out=tmp_path / "ema"
    )
    assert count == spec["n_params"]
    params = checkpoints.load_params(ckpt)[0]
    got = _flat(params)
    want = {k[len("params/") :]: ref[k] for k in ref.files if k.startswith("params/")}
    assert got.keys() == want.keys()
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k]) for k in want)
    online, _ = convert.convert(
        config,
        source="jcm",
        checkpoint=JCM["files"][".msgpack.xz"],
        out=tmp_path / "online",
        jcm_tree="params",
    )
    online = _flat(checkpoints.load_params(online)[0])
    changed = {k for k in want if not np.array_equal(online[k], want[k])}
    assert changed == set(spec["checkpoint"]["grad_leaves"])
    _sample_and_check(config, tmp_path / "ema", params, networks.build_network(config))
    config.model.ncsnpp.nf = 32
    with pytest.raises(
        ValueError, match=r"AttnBlockpp_0/GroupNorm_0/bias: shape \(32,\), model expects \(64,\)"
    ):
        convert.convert(config, source="jcm", checkpoint=JCM["files"][".msgpack.xz"], out=tmp_path)


def test_command_line_converts_a_cm_checkpoint(tmp_path):
    case = next(c.values[0] for c in refdata.cases("adm") if c.id == "adm_tiny_uncond")
    meta = json.loads(case["files"][".json"].read_text())
    flags = [f"--config.{k}={v}" for k, v in adm_overrides(meta["create_model_kwargs"]).items()]
    cmd = [sys.executable, "-m", "consistency.convert", "--source=cm-pt", "--config",
           str(REPO / "configs" / "cd_imagenet64.py"), *flags,
           f"--checkpoint={case['files']['.pt']}", f"--out={tmp_path}"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{meta['num_parameters']:,} parameters" in out.stdout
    assert f"wrote {tmp_path / 'checkpoints'}" in out.stdout
    params, found, _ = checkpoints.load_params(tmp_path / "checkpoints")
    assert found["converted_from"]["source"] == "cm-pt"
    assert sum(np.size(v) for v in jax.tree.leaves(params)) == meta["num_parameters"]


def test_export_to_diffusers_round_trips_the_run(adm, tmp_path):
    # --to=diffusers: our run -> a ConsistencyModelPipeline folder -> back: the same params.
    config = adm["config"]
    folder = convert.export(config, workdir=str(adm["out"]), out=str(tmp_path / "hf"))
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    m = config.model
    assert scheduler["num_train_timesteps"] == config.sampling.steps
    assert (scheduler["sigma_min"], scheduler["sigma_max"], scheduler["rho"]) == (
        m.sigma_min, m.sigma_max, m.rho,
    )  # fmt: skip
    ckpt_dir, _ = convert.convert(
        config, source="diffusers", checkpoint=folder / "unet", out=tmp_path / "back"
    )
    got, want = checkpoints.load_params(ckpt_dir)[0], checkpoints.load_params(adm["ckpt_dir"])[0]
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    teacher = config.copy_and_resolve_references()
    teacher.training.loss = "edm"  # a denoiser: the pipeline would sample it wrongly
    with pytest.raises(ValueError, match="not a consistency model"):
        convert.export(teacher, workdir=str(adm["out"]), out=str(tmp_path / "no"))
