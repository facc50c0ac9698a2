"""Rotary position embeddings and document-relative positions for packed sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["apply_rope", "segment_positions"]


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Index of each token within its document, for packed sequences.

    A document starts at position 0 and wherever the segment id differs from the previous
    token's id (``segment_ids[b, t] != segment_ids[b, t-1]``). Returns int32 ``[B, T]`` with
    ``pos[b, t] = t - (start of the document containing t)``.
    """
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {segment_ids.shape}")
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    starts = jnp.concatenate(
        [jnp.ones((b, 1), dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - last_start


def apply_rope(
    x: jax.Array, positions: jax.Array, *, theta: float = 10000.0, scale: float = 1.0
) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, "RoFormer"), rotate-half convention.

    With ``x = [x1, x2]`` split in halves along the head dim ``Dh`` and
    ``freq_i = theta^(-2i/Dh)``, ``angle = p * freq``:
    ``rope(x, p) = [x1 cos(angle) - x2 sin(angle), x2 cos(angle) + x1 sin(angle)]``.
    ``theta = 0`` means no positional encoding (NoPE, Kazemnejad et al. 2023): ``x`` is
    returned unchanged; in a hybrid the recurrent layers carry the order.

    ``scale`` multiplies the positions first: linear Position Interpolation (Chen et al. 2023,
    "Extending Context Window of Large Language Models via Positional Interpolation").
    ``scale = T_train / T`` keeps every rotation angle of a length-``T`` context inside the
    range seen when training at ``T_train``.

    Args:
      x: ``[B, T, H, Dh]`` with ``Dh`` even.
      positions: integer ``[B, T]`` (or ``[T]``, broadcast over the batch).
      theta: base of the frequencies; 0 = NoPE.
      scale: position multiplier (1 = plain RoPE).

    Returns:
      Rotated ``x`` in ``x.dtype`` (math in float32).
    """
    if theta == 0:
        return x
    dh = x.shape[-1]
    if dh % 2 != 0:
        raise ValueError(f"apply_rope needs an even head dim, got {dh}")
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]
    half = dh // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / dh))
    angle = (positions.astype(jnp.float32) * scale)[..., None] * inv_freq  # [B, T, half]
    cos = jnp.cos(angle)[:, :, None, :]  # [B, T, 1, half]
    sin = jnp.sin(angle)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
