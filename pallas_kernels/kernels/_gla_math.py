"""Chunk math and the custom-VJP wrapper shared by the GLA Pallas kernels (gla_tpu, gla_gpu).

SPEC regime A (Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with
Hardware-Efficient Training", ICML 2024), in the chunked form that flash-linear-attention's
``chunk_gla`` popularised (our own code). Per (batch, head), chunk of C tokens, state S0 [dk,dv]
at the chunk start, G_r = sum_{s<=r} log a_s the within-chunk cumulative log decay
(per channel [C,dk]; scalar decay broadcasts over dk; no decay is G = 0), Q = scale * q:

    A[r,s]  = sum_d Q_rd K_sd exp(G_rd - G_sd)            s <= r, same document
    O       = A V + (fs * Q e^G) S0                        fs_r: no reset in [chunk start, r]
    S_end   = dec * S0 + (es * K e^{G_C - G})^T V          es_s: s in the last token's document
    dec     = carry * e^{G_C}  (carry: no reset inside the chunk)

Every exponent evaluated is <= 0 for log a <= 0, so per-channel decays of any strength stay
finite: off-diagonal 16-row sub-chunk blocks rescale against a reference row (the last row
before the query sub-chunk, or the last row of the key sub-chunk), and the 16x16 diagonal
blocks are formed elementwise, one key (or query) row at a time, with pairwise differences.

Backward (given dO and dS_end, the gradient reaching the chunk's end state; Q, K scaled):

    dS0   = (fs * Q e^G)^T dO + dec * dS_end                   (reverse pass over chunks)
    dQ    = fs e^G (dO S0^T) + (dA * decay) K                   dA = dO V^T (masked)
    dK    = es e^{G_C - G} (V dS_end^T) + (dA * decay)^T Q
    dV    = A^T dO + (es K e^{G_C - G}) dS_end
    dG    = Q dQ - K dK,  and at the chunk's last row also
            sum_s (K dK_inter)_s + dec * rowsum(dS_end S0)      (the ``dgl`` row)

dlog_a is the reverse within-chunk cumsum of dG (done by XLA autodiff of the cumsum outside
the custom VJP). The kernels compute per-chunk pieces; the wrapper here pads, transposes to
[B,H,T,d], builds the document counters and the chunk decays, and wires the custom VJP:
forward kernel -> (y, final state); backward = state pass (chunk-start states [N,dk,dv],
recomputed, never saved by the forward) -> reverse dS pass -> parallel dq/dk/dv/dgl pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..ops._common import default_scale, f32, pad_time, segment_resets

F32 = jnp.float32
SUB = 16  # sub-chunk rows for per-channel decay (and the chunk granularity)
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Static configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: it is a custom_vjp nondiff argument)."""

    mode: str  # "none" | "scalar" | "channel"
    chunk: int
    n_chunks: int
    dk: int
    dv: int
    block_v: int
    scale: float
    seg: bool  # segment_ids given (document counters are passed to the kernels)
    dtype: Any  # dot operand dtype (the common input dtype)
    interpret: Any
    unroll: bool  # True: Python loops (TPU, static row offsets); False: lax.fori_loop (GPU)

    @property
    def nv(self) -> int:
        return self.dv // self.block_v

    @property
    def has_dec(self) -> bool:
        return self.mode != "none" or self.seg

    @property
    def precision(self):
        return lax.Precision.HIGHEST if jnp.dtype(self.dtype) == F32 else None


def mm(cfg: Config, a, b, ca: int = 1, cb: int = 0):
    """a . b contracting a's axis ``ca`` with b's axis ``cb``; operands in the input dtype,
    fp32 accumulation (fp32 inputs: full precision)."""
    return lax.dot_general(
        a.astype(cfg.dtype),
        b.astype(cfg.dtype),
        (((ca,), (cb,)), ((), ())),
        preferred_element_type=F32,
        precision=cfg.precision,
    )


def _emask(mask, x):
    """exp(x) where mask else 0, never exponentiating an unmasked positive value."""
    return jnp.exp(jnp.where(mask, x, NEG_INF))


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _loop(cfg: Config, n: int, body: Callable, init):
    if cfg.unroll:
        acc = init
        for i in range(n):
            acc = body(i, acc)
        return acc
    return lax.fori_loop(0, n, body, init)


# --------------------------------------------------------------------------------------------
# Loaders: the kernels hand the math a chunk view
# --------------------------------------------------------------------------------------------
#
# L.rows(name, start, size) -> [size, d] fp32 rows of the chunk (name in q, k, v, do, g for
#   per-channel decay [size, dk], gc (scalar decay column [size, 1]), cnt (document counter
#   column [size, 1])); start may be traced for GPU loaders.
# L.row(name) -> [1, C] row form of "g" (scalar decay) or "cnt".
# L.dec() -> [dk, 1] or [1, 1] chunk decay (dec above).
# L.rowsum_t(x [dk, bv]) -> [1, dk]: the row sums of x as a row vector.


def _counter(cfg: Config, L, start: int, size: int):
    """Document counter column [size, 1] (None without segment_ids)."""
    return L.rows("cnt", start, size) if cfg.seg else None


def _key_weight(cfg: Config, L, start: int, size: int):
    """es * exp(G_C - G) for rows [start, start + size): [size, dk|1] or None (= 1)."""
    c = cfg.chunk
    w = None
    if cfg.mode == "channel":
        w = jnp.exp(L.rows("g", c - 1, 1) - L.rows("g", start, size))
    elif cfg.mode == "scalar":
        w = jnp.exp(L.rows("gc", c - 1, 1) - L.rows("gc", start, size))
    if cfg.seg:
        es = L.rows("cnt", start, size) == L.rows("cnt", c - 1, 1)
        w = jnp.where(es, 1.0 if w is None else w, 0.0)
    return w


def _query_weight(cfg: Config, L, start: int, size: int):
    """fs * exp(G) for rows [start, start + size): [size, dk|1] or None (= 1)."""
    w = None
    if cfg.mode == "channel":
        w = jnp.exp(L.rows("g", start, size))
    elif cfg.mode == "scalar":
        w = jnp.exp(L.rows("gc", start, size))
    if cfg.seg:
        fs = L.rows("cnt", start, size) == 0.0
        w = jnp.where(fs, 1.0 if w is None else w, 0.0)
    return w


def _times(x, w):
    return x if w is None else x * w


def _dense_decay(cfg: Config, L):
    """[C,C] causal (same-document) decay matrix exp(G_r - G_s) for scalar / no decay."""
    c = cfg.chunk
    mask = _iota((c, c), 0) >= _iota((c, c), 1)
    if cfg.seg:
        mask = mask & (L.rows("cnt", 0, c) == L.row("cnt"))
    if cfg.mode == "scalar":
        return _emask(mask, L.rows("gc", 0, c) - L.row("g"))
    return mask.astype(F32)


def _q(cfg: Config, L, start: int, size: int):
    return L.rows("q", start, size) * cfg.scale


def state_update(cfg: Config, L, s0):
    """S_end = dec * S0 + (es K e^{G_C - G})^T V for one chunk (v block)."""
    c = cfg.chunk
    kw = _times(L.rows("k", 0, c), _key_weight(cfg, L, 0, c))
    ds = mm(cfg, kw, L.rows("v", 0, c), 0, 0)
    return (L.dec() * s0 if cfg.has_dec else s0) + ds


def dstate_update(cfg: Config, L, dse):
    """dS0 = (fs Q e^G)^T dO + dec * dS_end for one chunk (v block)."""
    c = cfg.chunk
    qw = _times(_q(cfg, L, 0, c), _query_weight(cfg, L, 0, c))
    d = mm(cfg, qw, L.rows("do", 0, c), 0, 0)
    return (L.dec() * dse if cfg.has_dec else dse) + d


# --------------------------------------------------------------------------------------------
# Per-channel diagonal 16x16 blocks (elementwise, exponents <= 0)
# --------------------------------------------------------------------------------------------


def _diag_rows_loop(cfg: Config, L, r0: int, gi, cnti, fn, init):
    """For each key row s of the sub-chunk at r0: E_s[r, d] = exp(G_rd - G_sd) for r >= s in
    the same document (else 0), [SUB, dk]; calls acc = fn(s, ks, E_s, acc)."""
    ridx = _iota((SUB, 1), 0)

    def body(s, acc):
        ks = L.rows("k", r0 + s, 1)
        mask = ridx >= s
        if cfg.seg:
            mask = mask & (cnti == L.rows("cnt", r0 + s, 1))
        e = _emask(mask, gi - L.rows("g", r0 + s, 1))
        return fn(s, ks, e, acc)

    return _loop(cfg, SUB, body, init)


def _diag_cols_loop(cfg: Config, L, r0: int, gj, cntj, fn, init):
    """For each query row r of the sub-chunk at r0: E'_r[s, d] = exp(G_rd - G_sd) for s <= r
    in the same document (else 0), [SUB, dk]; calls acc = fn(r, qr, E'_r, acc)."""
    sidx = _iota((SUB, 1), 0)

    def body(r, acc):
        qr = _q(cfg, L, r0 + r, 1)
        mask = sidx <= r
        if cfg.seg:
            mask = mask & (cntj == L.rows("cnt", r0 + r, 1))
        e = _emask(mask, L.rows("g", r0 + r, 1) - gj)
        return fn(r, qr, e, acc)

    return _loop(cfg, SUB, body, init)


def _onehot_lane(s, n=SUB):
    return (_iota((1, n), 1) == s).astype(F32)


def _lane(x, s):
    """Column s of x [m, SUB] as [m, 1]."""
    return jnp.sum(x * _onehot_lane(s, x.shape[1]), axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Forward chunk
# --------------------------------------------------------------------------------------------


def forward_chunk(cfg: Config, L, s0) -> list[tuple[int, jax.Array]]:
    """Outputs of one chunk (v block) as (row offset, rows [m, bv] fp32) pieces."""
    c = cfg.chunk
    if cfg.mode != "channel":
        q = _q(cfg, L, 0, c)
        a = mm(cfg, q, L.rows("k", 0, c), 1, 1) * _dense_decay(cfg, L)
        o = mm(cfg, a, L.rows("v", 0, c))
        o = o + mm(cfg, _times(q, _query_weight(cfg, L, 0, c)), s0)
        return [(0, o)]

    out = []
    for i in range(c // SUB):
        r0 = i * SUB
        qi = _q(cfg, L, r0, SUB)
        gi = L.rows("g", r0, SUB)
        cnti = _counter(cfg, L, r0, SUB)
        o = mm(cfg, _times(qi, _query_weight(cfg, L, r0, SUB)), s0)
        if i > 0:  # earlier sub-chunks, rescaled against row r0 - 1
            gref = L.rows("g", r0 - 1, 1)
            kt = L.rows("k", 0, c) * _emask(_iota((c, 1), 0) < r0, gref - L.rows("g", 0, c))
            a = mm(cfg, qi * jnp.exp(gi - gref), kt, 1, 1)  # [SUB, C]
            if cfg.seg:
                a = jnp.where(cnti == L.row("cnt"), a, 0.0)
            o = o + mm(cfg, a, L.rows("v", 0, c))

        def diag(s, ks, e, acc, qi=qi):
            return acc + jnp.sum(qi * ks * e, axis=1, keepdims=True) * _onehot_lane(s)

        aii = _diag_rows_loop(cfg, L, r0, gi, cnti, diag, jnp.zeros((SUB, SUB), F32))
        o = o + mm(cfg, aii, L.rows("v", r0, SUB))
        out.append((r0, o))
    return out


# --------------------------------------------------------------------------------------------
# Backward chunk (the parallel pass)
# --------------------------------------------------------------------------------------------


@dataclass
class ChunkGrads:
    dq: list  # (row offset, [m, dk]) gradients of the raw (unscaled) q, this v block's part
    dk: list  # (row offset, [m, dk])
    dv: list  # (row offset, [m, bv])
    dgl: Any  # [1, dk] extra dG of the chunk's last row, or None (no decay)


def backward_chunk(cfg: Config, L, s0, dse) -> ChunkGrads:
    """Gradients of one chunk (v block) from dO, the chunk-start state and dS_end."""
    if cfg.mode != "channel":
        return _backward_dense(cfg, L, s0, dse)
    return _backward_channel(cfg, L, s0, dse)


def _dgl_state_term(cfg: Config, L, s0, dse):
    return L.rowsum_t(L.dec() * dse * s0)


def _backward_dense(cfg: Config, L, s0, dse) -> ChunkGrads:
    c = cfg.chunk
    q, k = _q(cfg, L, 0, c), L.rows("k", 0, c)
    v, do = L.rows("v", 0, c), L.rows("do", 0, c)
    e = _dense_decay(cfg, L)
    qw = _query_weight(cfg, L, 0, c)
    kw = _key_weight(cfg, L, 0, c)
    a = mm(cfg, q, k, 1, 1) * e
    dp = mm(cfg, do, v, 1, 1) * e
    dq = mm(cfg, dp, k) + _times(mm(cfg, do, s0, 1, 1), qw)
    dk_inter = _times(mm(cfg, v, dse, 1, 1), kw)
    dk = mm(cfg, dp, q, 0, 0) + dk_inter
    dv = mm(cfg, a, do, 0, 0) + mm(cfg, _times(k, kw), dse)
    dgl = None
    if cfg.mode == "scalar":
        dgl = jnp.sum(k * dk_inter, axis=0, keepdims=True) + _dgl_state_term(cfg, L, s0, dse)
    return ChunkGrads([(0, dq * cfg.scale)], [(0, dk)], [(0, dv)], dgl)


def _backward_channel(cfg: Config, L, s0, dse) -> ChunkGrads:
    c = cfg.chunk
    ns = c // SUB
    dqs, dks, dvs = [], [], []

    # dq by query sub-chunk i (reference row r0 - 1 for the earlier key sub-chunks)
    for i in range(ns):
        r0 = i * SUB
        gi = L.rows("g", r0, SUB)
        doi = L.rows("do", r0, SUB)
        cnti = _counter(cfg, L, r0, SUB)
        dq = mm(cfg, doi, s0, 1, 1) * _query_weight(cfg, L, r0, SUB)
        if i > 0:
            gref = L.rows("g", r0 - 1, 1)
            kt = L.rows("k", 0, c) * _emask(_iota((c, 1), 0) < r0, gref - L.rows("g", 0, c))
            da = mm(cfg, doi, L.rows("v", 0, c), 1, 1)  # [SUB, C]
            if cfg.seg:
                da = jnp.where(cnti == L.row("cnt"), da, 0.0)
            dq = dq + jnp.exp(gi - gref) * mm(cfg, da, kt)
        daii = mm(cfg, doi, L.rows("v", r0, SUB), 1, 1)  # [SUB(r), SUB(s)]

        def diag_q(s, ks, e, acc, daii=daii):
            return acc + _lane(daii, s) * ks * e

        dq = _diag_rows_loop(cfg, L, r0, gi, cnti, diag_q, dq)
        dqs.append((r0, dq * cfg.scale))

    # dk, dv by key sub-chunk j (reference row: the sub-chunk's last row)
    dgl = _dgl_state_term(cfg, L, s0, dse)
    for j in range(ns):
        r0 = j * SUB
        kj, gj = L.rows("k", r0, SUB), L.rows("g", r0, SUB)
        vj, doj = L.rows("v", r0, SUB), L.rows("do", r0, SUB)
        cntj = _counter(cfg, L, r0, SUB)
        kw = _key_weight(cfg, L, r0, SUB)
        dk = mm(cfg, vj, dse, 1, 1) * kw
        dgl = dgl + jnp.sum(kj * dk, axis=0, keepdims=True)
        dv = mm(cfg, kj * kw, dse)
        if j < ns - 1:
            gref = L.rows("g", r0 + SUB - 1, 1)
            after = _iota((c, 1), 0) >= r0 + SUB
            qt = _q(cfg, L, 0, c) * _emask(after, L.rows("g", 0, c) - gref)  # [C, dk]
            kt = kj * jnp.exp(gref - gj)
            do = L.rows("do", 0, c)
            at = mm(cfg, kt, qt, 1, 1)  # [SUB(s), C(r)]
            dat = mm(cfg, vj, do, 1, 1)
            if cfg.seg:
                same = cntj == L.row("cnt")
                at = jnp.where(same, at, 0.0)
                dat = jnp.where(same, dat, 0.0)
            dv = dv + mm(cfg, at, do)
            dk = dk + jnp.exp(gref - gj) * mm(cfg, dat, qt)
        datjj = mm(cfg, vj, doj, 1, 1)  # [SUB(s), SUB(r)]

        def diag_k(r, qr, e, acc, kj=kj, datjj=datjj):
            dk, atjj = acc
            dk = dk + _lane(datjj, r) * qr * e
            atjj = atjj + jnp.sum(kj * qr * e, axis=1, keepdims=True) * _onehot_lane(r)
            return dk, atjj

        dk, atjj = _diag_cols_loop(cfg, L, r0, gj, cntj, diag_k, (dk, jnp.zeros((SUB, SUB), F32)))
        dv = dv + mm(cfg, atjj, doj)
        dks.append((r0, dk))
        dvs.append((r0, dv))
    return ChunkGrads(dqs, dks, dvs, dgl)


# --------------------------------------------------------------------------------------------
# XLA-side wrapper and custom VJP
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """The four kernel launchers of one backend; each takes (cfg, ...) canonical arrays:
    q, k, v [B,H,Tp,d] (input dtype), g [B,H,Tp,dk] / [B,H,Tp] fp32 or None, cnt [B,Tp] fp32
    or None, dec [B,H,N,dk|1,1] fp32 or None, s0 / states / dS [B,H,(N,)dk,dv] fp32.

    forward(cfg, q, k, v, g, cnt, dec, s0) -> (y [B,H,Tp,dv], final state)
    states(cfg, q, k, v, g, cnt, dec, s0) -> chunk-start states [B,H,N,dk,dv]
    reverse(cfg, q, g, cnt, dec, dy, ds_final) -> (dS_end per chunk [B,H,N,dk,dv], ds0)
    grads(cfg, q, k, v, g, cnt, dec, dy, states, dstates) ->
        (dq [NV,B,H,Tp,dk], dk [NV,...], dv [B,H,Tp,dv], dgl [NV,B,H,N,1,dk] or None)
    """

    forward: Callable
    states: Callable
    reverse: Callable
    grads: Callable


def chunk_decay(cfg: Config, g, cnt, batch: int, heads: int):
    """dec = carry * exp(G_C) per chunk: [B,H,N,dk,1], [B,H,N,1,1], or None."""
    if not cfg.has_dec:
        return None
    c, n = cfg.chunk, cfg.n_chunks
    if g is None:
        d = jnp.ones((batch, heads, n, 1), F32)
    elif g.ndim == 4:
        d = jnp.exp(g[:, :, c - 1 :: c, :])
    else:
        d = jnp.exp(g[:, :, c - 1 :: c])[..., None]
    if cnt is not None:
        carry = (cnt[:, c - 1 :: c] == 0.0).astype(F32)  # [B,N]
        d = d * carry[:, None, :, None]
    return d[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(backend: Backend, cfg: Config, q, k, v, g, s0, cnt):
    dec = chunk_decay(cfg, g, cnt, q.shape[0], q.shape[1])
    return backend.forward(cfg, q, k, v, g, cnt, dec, s0)


def _core_fwd(backend, cfg, q, k, v, g, s0, cnt):
    dec = chunk_decay(cfg, g, cnt, q.shape[0], q.shape[1])
    out = backend.forward(cfg, q, k, v, g, cnt, dec, s0)
    return out, (q, k, v, g, s0, cnt)


def _core_bwd(backend, cfg, res, cts):
    q, k, v, g, s0, cnt = res
    dy, dsf = cts
    b, h, tp, dk = q.shape
    dec = chunk_decay(cfg, g, cnt, b, h)
    dy = dy.astype(v.dtype)
    dsf = dsf.astype(F32)
    states = backend.states(cfg, q, k, v, g, cnt, dec, s0)
    dstates, ds0 = backend.reverse(cfg, q, g, cnt, dec, dy, dsf)
    dq, dk_, dv, dgl = backend.grads(cfg, q, k, v, g, cnt, dec, dy, states, dstates)
    dq = jnp.sum(dq, axis=0)
    dk_ = jnp.sum(dk_, axis=0)
    dg = None
    if g is not None:
        dg = f32(q) * dq - f32(k) * dk_  # [B,H,Tp,dk]
        dgl = jnp.sum(dgl, axis=0)[:, :, :, 0, :]  # [B,H,N,dk]
        c, n = cfg.chunk, cfg.n_chunks
        dg = dg.reshape(b, h, n, c, dk).at[:, :, :, c - 1, :].add(dgl).reshape(b, h, tp, dk)
        if g.ndim == 3:
            dg = jnp.sum(dg, axis=-1)
    dcnt = None if cnt is None else jnp.zeros_like(cnt)
    return (dq.astype(q.dtype), dk_.astype(k.dtype), dv.astype(v.dtype), dg, ds0, dcnt)


_core.defvjp(_core_fwd, _core_bwd)


def _heads_first(x, tp):
    """[B,T,H,...] -> zero-padded [B,H,Tp,...]."""
    return jnp.moveaxis(pad_time(x, tp), 2, 1)


def run(
    backend: Backend,
    make_cfg: Callable[..., Config],
    q,
    k,
    v,
    log_a,
    *,
    initial_state,
    segment_ids,
    chunk: int,
    scale,
    block_v: int,
    interpret,
    unroll: bool,
):
    """The public kernel entry shared by both backends: pad / transpose / cumsum in XLA, then
    the custom-VJP core. Returns (y [B,T,H,dv] in v's dtype, final state fp32)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = -(-t // chunk)
    tp = n * chunk
    dtype = jnp.result_type(q, k, v)
    mode = "none" if log_a is None else ("scalar" if log_a.ndim == 3 else "channel")
    cfg = make_cfg(
        mode=mode,
        chunk=chunk,
        n_chunks=n,
        dk=dk,
        dv=dv,
        block_v=block_v,
        scale=float(default_scale(scale, dk)),
        seg=segment_ids is not None,
        dtype=jnp.dtype(dtype),
        interpret=interpret,
        unroll=unroll,
    )
    qh = _heads_first(q.astype(dtype), tp)
    kh = _heads_first(k.astype(dtype), tp)
    vh = _heads_first(v.astype(dtype), tp)
    g = None
    if log_a is not None:
        la = pad_time(f32(log_a), tp)
        la = la.reshape((b, n, chunk) + la.shape[2:])
        g = jnp.cumsum(la, axis=2).reshape((b, tp) + la.shape[3:])
        g = jnp.moveaxis(g, 2, 1)
    cnt = None
    if segment_ids is not None:
        resets = pad_time(segment_resets(segment_ids, b, t), tp).astype(jnp.int32)
        cnt = jnp.cumsum(resets.reshape(b, n, chunk), axis=2).reshape(b, tp).astype(F32)
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else f32(initial_state)
    y, sf = _core(backend, cfg, qh, kh, vh, g, s0, cnt)
    y = jnp.moveaxis(y, 1, 2)[:, :t]
    return y.astype(v.dtype), sf


def common_unsupported(q, k, v, scale, dtypes) -> str | None:
    """Checks shared by both backends (dtypes, static scale)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in dtypes:
            names = ", ".join(jnp.dtype(d).name for d in dtypes)
            return f"{name} dtype {jnp.dtype(x.dtype).name} is not one of {names}"
    if scale is not None and not isinstance(scale, (int, float)):
        try:
            float(scale)
        except Exception:  # a traced scale cannot be baked into the kernel
            return "scale must be a static Python number"
    return None


__all__ = [
    "SUB",
    "Backend",
    "ChunkGrads",
    "Config",
    "backward_chunk",
    "chunk_decay",
    "common_unsupported",
    "dstate_update",
    "forward_chunk",
    "mm",
    "run",
    "state_update",
]
