"""ECT on CIFAR-10 (Geng et al. 2024, locuslab/ect run_ecm.sh): tuned from the EDM teacher,
bs 128, RAdam 1e-4, dropout 0.2, no flips, q = 2 every 25k steps, c = 0, 400k steps.

--config.training.teacher_checkpoint=RUNS/edm_cifar10/checkpoints (the --transfer model; ECT
tunes EDM's DDPM++, here the edm_cifar10 NCSN++).
"""

from configs import _paper, _successors


def get_config():
    config = _paper.cifar10(_paper.new())
    # tick 12.8 kimg x double 250 = 3.2 Mimg = 25k steps of 128 per stage; README's 400k row.
    _successors.ect(config, q=2.0, huber_c=0.0, stage_steps=25000, steps=400000)
    config.data.random_flip = False  # --augment=0.0, no x-flips
    config.model.dropout = 0.2
    config.training.batch_size = 128
    config.training.ema_rates = (0.9999,)  # ct_train.py --ema_beta default
    config.optim.update(optimizer="radam", lr=1e-4, warmup_steps=0)
    config.sampling.sigmas = (80.0, _successors.ICT_MID_SIGMA["cifar10"])  # --mid_t 0.821
    return config
