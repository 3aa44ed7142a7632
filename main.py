"""Command line: python main.py --config=configs/NAME.py --workdir=DIR [--mode=train|sample]."""

from absl import app, flags, logging
from ml_collections import config_flags

from consistency import evaluate, train

MODES = ("train", "sample")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "train: train (resuming); sample: write samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        evaluate.run_sample(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
