"""sCM on ImageNet 64 (Lu & Song 2024, Table 4, size S): sCT (default) or sCD, bs 2048, 400k.

Starts from a TrigFlow teacher of this network (an edm run with model.parameterization=trigflow
and model.logvar_features=128): --config.training.teacher_checkpoint=RUNS/.../checkpoints.
The paper's EDM2 network, inverse-sqrt lr decay and post-hoc EMA are not reproduced: ADM here.
"""

from configs import _paper, _successors

VARIANTS = ("sct", "scd")  # --config=FILE:ARG


def get_config(kind: str = "sct"):
    config = _paper.imagenet64(_paper.new())
    _successors.scm(config, kind, p_mean=-1.0, p_std=1.6, steps=400000)
    config.model.dropout = 0.45 if kind == "sct" else 0.0  # sCT 45%, sCD 0% ...
    config.model.adm.dropout_resolution = 16  # ... at resolutions <= 16
    # lr 0.01 x the teacher's 1e-2 (size S); Adam beta2 0.99, eps 1e-11.
    config.optim.update(optimizer="adam", lr=1e-4, beta1=0.9, beta2=0.99, eps=1e-11, warmup_steps=0)
    return config
