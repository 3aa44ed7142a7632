"""iCT on Fashion-MNIST's latents: a latent consistency model, offline, from scratch (no teacher).

  python main.py --config=configs/vae_fashion.py --workdir=runs/vae_fashion
  python main.py --config=configs/latent_fashion.py --workdir=runs/latent_fashion --mode=encode
  python main.py --config=configs/latent_fashion.py --workdir=runs/latent_fashion

The autoencoder of configs/vae_fashion.py (latent.vae = its workdir) maps the padded 32x32 images
to 8x8x4 latents of unit variance; the network models those (data.image_size and num_channels
describe the latent) and every grid, --mode=sample file and FID (the Fashion-MNIST classifier's
features) sees the decoded 32x32 images. The recipe is configs/latent_digits.py's: iCT (N 11 ->
161, RAdam 1e-3), sigma_data 0.5 as LCM kept it on unit-variance latents, and no clamping of the
denoised latents. --mode=encode encodes every class once; data.classes then picks a subset for
training and for the FID reference without encoding again.
"""

from configs import _fashion, _successors

STEPS = 1200


def get_config():
    config = _fashion.fashion()
    _successors.ict(config, steps=STEPS)
    config.training.end_scales = 160  # N = 11, 21, 41, 81, 161
    config.optim.lr = 1e-3
    config.latent.update(vae="runs/vae_fashion", image_size=32)
    config.data.update(image_size=8, num_channels=4)
    config.model.unet.update(channel_mult=(1, 2), attn_resolutions=(4,))  # 8x8 latents
    config.sampling.update(sigmas=(80.0, _successors.ICT_MID_SIGMA["cifar10"]), clip_denoised=False)
    config.eval.update(settings=("1", "sigma=80,0.821"), every_steps=STEPS)
    return config
