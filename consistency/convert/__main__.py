"""python -m consistency.convert --source=S --checkpoint=PATH --config=configs/X.py --out=DIR."""

from absl import app, flags, logging
from ml_collections import config_flags

from consistency.convert import cli, jcm

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config whose network the checkpoint fills.")
flags.DEFINE_enum("source", None, list(cli.SOURCES), "Format of --checkpoint.")
flags.DEFINE_string(
    "checkpoint", None, "cm .pt file, jcm checkpoint (msgpack, raw or .xz) or diffusers folder."
)
flags.DEFINE_string("out", None, "Output dir: writes DIR/checkpoints (a --workdir for sampling).")
flags.DEFINE_enum("jcm_tree", "params_ema", list(jcm.PARAM_TREES), "jcm: which weights to take.")
flags.mark_flags_as_required(["config", "source", "checkpoint", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    ckpt_dir, count = cli.convert(
        FLAGS.config, source=FLAGS.source, checkpoint=FLAGS.checkpoint, out=FLAGS.out,
        jcm_tree=FLAGS.jcm_tree,
    )  # fmt: skip
    print(f"{FLAGS.config.model.name}: {count:,} parameters from {FLAGS.source} {FLAGS.checkpoint}")
    print(f"wrote {ckpt_dir} step 0 (params = target = EMA copy 0; no optimiser state)")
    path = config_flags.get_config_filename(FLAGS["config"])
    print(f"sample: python main.py --config={path} --workdir={FLAGS.out} --mode=sample")


if __name__ == "__main__":
    app.run(main)
