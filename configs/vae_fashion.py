"""Fashion-MNIST's KL autoencoder (training.loss='vae'): 32x32x1 images -> 8x8x4 latents, CPU.

The first step of the offline latent demonstration (issue 20):

  apt-get install dataset-fashion-mnist   # once: the idx files, no network needed after
  python main.py --config=configs/vae_fashion.py --workdir=runs/vae_fashion

Diffusers' AutoencoderKL at Fashion-MNIST size: block_out_channels (16, 32, 32) are three levels,
two halvings, so the padded 32x32 images give 8x8 latents, as Stable Diffusion's VAE maps 256 px
to 32; 4 latent channels (SD's) make 256 numbers per image, a quarter of the 1,024 pixels. The
widths are small for 2 CPU cores. The loss is LDM's first stage without its GAN, as in
configs/vae_digits.py: l1 + vae_kl_weight x KL, LDM's 1e-6 per pixel sum scaled to our pixel mean
(x 1,024 ~ 1e-3). The run exports its EMA copy to WORKDIR/vae, which configs/latent_fashion.py
reads as latent.vae; its grids show 32 training images above their reconstructions.
"""

from configs import _fashion

STEPS = 2000


def get_config():
    config = _fashion.fashion()
    config.model.name = "autoencoder_kl"
    config.model.autoencoder_kl.update(
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8
    )
    config.training.update(
        loss="vae",
        distance="l1",
        vae_kl_weight=1e-3,
        batch_size=32,
        num_steps=STEPS,
        snapshot_every=STEPS // 2,
        ema_rates=(0.999,),
        ema_warmup=True,
    )
    config.optim.update(optimizer="adam", lr=1e-3)
    config.eval.every_steps = 0  # an autoencoder has no FID: latent_fashion's runs have one
    return config
