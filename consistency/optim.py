"""Optimisers as the references configure them: RAdam or Adam, constant lr, optional extras."""

import optax

OPTIMIZERS = ("radam", "adam")


def learning_rate_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """Constant lr, reached linearly from 0 over warmup_steps when warmup_steps > 0."""
    if warmup_steps > 0:
        return optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.constant_schedule(lr)


def make_optimizer(
    name: str,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """RAdam (the CM runs) or Adam (the EDM teacher), decoupled weight decay, optional clipping.

    The references' CM runs use RAdam(0.9, 0.999, 1e-8) with a constant learning rate and no
    warm-up or clipping; those stay off unless configured.
    """
    if name == "radam":
        scale = optax.scale_by_radam(b1=beta1, b2=beta2, eps=eps)
    elif name == "adam":
        scale = optax.scale_by_adam(b1=beta1, b2=beta2, eps=eps)
    else:
        raise ValueError(f"unknown optimizer: {name!r}; choose one of {OPTIMIZERS}")
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    chain.append(scale)
    if weight_decay > 0:
        chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(optax.scale_by_learning_rate(learning_rate_schedule(lr, warmup_steps)))
    return optax.chain(*chain)
