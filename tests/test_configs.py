"""Every config builds and overrides only base keys; paper configs run one step on mock data."""

import importlib
import inspect
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import _paper, base
from consistency.experiment import methods, networks, sample, spec, train, train_state, update
from consistency.experiment.train_state import TrainState
from consistency.io import checkpoints, sharding

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
NAMES.remove("base")
# The offline CPU configs (digits, Fashion-MNIST) are validated here and trained elsewhere.
PAPER = [n for n in NAMES if not n.endswith(("digits", "fashion")) and n != "test"]
# The CM paper's experiments run one real step on mock data of their own dataset (~20-50 s each
# on CI). Its successors' (iCT, ECT, sCM, continuous-time) only trace one step and the sampler on
# digits-sized inputs (seconds); their numerics train on the digits configs in test_variants.py.
SUCCESSORS = [n for n in PAPER if n.split("_")[0] in ("ict", "ect", "scm", "continuous", "lcd")]
ORIGINAL = [n for n in PAPER if n not in SUCCESSORS]
SUCCESSOR_VARIANTS = [(n, None) for n in SUCCESSORS] + [
    ("scm_cifar10", "teacher"), ("continuous_cifar10", "ct-l2"), ("lcd_imagenet64", "teacher"),
]  # fmt: skip


def _variants(name):
    """The arguments a config file takes (its VARIANTS), or (None,) for none."""
    return getattr(importlib.import_module(f"configs.{name}"), "VARIANTS", (None,))


ALL = [(n, a) for n in NAMES for a in _variants(n)]


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _load(name, arg=None):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config() if arg is None else module.get_config(arg)


def _needs_teacher(config) -> bool:
    return methods.row(config.training.loss).needs_teacher or config.training.init_from_teacher


def test_every_argument_of_a_config_is_listed_in_its_variants():
    for name in NAMES:
        module = importlib.import_module(f"configs.{name}")
        params = inspect.signature(module.get_config).parameters
        if not params:
            assert not hasattr(module, "VARIANTS"), name
            continue
        (param,) = params.values()
        assert param.default in module.VARIANTS, name
        with pytest.raises(ValueError):  # an argument outside VARIANTS is refused
            module.get_config("no-such-variant")


def _same_type(value, default) -> bool:
    """The value has the default's type; an int may stand for a float (not the reverse)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    return type(value) is type(default) or (type(default) is float and type(value) is int)


def test_the_type_check_refuses_a_float_for_an_int_and_a_number_for_a_string():
    assert _same_type(2, 2.0) and _same_type((1,), ())
    assert not _same_type(2.0, 2) and not _same_type(1, "l2") and not _same_type(1, True)


@pytest.mark.parametrize("name, arg", ALL)
def test_config_overrides_only_base_keys_and_validates_in_every_mode(name, arg):
    config, defaults = _flat(_load(name, arg)), _flat(base.get_config())
    assert set(config) == set(defaults), set(config) ^ set(defaults)
    bad = [k for k, v in config.items() if not _same_type(v, defaults[k])]
    assert not bad, bad
    config = _load(name, arg)
    kind = methods.row(config.training.loss).samples_as
    modes = ["train"] if kind == "autoencoder" else ["train", "sample", "eval"]  # vae: trains only
    if kind == "consistency":
        if config.latent.vae:  # a latent model edits by 'interpolate' alone
            config.edit.task = "interpolate"
        modes.append("edit")
    if config.latent.vae:
        modes.append("encode")
    for mode in modes:  # the inputs (teachers, weights, images) are set on the command line
        spec.validate(config, mode=mode, num_devices=1)


@pytest.mark.parametrize("metric", ["l1", "l2", "lpips"])
def test_cd_cifar10_metric_argument(metric):
    config = importlib.import_module("configs.cd_cifar10").get_config(metric)
    assert config.training.distance == metric
    assert config.optim.lr == (2e-4 if metric == "l1" else 4e-4)


def _reduce(config):
    """Tiny network at 8x8, batch 8, one step, l2 (no LPIPS weights offline).

    The data pipeline is the config's own (tfds source or image folder, centre crop, flips);
    only the crop size shrinks, so that a CPU compiles and runs the step in seconds.
    """
    config.data.image_size = min(config.data.image_size, 8)
    config.model.ncsnpp.update(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    # ADM's middle block always attends: downsample to 8x8 first.
    levels = int(np.log2(config.data.image_size // 8)) + 1
    config.model.adm.update(
        model_channels=32,
        channel_mult=(1,) * levels,
        num_res_blocks=1,
        attention_resolutions=(),
        num_head_channels=-1,
        num_heads=1,
    )
    config.model.dtype = "float32"
    config.training.update(batch_size=8, num_steps=1, log_every=1, snapshot_every=1)
    if config.training.distance == "lpips":
        config.training.distance = "l2"
    config.sampling.update(grid_size=2, batch_size=2, ts=())
    config.data.num_threads = 1
    return config


def _write_teacher(config, directory):
    """A teacher checkpoint of the reduced network (EMA = a fresh init), as an EDM run writes."""
    network = networks.build_network(config)
    d = config.data
    x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels))
    params = network.init(jax.random.key(3), x, jnp.zeros((1,), jnp.int32))
    state = TrainState.create(params, train_state.optimizer(config), num_ema=1, with_target=False)
    meta = {
        "model": config.model.name,
        "params": checkpoints.param_fingerprint(sample.abstract_params(config, network)),
    }
    ckpt = checkpoints.Checkpointer(directory)
    ckpt.save(0, state, meta)
    ckpt.close()


def _to_digits(config):
    """The bundled 8x8 digits (labels 0-9 also suit a 1000-class model), reduced network."""
    config.data.update(name="digits", image_size=8, num_channels=1, random_flip=False)
    return _reduce(config)


@pytest.mark.parametrize("name", ORIGINAL)
def test_paper_config_runs_one_step_on_mock_data(name, tmp_path):
    config = _reduce(_load(name))
    if config.data.name == "image_folder":
        folder = tmp_path / "images"
        folder.mkdir()
        from PIL import Image

        rng = np.random.default_rng(0)
        for k in range(8):
            pixels = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"cat_{k:07d}.png")
        config.data.folder = str(folder)
    if config.data.name == "imagenet64":  # as python -m consistency.io.prepare writes it
        from PIL import Image

        folder, rng = tmp_path / "imagenet64", np.random.default_rng(1)
        folder.mkdir()
        for k, wnid in enumerate(["n01440764", "n01443537", "n15075141"] * 3):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{k:08d}.png")
        (folder / "prepared.json").write_text("{}")
        config.data.folder = str(folder)
    if _needs_teacher(config):
        _write_teacher(config, tmp_path / "teacher")
        config.training.teacher_checkpoint = str(tmp_path / "teacher")
    with tfds.testing.mock_data(num_examples=16):
        state = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 1
    leaves = jax.tree.leaves(state.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert (tmp_path / "run" / "samples" / "grid_0000001.png").exists()


@pytest.mark.parametrize("name, arg", SUCCESSOR_VARIANTS)
def test_successor_config_traces_one_step_and_sampler(name, arg):
    config = _to_digits(_load(name, arg))
    config.training.teacher_checkpoint = ""
    network, tx = networks.build_network(config), train_state.optimizer(config)
    mesh = sharding.make_mesh()
    state = update.abstract_state(config, network, tx, mesh)
    teacher = None
    if _needs_teacher(config):  # a guided student's teacher has no w input
        teacher = sample.abstract_params(config, network.unguided())
    step = update.train_step_for(config, network, tx, mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((1, 8, 8, 8, 1), jnp.float32),
        "label": jax.ShapeDtypeStruct((1, 8), jnp.int32),
    }
    distance = networks.distance_fn(config)
    new_state, metrics = jax.eval_shape(step, state, batch, teacher, distance, jax.random.key(0))
    assert metrics["loss"].shape == () and int(new_state.step.size) == 1
    assert jax.tree.structure(new_state.params) == jax.tree.structure(state.params)
    ids, labels = jnp.arange(2), jnp.zeros((2,), jnp.int32)
    images = jax.eval_shape(
        sample.make_sample_fn(config, network),
        state.ema_params[0],
        jax.random.key(0),
        ids,
        labels,
    )
    assert images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize("name, arg", ALL)
def test_fid_resize_protocol_is_the_one_of_the_config_table(name, arg):
    # CIFAR-10 (jcm): clean-fid's legacy_tensorflow; ImageNet-64 and LSUN (cm): the ADM
    # evaluator's TF1 resize; the digits use their own classifier (no resize protocol).
    config = _load(name, arg)
    want = {"cifar10": "clean_legacy", "imagenet64": "tf1", "lsun_bedroom": "tf1"}
    want["image_folder"] = "tf1"  # LSUN Cat from an image folder
    assert config.eval.resize == want.get(config.data.name, "torch"), name


@pytest.mark.parametrize("name, arg", ALL)
def test_lpips_pool_and_sampled_ema_follow_the_reference_lineage(name, arg):
    # ImageNet-64 and LSUN (the PyTorch cm code): piq's avg-pooled VGG, samples and FID from
    # the 0.9999432189950708 EMA; CIFAR-10 (jcm) and the digits (ADM or not): max pooling, the
    # first EMA.
    config = _load(name, arg)
    cm_lineage = config.model.name == "adm" and config.data.name != "digits"
    assert config.training.lpips_pool == ("avg" if cm_lineage else "max"), name
    rates = config.training.ema_rates
    want = rates.index(_paper.PAPER_EMA) if _paper.PAPER_EMA in rates else 0
    for section in (config.sampling, config.eval, config.edit):
        assert section.ema_index == want and section.ema_index < len(rates), name


def test_lcd_digits_teacher_then_guided_student_one_step_each(tmp_path):
    """The class-conditional teacher with label dropout (sampled with CFG), then the guided
    student from its checkpoint: one real step each on the digits; the student starts as the
    teacher plus a zero guidance projection and samples at any w through the pipeline."""
    from consistency.experiment.pipeline import ConsistencyPipeline

    runs = {}
    for variant in ("teacher", "student"):
        config = _reduce(_load("lcd_digits", variant))
        config.model.unet.update(channels=8, channel_mult=(1,), attn_resolutions=())
        config.eval.every_steps = 0
        if variant == "student":
            config.training.teacher_checkpoint = str(runs["teacher"] / "checkpoints")
        runs[variant] = tmp_path / variant
        state = train.train_and_evaluate(config, str(runs[variant]))
        assert int(state.step) == 1 and (runs[variant] / "samples" / "grid_0000001.png").exists()
    network, tx = networks.build_network(config), train_state.optimizer(config)
    teacher, _, _ = checkpoints.load_params(runs["teacher"] / "checkpoints", ema_index=0)
    start = update.init_state(config, network, tx, sharding.make_mesh(), teacher).params
    assert not np.any(np.asarray(start.pop("guidance_proj")["Dense_0"]["kernel"]))
    for got, want in zip(jax.tree.leaves(start), jax.tree.leaves(teacher), strict=True):
        np.testing.assert_array_equal(got, want)
    pipe = ConsistencyPipeline.from_workdir(runs["student"])
    images = pipe(batch_size=3, guidance_scale=3.0, output_type="np", seed=1)
    assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()
    labels = pipe._labels(None, jax.random.key(0), np.arange(512))
    assert labels.max() == 9  # never the null class 10
