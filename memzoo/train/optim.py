"""Optimiser: AdamW with warmup + cosine / warmup-stable-decay schedules, clipping, masks."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
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


SCHEDULE_KEYS = ("lr", "schedule", "warmup_steps", "min_lr_ratio", "decay_fraction")
"""The OptimConfig fields ``lr_schedule`` reads (with ``steps``)."""


def schedule_change(saved: dict[str, Any], cfg: Config, step: int) -> str | None:
    """How the learning rate of a run resumed at ``step`` departs from the schedule in its
    saved config.yaml (``saved``), or None when the rest of that schedule is unchanged.

    A cosine or wsd schedule decays over ``steps``, so raising ``steps`` to extend a run
    rebuilds the decay from the resume step on: the result is not a fresh run of the new
    length. A constant schedule past its warmup is unaffected by ``steps``."""
    names = {f.name for f in dataclasses.fields(OptimConfig)}
    saved_optim = {k: v for k, v in (saved.get("optim") or {}).items() if k in names}
    old_o = dataclasses.replace(OptimConfig(), **saved_optim)  # keys added later: defaults
    old_steps = int(saved.get("steps", cfg.steps))
    old, new = lr_schedule(old_o, old_steps), lr_schedule(cfg.optim, cfg.steps)
    end = max(min(old_steps, cfg.steps), step + 1)
    at = np.arange(step, end, dtype=np.int32)
    a, b = np.asarray(old(at)), np.asarray(new(at))
    differ = ~np.isclose(a, b, rtol=1e-6, atol=0.0)
    if not differ.any():
        return None
    i = int(np.argmax(differ))
    changed = [f"steps {old_steps} -> {cfg.steps}"] if old_steps != cfg.steps else []
    changed += [
        f"optim.{k} {getattr(old_o, k)} -> {getattr(cfg.optim, k)}"
        for k in SCHEDULE_KEYS
        if getattr(old_o, k) != getattr(cfg.optim, k)
    ]
    return (
        f"run '{cfg.run_name}' resumes at step {step} with a different learning-rate schedule "
        f"({', '.join(changed)}): at step {int(at[i])} it gives lr {b[i]:.3g} where the saved "
        f"one gave {a[i]:.3g}, so the resumed run is not the same as a fresh run of "
        f"{cfg.steps} steps (for that, train it under another run_name)"
    )
