"""Titans (Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to Memorize at Test Time"): the
three ways of combining the neural long-term memory with attention, as mixers.

Every variant wraps one gradient memory (``model.titans_memory``, default ``titans_lmm``, with
the ``gm_*`` overrides) inside a :class:`MemoryLayer` (its own q/k/v projection, short conv,
SiLU, L2-normalised q and k, gates, gated RMSNorm and output projection), a softmax attention
(RoPE, GQA; ``model.attn_heads`` / ``attn_kv_heads``) and ``N_p = model.titans_persistent``
learnable persistent tokens ``P`` (an ``nnx.Param`` ``[N_p, d_model]``).

Memory as a Context (MAC, section 4.1), segments S^(n) of ``L = model.titans_segment`` tokens:

    h   = M*_{n-1}(q),  q = S^(n) W_Q             (eq. 21: read at the segment-start state)
    S~  = [P ; h ; S^(n)]                          (eq. 22)
    y   = Attn(S~)                                 (eq. 23)
    M_n = M_{n-1}(y)                               (eq. 24: y written into the memory)
    o   = y (x) M*_n(y)                            (eq. 25: read after the write)

Memory as a Gate (MAG, section 4.2) and as a Layer (MAL, section 4.3):

    MAG:  y = SW-Attn*([P ; x]),  o = y (x) M(x)   (eqs. 26-28)
    MAL:  y = M([P ; x]),         o = SW-Attn(y)   (eqs. 29-31)

Choices (ours, documented where they differ from a literal reading):

* Persistent tokens (all three) are keys/values every query attends to, projected by the
  attention's W_K / W_V, at RoPE distance 0 from every query (their logits use the unrotated
  q and k, since RoPE(q, t) . RoPE(k, t) = q . k), never masked by the window or by packed
  documents. They are initialised N(0, 1), the scale of the RMS-normalised mixer input. The
  memory itself does not see them (SPEC: "the memory over x"); read literally, the paper's
  eqs. 28 and 30 feed the memory [P ; x] too [unverified].
* MAC causality: taken literally, eq. 22 lets token t see h_s and x_s of later tokens s of its
  segment, and eq. 25 reads the memory after the whole segment is written. Here token t
  attends to all of P and to h_s, x_s for s <= t of its own segment only, and
  ``M*_n(y)_t`` is the memory's own output at t (read after writing y_1..y_t: the op's
  read-after-write, regime C chunks of ``model.chunk_size``). h_s and x_s share the RoPE
  position s (position within the segment); each segment is an independent attention, so
  ``attn_window`` does not apply to MAC.
* MAC: the memory's projections (in_proj, conv, features) are shared by its two input streams:
  the segment tokens x (for the retrieval query of eq. 21) and the attention output y (keys,
  values, gates and the query of eq. 24-25); each stream has its own causal conv history.
  h becomes a token through the memory layer's output path (gated RMSNorm with gate x W_g,
  W_o) and an RMSNorm; ``M*_n(y)`` goes through the same output path (gate y W_g). o = y * that,
  literally (eq. 25, no extra projection).
* MAG: eq. 28 with the paper's normalisation ("normalize the outputs y and M(x~) using
  learnable vector-valued weights, followed by a non-linearity"): o = W_O (RMSNorm(y) *
  sigmoid(RMSNorm(M(x)))), W_O initialised with ``init_std`` like every output projection.
* MAL: a memory sublayer then an attention sublayer, both residual (what "a layer" is in the
  stack; no FFN between): m = M(x), o = m + SW-Attn([P ; RMSNorm(x + m)]). The block adds o to
  its residual stream, so it sees x + m + attention, as two stacked sublayers would give.
* Sliding-window attention uses ``model.attn_window`` (0 = full causal attention).
* ``model.titans_detach`` (MAC, ours; off by default): truncated backpropagation through
  segments, as Transformer-XL stops the gradient into its cached previous segment. At each
  segment start the carried state is replaced by ``M_0 + stop_gradient(M_{n-1} - M_0)`` (M_0
  the memory's learned initial weights): the forward pass is unchanged, no gradient flows into
  earlier segments' writes, and M_0 keeps its gradient. Measured (experiments/README.md,
  titans_mac_stability): in mqar_zoo's failing MAC cells the outer gradient of the loss on a
  later segment is orders of magnitude larger than on the first; detaching keeps it at a
  stable run's scale for ~250 steps there, then it grows anyway, so it is not a fix.

Decoding. MAG / MAL carry ``{"attn": KV cache {"k", "v", "pos"} of max_len, "mem": the memory
layer's cache}``. MAC carries ``{"conv": conv tail of the x stream, "conv_y": of the y stream,
"state": memory state, "state0": the state at the current segment's start, "k"/"v": the
current segment's keys/values [B, 2L, Hkv, Dh] (h then x), "pos": tokens seen}``. With a
concrete ``pos`` a call of T tokens runs segment-parallel (the first partial segment, full
segments under ``lax.scan``, a partial tail); with a traced ``pos`` (inside jit) it runs token by
token (``lax.scan`` over tokens; the memory's ``step``). Both equal the full forward.
Packed documents (segment_ids, no cache): MAG and MAL pass them to the memory layer and the
attention. MAC keeps one segment grid per row and never lets documents interact: attention is
masked to the token's document, the memory resets at a document start (the op's reset, also
when the document starts on a segment boundary), a document that starts inside a segment
retrieves h from the reset weights, and the y stream's conv does not cross documents.
choice: packed equals alone when documents start at multiples of L (and of the memory chunk
C); a document starting elsewhere sees a shorter first segment (the same kind of choice as
the gradient memory's chunk grid).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from memzoo.layers.attention import Attention
from memzoo.layers.memory_layer import MemoryLayer
from memzoo.layers.norms import RMSNorm
from memzoo.layers.partitioning import dense, param
from memzoo.layers.rope import apply_rope, segment_positions

Array = jax.Array

TITANS_KINDS = ("titans_mac", "titans_mag", "titans_mal")

__all__ = [
    "TITANS_KINDS",
    "PersistentAttention",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "build_titans",
]

_NEG_INF = float(jnp.finfo(jnp.float32).min)


def _concrete_int(x: Any) -> int | None:
    """``int(x)`` when ``x`` is not traced, else None."""
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def _tree_select(cond: Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda u, w: jnp.where(cond, u, w), a, b)


# --------------------------------------------------------------------------------------------
# Attention with persistent tokens
# --------------------------------------------------------------------------------------------


class PersistentAttention(Attention):
    """:class:`Attention` whose every query also attends to ``num_persistent`` learnable tokens
    P (Titans' persistent memory): ``softmax over [P W_K ; keys]``, the persistent logits
    taken without rotation (RoPE distance 0), outside any window or document mask.

    The call and cache are those of :class:`Attention` (cache ``{"k", "v", "pos"}``)."""

    def __init__(self, *args: Any, num_persistent: int = 0, rngs: nnx.Rngs, **kwargs: Any):
        super().__init__(*args, rngs=rngs, **kwargs)
        if num_persistent < 0:
            raise ValueError(f"num_persistent must be >= 0, got {num_persistent}")
        self.num_persistent = num_persistent
        if num_persistent:
            self.persistent = param(
                nnx.initializers.normal(1.0)(
                    rngs.params(),
                    (num_persistent, self.d_model),
                    kwargs.get("param_dtype", jnp.float32),
                ),
                "persistent",
                "embed",
            )
        else:
            self.persistent = None

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """Unrotated q [B,T,H,Dh], k, v [B,T,Hkv,Dh] (after the optional qk norm)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def rope(self, x: Array, positions: Array) -> Array:
        return apply_rope(x, positions, theta=self.rope_theta, scale=self.rope_scale)

    def persistent_kv(self) -> tuple[Array, Array] | None:
        """(k, v) of the persistent tokens, [N_p, Hkv, Dh] each, or None."""
        if self.persistent is None:
            return None
        p = self.persistent[...].astype(self.dtype)[None]
        _, k, v = self.project(p)
        return k[0], v[0]

    def attend(self, q_raw: Array, q: Array, k: Array, v: Array, mask: Array) -> Array:
        """Queries q (rotated) / q_raw (unrotated) [B,T,H,Dh] over the persistent tokens and
        keys k, v [B,S,Hkv,Dh] under ``mask`` (bool, broadcastable to [B,T,S]) -> [B,T,H,Dh]."""
        b, t, h, dh = q.shape
        hkv = k.shape[2]
        g = h // hkv
        scale = 1.0 / math.sqrt(dh)
        logits = (
            jnp.einsum(
                "btkgd,bskd->bkgts",
                q.reshape(b, t, hkv, g, dh),
                k,
                preferred_element_type=jnp.float32,
            ).astype(jnp.float32)
            * scale
        )
        logits = jnp.where(mask[:, None, None, :, :], logits, _NEG_INF)
        vals = v
        pkv = self.persistent_kv()
        if pkv is not None:
            pk, pv = pkv
            lp = (
                jnp.einsum(
                    "btkgd,pkd->bkgtp",
                    q_raw.reshape(b, t, hkv, g, dh),
                    pk.astype(q_raw.dtype),
                    preferred_element_type=jnp.float32,
                ).astype(jnp.float32)
                * scale
            )
            logits = jnp.concatenate([lp, logits], axis=-1)
            vals = jnp.concatenate(
                [jnp.broadcast_to(pv[None].astype(v.dtype), (b,) + pv.shape), v], 1
            )
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum(
            "bkgts,bskd->btkgd", probs, vals.astype(self.dtype), preferred_element_type=jnp.float32
        )
        return out.astype(self.dtype).reshape(b, t, h, dh)

    def __call__(
        self,
        x: Array,
        *,
        segment_ids: Array | None = None,
        cache: dict[str, Array] | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        """As :meth:`Attention.__call__` (window, packed documents, KV cache), plus P."""
        if segment_ids is not None and cache is not None:
            raise ValueError("Attention: segment_ids are not supported together with a cache")
        x = x.astype(self.dtype)
        b, t, _ = x.shape
        q_raw, k, v = self.project(x)
        if cache is None:
            idx = jnp.arange(t, dtype=jnp.int32)
            mask = self._window_mask(idx[:, None], idx[None, :])[None]  # [1, T, T]
            if segment_ids is None:
                positions = jnp.broadcast_to(idx, (b, t))
            else:
                positions = segment_positions(segment_ids)
                doc_start = idx[None, :] - positions
                mask = mask & (idx[None, None, :] >= doc_start[:, :, None])
            q, k = self.rope(q_raw, positions), self.rope(k, positions)
            o = self.attend(q_raw, q, k, v, mask)
            return self.o_proj(o.reshape(b, t, -1)), None

        pos = jnp.asarray(cache["pos"], jnp.int32)
        max_len = cache["k"].shape[1]
        pos_val = _concrete_int(pos)
        if pos_val is not None and pos_val + t > max_len:
            raise ValueError(f"KV cache overflow: pos ({pos_val}) + T ({t}) > max_len ({max_len})")
        q_pos = pos + jnp.arange(t, dtype=jnp.int32)
        positions = jnp.broadcast_to(q_pos, (b, t))
        q, k = self.rope(q_raw, positions), self.rope(k, positions)
        zero = jnp.zeros((), jnp.int32)
        k_cache = lax.dynamic_update_slice(
            cache["k"], k.astype(cache["k"].dtype), (zero, pos, zero, zero)
        )
        v_cache = lax.dynamic_update_slice(
            cache["v"], v.astype(cache["v"].dtype), (zero, pos, zero, zero)
        )
        k_pos = jnp.arange(max_len, dtype=jnp.int32)
        mask = self._window_mask(q_pos[:, None], k_pos[None, :])[None]
        o = self.attend(q_raw, q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), mask)
        y = self.o_proj(o.reshape(b, t, -1))
        return y, {"k": k_cache, "v": v_cache, "pos": pos + t}


# --------------------------------------------------------------------------------------------
# Pieces of the memory layer, for MAC's two streams
# --------------------------------------------------------------------------------------------


def _memory_inputs(
    layer: MemoryLayer,
    src: Array,
    conv_cache: dict | None = None,
    segment_ids: Array | None = None,
):
    """in_proj -> short conv -> SiLU -> features: (q, k, v, gates, new conv cache), as in
    :meth:`MemoryLayer.__call__`. The conv carries ``conv_cache`` and/or masks documents:
    with both, ``segment_ids`` [B, K-1+T] covers the cached tail and the new tokens."""
    h = layer.in_proj(src)
    if layer.conv is not None:
        if segment_ids is not None and conv_cache is not None:
            tail = conv_cache["conv"]
            hp = jnp.concatenate([tail.astype(h.dtype), h], axis=1)
            h = layer.conv(hp, segment_ids=segment_ids)[0][:, tail.shape[1] :]
            conv_cache = {"conv": hp[:, hp.shape[1] - tail.shape[1] :].astype(tail.dtype)}
        else:
            h, conv_cache = layer.conv(h, segment_ids=segment_ids, cache=conv_cache)
    h = jax.nn.silu(h)
    q, k, v = layer._split(h)
    q, k, v, gates = layer.memory.features(src, q, k, v)
    return q, k, v, gates, conv_cache


def _reset_rows(cond: Array, fresh: dict, state: dict) -> dict:
    """The memory state of rows where ``cond`` [B] holds replaced by ``fresh`` (a document
    starts: the reset weights, no momentum, an empty window), keeping the chunk position: what
    the op does at a change of segment id."""
    out = jax.tree.map(
        lambda f, s: jnp.where(cond.reshape((-1,) + (1,) * (s.ndim - 1)), f, s), fresh, state
    )
    out["pos"] = state["pos"]
    return out


def _detach_state(state: dict, init: dict) -> dict:
    """``init + stop_gradient(state - init)`` leaf by leaf: the value of ``state``, with no
    gradient into whatever wrote it; the initial weights ``init`` (the memory's parameters)
    keep the identity path, so a fresh state passes through unchanged."""

    def one(s: Array, i: Array) -> Array:
        if not jnp.issubdtype(s.dtype, jnp.inexact):
            return s
        return i + lax.stop_gradient(s - i)

    return jax.tree.map(one, state, init)


def _memory_output(layer: MemoryLayer, o: Array, src: Array) -> Array:
    """Memory output o [B,T,H,dv] -> d_model through the layer's (gated) norm and W_o, the gate
    computed from ``src``."""
    B, T = o.shape[:2]
    H, dv = layer.num_heads, layer.dv
    o = o.astype(layer.dtype)
    if layer.use_output_gate:
        o = layer.out_norm(o, layer.g_proj(src).reshape(B, T, H, dv))
    else:
        o = layer.out_norm(o)
    return layer.o_proj(o.reshape(B, T, H * dv))


def _memory_layer(memory: str, d_model: int, layer_kw: dict) -> MemoryLayer:
    from memzoo.memories.gradient import GradientMemory

    layer = MemoryLayer(memory, d_model=d_model, **layer_kw)
    if not isinstance(layer.memory, GradientMemory):
        raise ValueError(f"Titans: the memory must be a gradient memory, got {memory!r}")
    return layer


# --------------------------------------------------------------------------------------------
# The three variants
# --------------------------------------------------------------------------------------------


class TitansMAC(nnx.Module):
    """Memory as a Context (Titans eqs. 21-25); see the module docstring for the choices."""

    def __init__(
        self,
        *,
        d_model: int,
        attn_heads: int,
        attn_kv_heads: int | None = None,
        segment: int = 512,
        detach: bool = False,
        num_persistent: int = 16,
        memory: str = "titans_lmm",
        rope_theta: float = 10000.0,
        rope_scale: float = 1.0,
        norm_eps: float = 1e-6,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **layer_kw: Any,
    ):
        if segment < 1:
            raise ValueError(f"TitansMAC: segment must be >= 1, got {segment}")
        self.segment = segment
        self.detach = detach
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mem = _memory_layer(memory, d_model, dict(norm_eps=norm_eps, **layer_kw, **kw))
        self.attn = PersistentAttention(
            d_model,
            attn_heads,
            attn_kv_heads or attn_heads,
            rope_theta=rope_theta,
            rope_scale=rope_scale,
            num_persistent=num_persistent,
            **kw,
        )
        self.h_norm = RMSNorm(d_model, eps=norm_eps, **kw)

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: Any = jnp.float32) -> dict:
        del max_len  # the attention never looks past the current segment
        state = self.mem.memory.init_state(batch_size)
        shape = (batch_size, 2 * self.segment, self.attn.num_kv_heads, self.attn.head_dim)
        cache: dict[str, Any] = {
            "state": state,
            "state0": state,
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "pos": jnp.zeros((), jnp.int32),
        }
        if self.mem.conv is not None:
            cache["conv"] = self.mem.conv.init_cache(batch_size, dtype)
            cache["conv_y"] = self.mem.conv.init_cache(batch_size, dtype)
        return cache

    def _segment(
        self, carry: dict, x: Array, qx: Array, r: int | Array, docs: dict | None = None
    ) -> tuple[Array, dict]:
        """Tokens x [B,m,d] at positions r..r+m-1 of one segment (r + m <= L; r a python int or
        a traced scalar); qx their retrieval queries. ``docs`` (packed rows, no cache, r = 0):
        ``doc`` [B,m] document index of each token, ``new`` [B] whether the segment's first token
        starts a document, ``conv`` [B,K-1+m] the indices for the y stream's conv. Returns
        (o [B,m,d], new carry)."""
        B, m, _ = x.shape
        L = self.segment
        memory, attn = self.mem.memory, self.attn
        mem = carry["state"]
        fresh = None
        if docs is not None:
            fresh = memory.init_state(B)
            mem = _reset_rows(docs["new"], fresh, mem)
        if self.detach and isinstance(r, int) and r == 0:
            mem = _detach_state(mem, memory.init_state(B) if fresh is None else fresh)
        if isinstance(r, int):
            mem0 = mem if r == 0 else carry["state0"]
        else:
            mem0 = _tree_select(r == 0, mem, carry["state0"])  # a segment starts here
        # eq. 21: retrieval at the segment-start state (the reset weights for a document that
        # starts inside the segment), as a token
        h = memory.read(qx, mem0)
        if docs is not None:
            late = docs["doc"] != docs["doc"][:, :1]
            h = jnp.where(late[:, :, None, None], memory.read(qx, fresh), h)
        h_tok = self.h_norm(_memory_output(self.mem, h, x))
        # eqs. 22-23: causal attention over [P ; h ; x] within the segment (and the document)
        r_arr = jnp.asarray(r, jnp.int32)
        pos = r_arr + jnp.arange(m, dtype=jnp.int32)
        q_raw, kx, vx = attn.project(x)
        _, kh, vh = attn.project(h_tok.astype(self.dtype))
        q, kx, kh = attn.rope(q_raw, pos), attn.rope(kx, pos), attn.rope(kh, pos)
        zero = jnp.zeros((), jnp.int32)
        kbuf, vbuf = carry["k"], carry["v"]
        kbuf = lax.dynamic_update_slice(kbuf, kh.astype(kbuf.dtype), (zero, r_arr, zero, zero))
        kbuf = lax.dynamic_update_slice(kbuf, kx.astype(kbuf.dtype), (zero, r_arr + L, zero, zero))
        vbuf = lax.dynamic_update_slice(vbuf, vh.astype(vbuf.dtype), (zero, r_arr, zero, zero))
        vbuf = lax.dynamic_update_slice(vbuf, vx.astype(vbuf.dtype), (zero, r_arr + L, zero, zero))
        k_pos = jnp.tile(jnp.arange(L, dtype=jnp.int32), 2)
        mask = (k_pos[None, :] <= pos[:, None])[None]  # [1, m, 2L]
        if docs is not None:
            d = jnp.pad(docs["doc"], ((0, 0), (0, L - m)), constant_values=-1)
            mask = mask & (jnp.tile(d, (1, 2))[:, None, :] == docs["doc"][:, :, None])
        o = attn.attend(q_raw, q, kbuf.astype(self.dtype), vbuf.astype(self.dtype), mask)
        y = attn.o_proj(o.reshape(B, m, -1))
        # eq. 24: write y; eq. 25: read after the write (token by token, causal)
        qy, ky, vy, gates, conv_y = _memory_inputs(
            self.mem, y, carry.get("conv_y"), None if docs is None else docs["conv"]
        )
        if m == 1 and docs is None:
            z, state = memory.step(
                qy[:, 0], ky[:, 0], vy[:, 0], {n: g[:, 0] for n, g in gates.items()}, mem
            )
            z = z[:, None]
        else:
            z, state = memory.parallel(
                qy,
                ky,
                vy,
                gates,
                initial_state=mem,
                segment_ids=None if docs is None else docs["doc"],
            )
        out = y * _memory_output(self.mem, z, y)
        new = {"state": state, "state0": mem0, "k": kbuf, "v": vbuf}
        if conv_y is not None:
            new["conv_y"] = conv_y
        return out, new

    def _run(self, carry: dict, x: Array, qx: Array, r: int) -> tuple[Array, dict]:
        """Segment-parallel: a first partial segment from offset r, full segments (scan), a
        partial tail."""
        B, T, d = x.shape
        L = self.segment
        outs, i = [], 0
        if r > 0:
            m0 = min(T, L - r)
            o, carry = self._segment(carry, x[:, :m0], qx[:, :m0], r)
            outs.append(o)
            i = m0
        n = (T - i) // L
        if n > 0:

            def seg_major(a):
                a = a[:, i : i + n * L]
                return jnp.swapaxes(a.reshape(B, n, L, *a.shape[2:]), 0, 1)

            def body(c, a):
                o, c = self._segment(c, a[0], a[1], 0)
                return c, o

            carry, os = lax.scan(body, carry, (seg_major(x), seg_major(qx)))
            outs.append(jnp.swapaxes(os, 0, 1).reshape(B, n * L, d))
            i += n * L
        if i < T:
            o, carry = self._segment(carry, x[:, i:], qx[:, i:], 0)
            outs.append(o)
        return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], carry

    def _run_padded(self, carry: dict, x: Array, qx: Array, doc: Array | None) -> Array:
        """No cache: T padded at the end to whole segments (harmless: causal, the final state
        is dropped), one ``lax.scan`` over them. ``doc`` [B,T]: document indices or None."""
        B, T, d = x.shape
        L = self.segment
        n = -(-T // L)
        pad = n * L - T
        docs = None
        if doc is not None:
            K1 = self.mem.conv.kernel_size - 1 if self.mem.conv is not None else 0
            doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")  # [B, nL]
            ext = jnp.pad(doc, ((0, 0), (K1, 0)), constant_values=-1)  # ids of the conv inputs
            starts = jnp.arange(n) * L
            prev = jnp.pad(doc, ((0, 0), (1, 0)), constant_values=-1)[:, starts]
            docs = {
                "doc": doc.reshape(B, n, L),
                "new": (doc[:, starts] != prev) & (starts > 0)[None, :],
                "conv": ext[:, starts[:, None] + jnp.arange(K1 + L)[None, :]],
            }
            if n == 1:
                docs = {"doc": doc[:, :T], "new": docs["new"][:, 0], "conv": ext[:, : K1 + T]}
            else:
                docs = {k: jnp.moveaxis(v, 1, 0) for k, v in docs.items()}
        if n == 1:
            return self._segment(carry, x, qx, 0, docs)[0]

        def seg_major(a):
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            return jnp.swapaxes(a.reshape(B, n, L, *a.shape[2:]), 0, 1)

        def body(c, a):
            o, c = self._segment(c, a[0], a[1], 0, a[2])
            return c, o

        _, os = lax.scan(body, carry, (seg_major(x), seg_major(qx), docs))
        return jnp.swapaxes(os, 0, 1).reshape(B, n * L, d)[:, :T]

    def _run_tokens(self, carry: dict, x: Array, qx: Array, r: Array) -> tuple[Array, dict]:
        """Token by token from a traced segment offset r."""
        L = self.segment
        if x.shape[1] == 1:
            return self._segment(carry, x, qx, r)

        def body(c, a):
            c, r = c
            o, c = self._segment(c, a[0][:, None], a[1][:, None], r)
            return (c, (r + 1) % L), o[:, 0]

        (carry, _), os = lax.scan(body, (carry, r), (jnp.swapaxes(x, 0, 1), jnp.swapaxes(qx, 0, 1)))
        return jnp.swapaxes(os, 0, 1), carry

    def __call__(
        self, x: Array, *, segment_ids: Array | None = None, cache: dict | None = None
    ) -> tuple[Array, dict | None]:
        if segment_ids is not None and cache is not None:
            raise ValueError("TitansMAC: segment_ids are not supported together with a cache")
        x = x.astype(self.dtype)
        B, T, _ = x.shape
        qx, _, _, _, conv_x = _memory_inputs(
            self.mem, x, None if cache is None else cache.get("conv"), segment_ids
        )
        if cache is None:
            carry = self.init_cache(B, dtype=self.dtype)
            carry.pop("pos")
            carry.pop("conv", None)
            doc = None
            if segment_ids is not None:
                seg = jnp.asarray(segment_ids)
                change = jnp.concatenate(
                    [jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1
                )
                doc = jnp.cumsum(change.astype(jnp.int32), axis=1)
            return self._run_padded(carry, x, qx, doc), None
        carry = {k: v for k, v in cache.items() if k not in ("pos", "conv")}
        pos = jnp.asarray(cache["pos"], jnp.int32)
        pos_val = _concrete_int(pos)
        if pos_val is not None:
            o, carry = self._run(carry, x, qx, pos_val % self.segment)
        else:
            o, carry = self._run_tokens(carry, x, qx, pos % self.segment)
        new_cache = dict(carry, pos=pos + T)
        if conv_x is not None:
            new_cache["conv"] = conv_x
        return o, new_cache


class TitansMAG(nnx.Module):
    """Memory as a Gate (Titans eqs. 26-28): o = W_O (RMSNorm(y) * sigmoid(RMSNorm(M(x)))),
    y = sliding-window attention over [P ; x]; see the module docstring."""

    def __init__(
        self,
        *,
        d_model: int,
        attn_heads: int,
        attn_kv_heads: int | None = None,
        window: int = 0,
        num_persistent: int = 16,
        memory: str = "titans_lmm",
        rope_theta: float = 10000.0,
        rope_scale: float = 1.0,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **layer_kw: Any,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.attn = PersistentAttention(
            d_model,
            attn_heads,
            attn_kv_heads or attn_heads,
            window=window,
            rope_theta=rope_theta,
            rope_scale=rope_scale,
            num_persistent=num_persistent,
            **kw,
        )
        self.mem = _memory_layer(
            memory, d_model, dict(norm_eps=norm_eps, init_std=init_std, **layer_kw, **kw)
        )
        self.norm_y = RMSNorm(d_model, eps=norm_eps, **kw)
        self.norm_m = RMSNorm(d_model, eps=norm_eps, **kw)
        self.out_proj = nnx.Linear(
            d_model,
            d_model,
            use_bias=False,
            kernel_init=nnx.initializers.normal(init_std),
            **kw,
            **dense("mlp", "embed"),
        )

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
        return {
            "attn": self.attn.init_cache(batch_size, max_len, dtype),
            "mem": self.mem.init_cache(batch_size, max_len, dtype),
        }

    def __call__(
        self, x: Array, *, segment_ids: Array | None = None, cache: dict | None = None
    ) -> tuple[Array, dict | None]:
        y, c_attn = self.attn(
            x, segment_ids=segment_ids, cache=None if cache is None else cache["attn"]
        )
        m, c_mem = self.mem(
            x, segment_ids=segment_ids, cache=None if cache is None else cache["mem"]
        )
        o = self.out_proj(self.norm_y(y) * jax.nn.sigmoid(self.norm_m(m)))
        return o, None if cache is None else {"attn": c_attn, "mem": c_mem}


class TitansMAL(nnx.Module):
    """Memory as a Layer (Titans eqs. 29-31): m = M(x), o = m + SW-Attn([P ; RMSNorm(x + m)]);
    see the module docstring."""

    def __init__(
        self,
        *,
        d_model: int,
        attn_heads: int,
        attn_kv_heads: int | None = None,
        window: int = 0,
        num_persistent: int = 16,
        memory: str = "titans_lmm",
        rope_theta: float = 10000.0,
        rope_scale: float = 1.0,
        norm_eps: float = 1e-6,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **layer_kw: Any,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.mem = _memory_layer(memory, d_model, dict(norm_eps=norm_eps, **layer_kw, **kw))
        self.norm = RMSNorm(d_model, eps=norm_eps, **kw)
        self.attn = PersistentAttention(
            d_model,
            attn_heads,
            attn_kv_heads or attn_heads,
            window=window,
            rope_theta=rope_theta,
            rope_scale=rope_scale,
            num_persistent=num_persistent,
            **kw,
        )

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
        return {
            "mem": self.mem.init_cache(batch_size, max_len, dtype),
            "attn": self.attn.init_cache(batch_size, max_len, dtype),
        }

    def __call__(
        self, x: Array, *, segment_ids: Array | None = None, cache: dict | None = None
    ) -> tuple[Array, dict | None]:
        x = x.astype(self.dtype)
        m, c_mem = self.mem(
            x, segment_ids=segment_ids, cache=None if cache is None else cache["mem"]
        )
        u = self.norm(x + m.astype(x.dtype))
        y, c_attn = self.attn(
            u, segment_ids=segment_ids, cache=None if cache is None else cache["attn"]
        )
        return m + y, None if cache is None else {"mem": c_mem, "attn": c_attn}


def build_titans(kind: str, cfg: Any, layer_idx: int, *, dtype, param_dtype, rngs) -> nnx.Module:
    """The Titans mixer ``kind`` (one of :data:`TITANS_KINDS`) from a ``ModelConfig``."""
    from memzoo.config import gm_overrides
    from memzoo.models.lm import memory_layer_options

    if kind not in TITANS_KINDS:
        raise ValueError(f"unknown Titans variant {kind!r}; valid: {TITANS_KINDS}")
    common = dict(
        d_model=cfg.d_model,
        attn_heads=cfg.attn_heads,
        attn_kv_heads=cfg.attn_kv_heads or cfg.attn_heads,
        num_persistent=cfg.titans_persistent,
        memory=cfg.titans_memory,
        rope_theta=cfg.rope_theta,
        rope_scale=cfg.rope_scale,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **memory_layer_options(cfg, layer_idx),  # the memory layer and the memory
        gm_overrides=gm_overrides(cfg),
    )
    if kind == "titans_mac":
        return TitansMAC(segment=cfg.titans_segment, detach=cfg.titans_detach, **common)
    cls = TitansMAG if kind == "titans_mag" else TitansMAL
    return cls(window=cfg.attn_window, **common)
