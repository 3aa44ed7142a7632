"""The digits' KL autoencoder (training.loss='vae'): 8x8x1 digits -> 4x4x2 latents, on CPU.

Diffusers' AutoencoderKL at digits size: block_out_channels (32, 64) are two levels, one halving,
so the 8x8 digits need no padding (a third level would give 2x2 latents, too coarse for a UNet
with two levels); 2 latent channels make 32 numbers per image, half the 64 pixels. The loss is
LDM's first stage without its GAN: l1 + vae_kl_weight x KL. LDM weighs the KL 1e-6 against a
reconstruction summed over the pixels; ours is a pixel mean, so 1e-6 x 64 ~ 1e-4 is the same
balance. The run exports its EMA copy to WORKDIR/vae (a diffusers vae/ folder, scaling_factor =
1/std of the latent means), which configs/latent_digits.py reads as latent.vae. Its grids show
32 training digits above their reconstructions.
"""

from configs import _digits

STEPS = 2000


def get_config():
    config = _digits.digits()
    config.model.name = "autoencoder_kl"
    config.model.autoencoder_kl.update(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=2, norm_num_groups=16
    )
    config.training.update(
        loss="vae",
        distance="l1",
        vae_kl_weight=1e-4,
        num_steps=STEPS,
        snapshot_every=STEPS // 2,
        ema_rates=(0.999,),
        ema_warmup=True,
    )
    config.optim.update(optimizer="adam", lr=1e-3)
    config.eval.every_steps = 0  # an autoencoder has no FID: latent_digits' runs have one
    return config
