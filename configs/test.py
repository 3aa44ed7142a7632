"""A tiny CT run on the digits for tests: a few steps of a very small UNet on CPU."""

from configs import base


def get_config():
    config = base.get_config()
    config.training.batch_size = 16
    config.training.num_steps = 4
    config.training.log_every = 2
    config.training.snapshot_every = 2
    config.training.scale_mode = "progressive"
    config.training.target_ema_mode = "adaptive"
    config.training.start_scales = 2
    config.training.end_scales = 10
    config.training.total_steps = 8  # K of N(k): fixed, so runs of any length share the curriculum
    config.training.start_ema = 0.9
    config.model.unet.channels = 8
    config.model.unet.channel_mult = (1, 2)
    config.model.unet.attn_resolutions = (4,)
    config.sampling.grid_size = 4
    config.sampling.batch_size = 4
    config.sampling.num_samples = 6
    config.eval.update(
        features="digits",
        num_samples=64,
        settings=("1", "0,22,39"),
        reference_limit=0,
        batch_size=32,
        chunk_size=32,
    )
    config.data.num_threads = 1
    return config
