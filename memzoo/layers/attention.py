"""Causal softmax self-attention with RoPE, GQA, sliding window and a functional KV cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.norms import RMSNorm
from memzoo.layers.partitioning import dense
from memzoo.layers.rope import apply_rope, segment_positions

__all__ = ["Attention"]

_NEG_INF = float(jnp.finfo(jnp.float32).min)


class Attention(nnx.Module):
    """Multi-head causal softmax self-attention (Vaswani et al. 2017, "Attention Is All You Need").

    Per head h (query head h reads key/value head ``h // (num_heads // num_kv_heads)``: grouped
    query attention, Ainslie et al. 2023, "GQA"):
    ``o_t = sum_{s in A(t)} softmax_s(q_t . k_s / sqrt(Dh)) v_s`` with
    ``q = RoPE(W_q x), k = RoPE(W_k x), v = W_v x`` (RoPE: Su et al. 2021; positions times
    ``rope_scale``, linear Position Interpolation, Chen et al. 2023) and
    ``A(t) = {s <= t, s > t - window (if window > 0), s in the document of t}``;
    output ``y = W_o concat_h(o)``. With ``qk_norm`` an RMSNorm over the head dim (shared across
    heads) is applied to q and k before RoPE. Logits and softmax are computed in float32.

    Cache (functional, never stored on the module): ``{"k": [B, max_len, Hkv, Dh],
    "v": [B, max_len, Hkv, Dh], "pos": int32 scalar}`` from :meth:`init_cache`; ``k`` is stored
    after RoPE. ``pos`` is shared by the whole batch.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        window: int = 0,
        rope_theta: float = 10000.0,
        rope_scale: float = 1.0,
        qk_norm: bool = False,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a positive multiple of "
                f"num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if d_model % num_heads != 0:
                raise ValueError(
                    f"d_model ({d_model}) must be divisible by num_heads ({num_heads}) "
                    "when head_dim is not given"
                )
            head_dim = d_model // num_heads
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim ({head_dim}) must be even for RoPE")
        if window < 0:
            raise ValueError(f"window must be >= 0 (0 = full causal), got {window}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = window
        self.rope_theta = rope_theta
        self.rope_scale = rope_scale
        self.qk_norm = qk_norm
        self.dtype = dtype
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, num_heads * head_dim, **kw, **dense("embed", "heads"))
        self.k_proj = nnx.Linear(
            d_model, num_kv_heads * head_dim, **kw, **dense("embed", "kv_heads")
        )
        self.v_proj = nnx.Linear(
            d_model, num_kv_heads * head_dim, **kw, **dense("embed", "kv_heads")
        )
        self.o_proj = nnx.Linear(num_heads * head_dim, d_model, **kw, **dense("heads", "embed"))
        if qk_norm:
            nkw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, axis="head_dim")
            self.q_norm = RMSNorm(head_dim, **nkw)
            self.k_norm = RMSNorm(head_dim, **nkw)
        else:
            self.q_norm = None
            self.k_norm = None

    def init_cache(
        self, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.float32
    ) -> dict[str, jax.Array]:
        """Empty KV cache for ``batch_size`` sequences of at most ``max_len`` tokens."""
        shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "pos": jnp.zeros((), jnp.int32),
        }

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, positions, theta=self.rope_theta, scale=self.rope_scale)
        k = apply_rope(k, positions, theta=self.rope_theta, scale=self.rope_scale)
        return q, k, v

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q [B,T,H,Dh], k/v [B,S,Hkv,Dh], mask bool broadcastable to [B,T,S] -> [B,T,H,Dh]."""
        b, t, h, dh = q.shape
        hkv = k.shape[2]
        g = h // hkv
        qg = q.reshape(b, t, hkv, g, dh)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
        logits = logits.astype(jnp.float32) * (1.0 / math.sqrt(dh))
        logits = jnp.where(mask[:, None, None, :, :], logits, _NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
        return out.astype(self.dtype).reshape(b, t, h, dh)

    def _window_mask(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        """Causal (+ sliding window) mask from absolute query / key indices (broadcasting)."""
        mask = k_pos <= q_pos
        if self.window > 0:
            mask = mask & (k_pos > q_pos - self.window)
        return mask

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """Self-attention over ``x`` ``[B, T, d_model]``.

        Without cache: full causal attention over the sequence. With ``segment_ids`` ``[B, T]``
        (packed documents; a document starts wherever the id differs from the previous token's)
        tokens attend only within their own document and RoPE positions restart at 0 at each
        document start.

        With cache: ``x`` (``T >= 1``: a prompt prefill or a one-token decode) continues the
        cached sequence; its k/v are written at ``[pos, pos+T)``, queries at RoPE positions
        ``pos..pos+T-1`` attend causally (and within the window) over cache entries
        ``< pos+T``; the returned cache has ``pos + T``. Jittable with a traced ``pos``.
        It is the caller's responsibility that ``pos + T <= max_len``: under jit this cannot be
        checked and ``lax.dynamic_update_slice`` would clamp the write index, silently giving
        wrong results; when ``pos`` is concrete a ``ValueError`` is raised.
        ``segment_ids`` with a cache raise ``ValueError``.

        Returns:
          ``(y [B, T, d_model] in dtype, new_cache or None)``.
        """
        if segment_ids is not None and cache is not None:
            raise ValueError("Attention: segment_ids are not supported together with a cache")
        x = x.astype(self.dtype)
        b, t, _ = x.shape

        if cache is None:
            idx = jnp.arange(t, dtype=jnp.int32)
            if segment_ids is None:
                positions = jnp.broadcast_to(idx, (b, t))
                mask = self._window_mask(idx[:, None], idx[None, :])[None]  # [1, T, T]
            else:
                positions = segment_positions(segment_ids)  # [B, T]
                mask = self._window_mask(idx[:, None], idx[None, :])[None]
                # key s is in the document of query t iff t - pos_in_doc[t] <= s (given s <= t).
                doc_start = idx[None, :] - positions  # [B, T]
                mask = mask & (idx[None, None, :] >= doc_start[:, :, None])
            q, k, v = self._qkv(x, positions)
            o = self._attend(q, k, v, mask)
            return self.o_proj(o.reshape(b, t, -1)), None

        pos = jnp.asarray(cache["pos"], jnp.int32)
        max_len = cache["k"].shape[1]
        try:
            pos_val = int(pos)
        except (jax.errors.ConcretizationTypeError, TypeError):
            pos_val = None  # traced: cannot check
        if pos_val is not None and pos_val + t > max_len:
            raise ValueError(f"KV cache overflow: pos ({pos_val}) + T ({t}) > max_len ({max_len})")
        q_pos = pos + jnp.arange(t, dtype=jnp.int32)  # [T]
        positions = jnp.broadcast_to(q_pos, (b, t))
        q, k_new, v_new = self._qkv(x, positions)
        zero = jnp.zeros((), jnp.int32)
        k_cache = jax.lax.dynamic_update_slice(
            cache["k"], k_new.astype(cache["k"].dtype), (zero, pos, zero, zero)
        )
        v_cache = jax.lax.dynamic_update_slice(
            cache["v"], v_new.astype(cache["v"].dtype), (zero, pos, zero, zero)
        )
        k_pos = jnp.arange(max_len, dtype=jnp.int32)
        mask = self._window_mask(q_pos[:, None], k_pos[None, :])[None]  # [1, T, max_len]
        o = self._attend(q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), mask)
        y = self.o_proj(o.reshape(b, t, -1))
        return y, {"k": k_cache, "v": v_cache, "pos": pos + t}
