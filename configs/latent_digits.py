"""iCT on the digits' latents: a latent consistency model, offline, from scratch (no teacher).

The first steps of the offline latent demonstration (issue 20):

  python main.py --config=configs/vae_digits.py --workdir=runs/vae_digits
  python main.py --config=configs/latent_digits.py --workdir=runs/latent_digits --mode=encode
  python main.py --config=configs/latent_digits.py --workdir=runs/latent_digits

The autoencoder of configs/vae_digits.py (latent.vae = its workdir) maps the 8x8 digits to
4x4x2 latents of unit variance; the network models those (data.image_size and num_channels
describe the latent), and every grid, --mode=sample file and FID sees the decoded 8x8 digits.
The recipe is configs/quick_digits.py's iCT (N 11 -> 161, RAdam 1e-3, 1,200 steps), with
sigma_data 0.5 as LCM kept it on Stable Diffusion's unit-variance latents, and no clamping of
the denoised latents (sampling.clip_denoised=False: they leave [-1, 1]).
"""

from configs import _digits, _successors

STEPS = 1200


def get_config():
    config = _digits.digits()
    _successors.ict(config, steps=STEPS)
    config.training.end_scales = 160  # N = 11, 21, 41, 81, 161
    config.optim.lr = 1e-3
    config.latent.update(vae="runs/vae_digits", image_size=8)
    config.data.update(image_size=4, num_channels=2)
    config.model.unet.attn_resolutions = (2,)  # 4x4 latents: the lower level attends
    config.sampling.update(sigmas=(80.0, _successors.ICT_MID_SIGMA["cifar10"]), clip_denoised=False)
    config.eval.update(settings=("1", "sigma=80,0.821"), every_steps=STEPS)
    return config
