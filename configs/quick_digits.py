"""A working consistency model from scratch in one command: iCT on the digits, ~5 min on 2 CPUs.

iCT (configs/ict_digits.py: mu = 0, pseudo-Huber, lognormal pairs, 1/dt weights) with the
curriculum and learning rate chosen for a 1,200-step run by measurement
(benchmarks/results/quick_digits_search_2026-12-04.md, 5,000 samples against the train split):
- N(k) 11 -> 161 (end_scales=160: 5 stages of 240 steps) instead of iCT's 11 -> 1281, which at
  this length doubles N every ~130 steps: 1-step FID 28.0 vs 38.9 (1,000 steps), 2-step 9.1
  vs 15.1; 11 -> 81 is worse (23.3 / 9.1 at lr 1e-3);
- RAdam lr 1e-3 instead of 4e-4: 19.7 / 7.6 vs 28.0 / 9.1;
- batch 128: 64 for 2,400 steps gives 17.7 / 8.1 but a step is only ~1.4x faster (6.7 vs
  4.7 steps/s at best), so it costs ~1.4x the time; ECT from scratch (q = 2 every 200 steps)
  is far behind at this length (91.8 / 37.1).
Measured (this file, 2 shared cores): 1-step digits FID 19.7, 2-step (sigma 80, 0.821) 7.6 (the
test split scores 11.2); 7.2 min wall including start-up and the final FID at 3.1 steps/s,
~5 min expected at the 4.7 steps/s of a quieter machine. On the quiet machine at commit 473d716:
4 min 46 s, 17.6 / 7.1 (README). The aim (10 / 5) is not met at 1,200 steps; iCT stretched to
20,000 steps reaches it at 11,000 (benchmarks/results/convergence_digits_2026-12-04_cb67930.md).
eval.every_steps = STEPS: both settings' FID is printed once, at the last step (~20 s).

--config=configs/quick_digits.py:adm trains the same recipe on an ADM network (cm's UNet) of the
same widths (32, 64; one res block a level; attention at 4x4 and in the middle, one 64-channel
head; scale-shift norm; residual up/down sampling): diffusers' UNet2DModel expresses it, so
`python -m consistency.convert --to=diffusers` exports the run, which it refuses for the small
UNet. 826,337 parameters vs the UNet's 701,345; a train step takes ~1.6x the UNet's (0.51 vs
0.31 s, alternating in one process on 2 shared cores: a ratio, not a speed). Measured (one run,
2 shared cores, with other jobs): 1-step FID 24.0, 2-step 13.7 (the UNet's 19.7 / 7.6), 15.8 min
wall; other sizes untried.
"""

from configs import _digits, _successors

STEPS = 1200
VARIANTS = ("unet", "adm")  # --config=FILE:ARG


def get_config(network: str = "unet"):
    if network not in VARIANTS:
        raise ValueError(f"unknown network: {network!r}; choose one of {VARIANTS}")
    config = _digits.digits()
    _successors.ict(config, steps=STEPS)
    config.training.end_scales = 160  # N = 11, 21, 41, 81, 161
    config.optim.lr = 1e-3
    config.sampling.sigmas = (80.0, _successors.ICT_MID_SIGMA["cifar10"])
    config.eval.update(settings=("1", "sigma=80,0.821"), every_steps=STEPS)
    if network == "adm":
        config.model.name = "adm"
        config.model.adm.update(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(4,),  # feature-map size, as the UNet's attn_resolutions
            num_head_channels=64,
            use_scale_shift_norm=True,
            resblock_updown=True,
        )
    return config
