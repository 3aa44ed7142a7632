"""The convert command: an official checkpoint -> our orbax checkpoint of the config's network,
and a run of ours -> a diffusers ConsistencyModelPipeline folder (--to=diffusers)."""

import pathlib

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from consistency.convert import cm_pt, diffusers, diffusers_export, jcm
from consistency.experiment import cli, methods, networks, paths, sample
from consistency.experiment.train_state import TrainState
from consistency.io import checkpoints, torch_pt

# source -> the model.name its checkpoints fill.
SOURCES = {"cm-pt": "adm", "jcm": "ncsnpp", "diffusers": "adm"}


def _heads(channels: int, num_head_channels: int, num_heads: int) -> int:
    return channels // num_head_channels if num_head_channels > 0 else num_heads


def _check_diffusers_heads(dconfig: dict, module) -> None:
    """Head counts shape no parameter, so compare them with the folder's config explicitly."""
    theirs = diffusers.adm_from_diffusers_config(dconfig)
    for mult in module.channel_mult:
        ch = module.model_channels * mult
        want = _heads(ch, theirs.num_head_channels, theirs.num_heads)
        got = _heads(ch, module.num_head_channels, module.num_heads)
        if want != got:
            raise ValueError(
                f"attention heads at {ch} channels: the diffusers folder has {want}, the config "
                f"{got}; set model.adm.num_head_channels / num_heads to match"
            )


def read_params(source: str, checkpoint: str, template, *, module=None, jcm_tree="params_ema"):
    """Converted float32 numpy params of `checkpoint`, filling `template` (shapes) exactly.

    Every checkpoint tensor must land on a parameter of equal shape and every parameter must be
    filled; the first mismatch raises an error naming the key. `module` (the config's network)
    lets diffusers folders also be checked for the head layout that shapes do not show.
    """
    if source == "cm-pt":
        state = _read(source, checkpoint, torch_pt.load_torch_state_dict, checkpoint)
        params = cm_pt.cm_state_dict_to_flax(state, template)["params"]
    elif source == "jcm":
        params = _read(source, checkpoint, jcm.load_jcm_params, checkpoint, which=jcm_tree)
    elif source == "diffusers":
        dconfig, state = _read(source, checkpoint, diffusers.read_diffusers_folder, checkpoint)
        if module is not None:
            _check_diffusers_heads(dconfig, module)
        cm_state = diffusers.diffusers_to_cm_state_dict(state, dconfig)
        params = cm_pt.cm_state_dict_to_flax(cm_state, template)["params"]
    else:
        raise ValueError(f"unknown source: {source!r}; choose one of {tuple(SOURCES)}")
    jcm.check_params(params, template)  # the same tree for every source, leaf by leaf
    params = _float32(params)
    bad = [k for k, v in _flat(params).items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"{checkpoint}: non-finite values in {bad[:5]}")
    return params


class UnreadableCheckpointError(ValueError):
    """The file is no checkpoint of its --source format (truncated, garbage, another format)."""


def _read(source: str, checkpoint: str, reader, *args, **kwargs):
    """reader(*args, **kwargs); any failure is the file's: name it and the format expected."""
    try:
        return reader(*args, **kwargs)
    except KeyError:  # jcm: the tree is missing, a question of fit
        raise
    except Exception as e:
        raise UnreadableCheckpointError(
            f"{checkpoint}: not a readable --source={source} checkpoint (truncated, corrupt or "
            f"another format: {type(e).__name__}: {str(e)[:200]})"
        ) from e


def _float32(tree):
    if isinstance(tree, dict):
        return {k: _float32(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}/{k}"))
    return out


def convert(
    config, *, source: str, checkpoint: str, out: str, jcm_tree="params_ema", method: str = ""
):
    """Write `checkpoint` (an official model) as step 0 of out/checkpoints in our format.

    The state holds the converted weights as params, target params and the single EMA copy (no
    optimiser state), with meta {model, params fingerprint} of the config's network: out works as
    --workdir of --mode=sample/edit and out/checkpoints as training.teacher_checkpoint.
    The meta records what the model is: `method` (a training.loss; '' = the config's), so an
    official EDM teacher (edm_*.pt) converted with a CD config is marked method='edm'. Every
    EMA copy of the config (training.ema_rates) holds the weights, so sampling.ema_index works.
    Returns (checkpoint dir, number of parameters).
    """
    method = method or config.training.loss
    methods.row(method)  # an unknown method fails here, naming the choices
    if source not in SOURCES:
        raise ValueError(f"unknown source: {source!r}; choose one of {tuple(SOURCES)}")
    if config.model.name != SOURCES[source]:
        raise ValueError(
            f"--source={source} checkpoints fill model.name={SOURCES[source]!r}, but the config "
            f"builds {config.model.name!r}"
        )
    if not pathlib.Path(checkpoint).exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    ckpt_dir = pathlib.Path(out) / "checkpoints"
    for parent in [ckpt_dir, *ckpt_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise FileExistsError(f"--out={out}: {parent} is a file; choose a fresh --out")
    if paths.checkpoint_steps(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds a checkpoint; choose a fresh --out")
    network = networks.build_network(config)
    template = sample.abstract_params(config, network)
    try:
        params = read_params(source, checkpoint, template, module=network.module, jcm_tree=jcm_tree)
    except UnreadableCheckpointError:
        raise
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"{checkpoint} does not fit the {config.model.name!r} network of this config (see "
            f"model.{config.model.name}.* and data.*): {e.args[0]}"
        ) from e
    writer = checkpoints.Checkpointer(ckpt_dir, max_to_keep=None)
    if writer.latest_step() is not None:
        raise FileExistsError(f"{ckpt_dir} already holds a checkpoint; choose a fresh --out")
    state = TrainState(
        step=np.zeros((), np.int32),
        params=params,
        target_params=params,
        ema_params=(params,) * len(config.training.ema_rates),
        opt_state=None,
    )
    meta = {
        "model": config.model.name,
        "params": checkpoints.param_fingerprint(template),
        "converted_from": {"source": source, "checkpoint": str(checkpoint)},
        # What the model is, as the config says (the loaders check it).
        "method": method,
        "samples_as": methods.row(method).samples_as,
        "parameterization": config.model.parameterization,
    }
    writer.save(0, state, meta)
    writer.close()
    return ckpt_dir, sum(v.size for v in _flat(params).values())


def export(config, *, workdir: str, out: str, step: int | None = None) -> pathlib.Path:
    """A run's checkpoint (the EMA copy sampling.ema_index) -> a diffusers folder that
    `ConsistencyModelPipeline.from_pretrained(out)` loads: unet/ (UNet2DModel config.json and
    float32 safetensors), scheduler/ (CMStochasticIterativeScheduler with the run's sigma_min,
    sigma_max, rho, sigma_data and N = sampling.steps, the grid diffusers' timesteps index) and
    model_index.json. The pipeline samples consistency models of the ADM network with the
    boundary scalings and c_noise = 250 ln sigma: anything else is refused."""
    t, m = config.training, config.model
    if m.name != "adm":
        raise ValueError(f"--to=diffusers: model.name={m.name!r}; diffusers' UNet2DModel is ADM's")
    if m.parameterization != "edm" or methods.row(t.loss).samples_as != "consistency":
        raise ValueError(
            f"--to=diffusers: training.loss={t.loss!r} with model.parameterization="
            f"{m.parameterization!r} is not a consistency model with the boundary scalings, "
            "which ConsistencyModelPipeline samples"
        )
    network = networks.build_network(config)
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    params, _, step = sample.load_checked(
        config, ckpt_dir, network, ema_index=config.sampling.ema_index, step=step
    )
    scheduler = dict(
        num_train_timesteps=config.sampling.steps, sigma_min=m.sigma_min,
        sigma_max=m.sigma_max, rho=m.rho, sigma_data=m.sigma_data,
    )  # fmt: skip
    d = config.data
    folder = diffusers_export.export_diffusers(
        jax.device_get(params), network.module, out, in_channels=d.num_channels,
        sample_size=d.image_size, scheduler=scheduler,
    )  # fmt: skip
    print(f"wrote {folder} from {ckpt_dir} step {step} (EMA copy {config.sampling.ema_index})")
    return pathlib.Path(folder)


def define_flags() -> None:
    """The command's flags (defined on demand: main.py defines its own --config)."""
    config_flags.DEFINE_config_file("config", None, "Config whose network the checkpoint fills.")
    flags.DEFINE_enum(
        "to",
        "ours",
        ["ours", "diffusers"],
        "ours: import --checkpoint; "
        "diffusers: export --workdir's checkpoint to a diffusers folder at --out.",
    )
    flags.DEFINE_string("workdir", None, "--to=diffusers: the run whose checkpoint is exported.")
    flags.DEFINE_integer("step", -1, "--to=diffusers: the checkpoint step (-1: the newest).")
    flags.DEFINE_enum("source", None, list(SOURCES), "Format of --checkpoint.")
    flags.DEFINE_string(
        "method",
        "",
        "What the checkpoint is, a training.loss ('' = the config's):"
        " edm for the official EDM teachers (edm_*.pt).",
    )
    flags.DEFINE_string(
        "checkpoint", None, "cm .pt file, jcm checkpoint (msgpack, raw or .xz) or diffusers folder."
    )
    flags.DEFINE_string(
        "out", None, "Output dir: writes DIR/checkpoints (a --workdir for sampling)."
    )
    flags.DEFINE_enum(
        "jcm_tree", "params_ema", list(jcm.PARAM_TREES), "jcm: which weights to take."
    )
    flags.mark_flags_as_required(["config", "out"])


def main(argv) -> None:
    """python -m consistency.convert: convert, then print the command that samples the result."""
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    if FLAGS.to == "diffusers":
        if not FLAGS.workdir:
            raise app.UsageError("--to=diffusers needs --workdir (the run to export)")
        step = None if FLAGS.step < 0 else FLAGS.step
        export(FLAGS.config, workdir=FLAGS.workdir, out=FLAGS.out, step=step)
        return
    if not FLAGS.source or not FLAGS.checkpoint:
        raise app.UsageError("--to=ours (import) needs --source and --checkpoint")
    ckpt_dir, count = convert(
        FLAGS.config,
        source=FLAGS.source,
        checkpoint=FLAGS.checkpoint,
        out=FLAGS.out,
        jcm_tree=FLAGS.jcm_tree,
        method=FLAGS.method,
    )
    print(f"{FLAGS.config.model.name}: {count:,} parameters from {FLAGS.source} {FLAGS.checkpoint}")
    print(f"wrote {ckpt_dir} step 0 (params = target = EMA copy 0; no optimiser state)")
    path = config_flags.get_config_filename(FLAGS["config"])
    overrides = cli.override_flags(config_flags.get_override_values(FLAGS["config"]))
    command = f"python main.py --config={path} --workdir={FLAGS.out} --mode=sample {overrides}"
    print(f"sample: {command.rstrip()}")
