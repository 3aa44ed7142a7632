"""LCM end to end on Fashion-MNIST's latents: teacher and LCD on clothes, LCF to shoes and bags.

  python main.py --config=configs/vae_fashion.py --workdir=runs/vae_fashion
  python main.py --config=configs/latent_fashion.py --workdir=runs/latent_fashion --mode=encode
  python main.py --config=configs/lcd_latent_fashion.py:teacher \\
    --workdir=runs/lcd_latent_fashion_teacher
  python main.py --config=configs/lcd_latent_fashion.py:student --workdir=runs/lcd_latent_fashion
  python main.py --config=configs/lcd_latent_fashion.py:lcf --workdir=runs/lcd_latent_fashion_lcf

configs/lcd_latent_digits.py's stages (configs/_lcm.py) on configs/latent_fashion.py's 8x8x4
latents (one cache of every class): :teacher and :student learn the clothes (T-shirt, trouser,
pullover, dress, coat, shirt), :lcf adapts the student to the sandals, sneakers, bags and ankle
boots without a teacher. Steps and LCF's lr are starting points, not tuned.
"""

from configs import _lcm, latent_fashion

VARIANTS = _lcm.VARIANTS  # --config=FILE:ARG
SOURCE, TARGET = (0, 1, 2, 3, 4, 6), (5, 7, 8, 9)  # clothes; shoes and bags
RUNS = "runs/lcd_latent_fashion"


def _latent():
    config = latent_fashion.get_config()  # latent.vae = runs/vae_fashion, 8x8x4 latents
    config.latent.cache = "runs/latent_fashion/latents"  # latent_fashion's --mode=encode
    return config


def get_config(arg: str = "student"):
    return _lcm.stage(arg, _latent, source=SOURCE, target=TARGET, runs=RUNS)
