"""LCD in pixel space on Fashion-MNIST's clothes: the latent demonstration's equal-compute control.

  python main.py --config=configs/lcd_fashion.py:teacher --workdir=runs/lcd_fashion_teacher
  python main.py --config=configs/lcd_fashion.py:student --workdir=runs/lcd_fashion

configs/lcd_latent_fashion.py's stages (configs/_lcm.py: the guided EDM teacher, guided CD with
skip 20 of 360 and w ~ U[0, 4] embedded, LCF) on the padded 32x32 images themselves, with
configs/_fashion.py's pixel UNet, on the same classes (SOURCE; :lcf adapts to TARGET).
benchmarks/lcm_fashion.py compares its student with the latent one at equal training FLOPs.
"""

from configs import _fashion, _lcm, lcd_latent_fashion

VARIANTS = _lcm.VARIANTS  # --config=FILE:ARG
SOURCE, TARGET = lcd_latent_fashion.SOURCE, lcd_latent_fashion.TARGET
RUNS = "runs/lcd_fashion"


def get_config(arg: str = "student"):
    return _lcm.stage(arg, _fashion.fashion, source=SOURCE, target=TARGET, runs=RUNS)
