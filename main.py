"""Command line: python main.py --config=configs/NAME.py --workdir=DIR [--mode=MODE]."""

import importlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from consistency.experiment import cli, spec
from consistency.io import sharding

# --mode -> the module of consistency.experiment that runs it (its run(config, workdir)).
MODES = {
    "train": "train",
    "sample": "sample",
    "edit": "edit",
    "eval": "evaluate",
    "encode": "encode",
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum(
    "mode",
    "train",
    list(MODES),
    "train: train (resuming); sample: write samples; edit: --config.edit.* zero-shot edits; "
    "eval: FID etc. of --config.eval.* checkpoints and settings (resumable); encode: the "
    "dataset encoded once by --config.latent.vae into latent.cache (resumable).",
)
flags.DEFINE_enum(
    "distributed",
    "auto",
    ("auto", "on", "off"),
    "Multi-host jax.distributed.initialize. auto: when --coordinator_address, --num_processes or "
    "--process_id (or JAX_COORDINATOR_ADDRESS) is given, or a SLURM, Open MPI or multi-host TPU "
    "job is detected (JAX then finds the values); on: always; off: never.",
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..num_processes-1.")
flags.DEFINE_bool(
    "check",
    False,
    "Validate the config for --mode (every key, sampler and settings) and exit: "
    "no file is read, nothing runs (./launch.sh --check).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    if FLAGS.check:  # one device: the lines are checked, not the machine
        spec.validate(FLAGS.config, mode=FLAGS.mode, num_devices=None)
        print(f"ok: {FLAGS.mode} {flags.FLAGS['config'].config_filename}", flush=True)
        return
    sharding.initialize_distributed(
        FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    # A bad config: one line per key (cli.run prints spec.ConfigError), before anything runs.
    spec.validate(FLAGS.config, mode=FLAGS.mode, num_devices=jax.device_count())
    spec.check_paths(FLAGS.config, mode=FLAGS.mode, workdir=FLAGS.workdir)
    module = importlib.import_module(f"consistency.experiment.{MODES[FLAGS.mode]}")
    module.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
