"""Shared settings of the embedded digits configs (8x8, 1 channel, offline, 2 CPU cores)."""

from configs import base


def digits():
    config = base.get_config()
    config.data.update(name="digits", image_size=8, num_channels=1, random_flip=False)
    # In-memory records: one grain thread makes a batch in ~5 ms of CPU, four in ~10 (their
    # hand-offs), on the 2 cores the step's XLA threads use; the loop's prefetch thread already
    # overlaps it with the step. The stream does not depend on it (tests/test_data_stream.py).
    config.data.num_threads = 1
    config.model.name = "unet"
    config.model.unet.update(
        channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)
    )
    config.training.update(batch_size=128, log_every=100, snapshot_every=1000)
    # Runs of 500-2000 steps: with the warm-up the EMA forgets the initialisation (0.999^1000
    # would still weigh it 37%; for CD that is the teacher, whose one-step samples are blurs).
    config.training.update(ema_rates=(0.999,), ema_warmup=True)
    config.optim.update(optimizer="radam", lr=4e-4)
    config.sampling.update(grid_size=64, batch_size=256, num_samples=1024)
    # Digits FID: the digits classifier's features, reference = all 1,437 'train' images; 5,000
    # samples per setting, also every 500 steps while training (eval.every_steps).
    config.eval.update(
        features="digits",
        num_samples=5000,
        every_steps=500,
        reference_split="train",
        reference_limit=0,
        batch_size=256,
        chunk_size=2000,
    )
    return config
