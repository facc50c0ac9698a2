"""Optimiser: AdamW with warmup + cosine / warmup-stable-decay schedules, clipping, masks."""

from __future__ import annotations

import jax
import optax

from memzoo.config import Config, OptimConfig


def lr_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine to ``min_lr_ratio * lr`` (``cosine``), a plateau followed by a
    linear decay over the last ``decay_fraction`` of training (``wsd``), or a constant."""
    total = max(total_steps, 1)
    warm = min(o.warmup_steps, total)
    end = o.lr * o.min_lr_ratio
    warmup = optax.linear_schedule(0.0 if warm else o.lr, o.lr, max(warm, 1))
    rest = max(total - warm, 1)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr_ratio)
    elif o.schedule == "wsd":
        decay = max(int(round(o.decay_fraction * rest)), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, end, decay)],
            [rest - decay],
        )
    else:
        after = optax.constant_schedule(o.lr)
    return optax.join_schedules([warmup, after], [warm])


def decay_mask(params) -> object:
    """Weight decay on matrices only: no decay on norms, biases, gate scalars (ndim < 2) and
    embeddings' neighbours of that kind."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    schedule = lr_schedule(o, cfg.steps)
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.adamw(
            schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
        ),
    )
    return tx, schedule
