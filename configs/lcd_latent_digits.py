"""LCM end to end on the digits' latents: latent teacher, latent guided CD (LCD), then LCF.

  python main.py --config=configs/vae_digits.py --workdir=runs/vae_digits
  python main.py --config=configs/latent_digits.py --workdir=runs/latent_digits --mode=encode
  python main.py --config=configs/lcd_latent_digits.py:teacher \
    --workdir=runs/lcd_latent_digits_teacher
  python main.py --config=configs/lcd_latent_digits.py:student --workdir=runs/lcd_latent_digits
  python main.py --config=configs/lcd_latent_digits.py:lcf --workdir=runs/lcd_latent_digits_lcf

Every stage reads the latent cache of configs/latent_digits.py (all ten classes encoded once by
the autoencoder of configs/vae_digits.py); data.classes picks the digits a stage sees. :teacher
(EDM, label dropout 0.1) and :student (guided CD from it) learn the digits 0-4; :lcf adapts the
student to the digits 5-9 by consistency training alone (no teacher), starting from the student's
checkpoint with its guidance embedding. Grids, samples and FID (of data.classes, the digits
classifier) see decoded 8x8 digits; the student's FID on 5-9 before LCF is --mode=eval of its run
with --config.data.classes='(5,6,7,8,9)'. Steps and LCF's lr are starting points, not tuned.
"""

from configs import _lcm, latent_digits

VARIANTS = _lcm.VARIANTS  # --config=FILE:ARG
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)  # the student's digits, LCF's new ones
RUNS = "runs/lcd_latent_digits"


def _latent():
    config = latent_digits.get_config()  # latent.vae = runs/vae_digits, 4x4x2 latents
    config.latent.cache = "runs/latent_digits/latents"  # latent_digits' --mode=encode
    return config


def get_config(arg: str = "student"):
    return _lcm.stage(arg, _latent, source=SOURCE, target=TARGET, runs=RUNS)
