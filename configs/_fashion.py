"""Shared settings of the Fashion-MNIST configs (32x32 after padding, 1 channel, offline, CPU).

The data come with Debian's dataset-fashion-mnist package (apt-get install
dataset-fashion-mnist: /usr/share/datasets/fashion-mnist), or any folder holding the four idx
.gz files (--config.data.folder). FID is measured in the features of a small Fashion-MNIST
classifier trained here once and cached (consistency/measure/digits.py, eval.features).
"""

from configs import base


def fashion():
    config = base.get_config()
    config.data.update(name="fashion_mnist", image_size=32, num_channels=1, random_flip=False)
    # In-memory records: one grain thread makes a batch in ~5 ms of CPU, four in ~10 (their
    # hand-offs), on the 2 cores the step's XLA threads use; the loop's prefetch thread already
    # overlaps it with the step. The stream does not depend on it (tests/test_data_stream.py).
    config.data.num_threads = 1
    config.model.name = "unet"
    config.model.unet.update(
        channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,)
    )
    config.training.update(batch_size=128, log_every=100, snapshot_every=1000)
    config.training.update(ema_rates=(0.999,), ema_warmup=True)
    config.optim.update(optimizer="radam", lr=4e-4)
    config.sampling.update(grid_size=64, batch_size=256, num_samples=1024)
    # FID in the Fashion-MNIST classifier's features, reference = the first 10,000 images of the
    # 'train' split (of data.classes when set: the split is shuffled, so every class is there);
    # 5,000 samples per setting. All 60,000 would make precision/recall's radii 36x dearer.
    config.eval.update(
        features="fashion_mnist",
        num_samples=5000,
        every_steps=1000,
        reference_split="train",
        reference_limit=10000,
        batch_size=250,
        chunk_size=2500,
    )
    return config
