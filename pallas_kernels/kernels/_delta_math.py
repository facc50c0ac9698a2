"""Chunk math of the delta-rule kernels (SPEC regime B), shared by the TPU and GPU backends.

Everything here works on *values* (one chunk of C tokens, one dv block), so the Mosaic TPU
kernel and the Triton kernel call the same functions on what they loaded from their refs. The
XLA-side preparation (layout, padding, in-chunk cumulative decay, segment counters) and the
``jax.custom_vjp`` wrapper are shared too; each backend only supplies its two ``pallas_call``s.

Recurrence (decay, then delta; Schlag et al. 2021, Yang et al. 2024, Yang, Kautz, Hatamizadeh
2025):

    S_t = a_t (I - eta_t k_t k_t^T) S_{t-1} + eta_t k_t v_t^T,   y_t = scale q_t^T S_t.

Per chunk (rows r, s in the chunk; G_r = sum of log a over the chunk up to r; "same" = same
document; fs_r = no reset between the chunk start and r; b_r = fs_r e^{G_r}):

    Gam_rs = e^{G_r - G_s} [s <= r, same]                       (intra-chunk decay)
    A      = strict_lower(diag(eta) K K^T * Gam)
    T      = (I + A)^{-1}                                       (WY / UT transform)
    Ueta   = T (eta * V),   W = T (eta * b * K),   U = Ueta - W S
    O      = scale [ (b * Q) S + (Q K^T * Gam) U ]
    S'     = d S + (e * K)^T U,  e_r = e^{G_C - G_r} [same(r, C)],  d = fs_C e^{G_C}

choice (the inverse: fp32 matmuls on the MXU / tensor cores, precision below): blocked
forward substitution. The 8 x 8 diagonal blocks of A are nilpotent of order 8, so their inverse
is the doubling product (I - D)(I + D^2)(I + D^4) (4 matmuls); the block rows below are then
solved in order, T = T_D - (T_D E) T, one C x C matmul per block row: the op's
``unit_lower_inverse`` (``ops/_common.py``, shared with the "xla" path), given this file's 2-D
dot. Not the doubling product over the whole chunk: its partial sums hold powers of A whose
entries grow like binomial(C - 1, i), which cancels catastrophically in fp32 when keys repeat
inside a chunk (with C = 64 and 2 distinct unit keys, eta = 0.99, its inverse is off by ~1e4
relative and y by ~10; this one by ~1e-6).

Backward of one chunk (dO, the carried dS' in; every product is a matmul or a row / column
sum; no second inverse is needed because dA = -T^T dT T^T = -(T^T dU) Ueta^T - (T^T dW) W^T):

    dU  = P^T dO + (e K) dS'          (P = scale Q K^T * Gam)
    dS  = scale (b Q)^T dO + d dS' - W^T dU
    dX  = T^T dU,  dY = -T^T dU S^T,   dV = eta dX
    dA  = -(dX Ueta^T + dY W^T) on the strict same-document lower triangle
    dK  = (dP*Gam*scale)^T Q + C K + C^T K + eta b dY + e U dS'^T,   C = eta (dA * Gam)
    dQ  = scale b (dO S^T) + (dP*Gam*scale) K,                      dP = dO U^T (causal, same)
    dG  = rowsum(E) - colsum(E) for E = dP * P and E = dA * A, plus the b, e and d terms.

The gradient of log a is the reverse in-chunk cumulative sum of dG (done in XLA).

Precision: K K^T and Q K^T multiply the inputs in their own dtype with fp32 accumulation; the
inverse and everything it multiplies (T, Ueta, W, dX, dY, dA) is an fp32 x fp32 product at
the backend's fp32 precision ``hi`` (TPU: ``Precision.HIGHEST``, Mosaic's multi-pass fp32 on
the MXU; GPU: ``DotAlgorithmPreset.TF32_TF32_F32_X3``, three TF32 tensor-core passes, and
HIGHEST in interpret mode); the remaining products of fp32 intermediates (state, U, dO, dP)
use the input dtype as operands for bf16 / fp16 inputs (fp32 accumulation) and ``hi`` for
fp32 inputs. The state is always carried in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..ops._common import default_scale, f32, pad_time, segment_resets, unit_lower_inverse

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
_MASKED = -1e30  # log-space value of a masked decay entry (exp underflows to exactly 0)


# --------------------------------------------------------------------------------------------
# Matmul helpers (2-D, no batch dims: Triton and Mosaic both take these)
# --------------------------------------------------------------------------------------------


def _dot(a, b, ca: int, cb: int, mode):
    """a, b 2-D; contract a's dim ca with b's dim cb; fp32 result.

    mode: a low-precision dtype (both operands cast to it, fp32 accumulation), or the
    precision (``Precision.HIGHEST`` / a ``DotAlgorithmPreset``) of an fp32 x fp32 product."""
    if isinstance(mode, lax.Precision | lax.DotAlgorithmPreset):
        a, b, prec = a.astype(F32), b.astype(F32), mode
    else:
        a, b, prec = a.astype(mode), b.astype(mode), None
    return lax.dot_general(
        a, b, (((ca,), (cb,)), ((), ())), precision=prec, preferred_element_type=F32
    )


def mm(a, b, mode=HIGHEST):  # a @ b
    return _dot(a, b, 1, 0, mode)


def mm_nt(a, b, mode=HIGHEST):  # a @ b^T
    return _dot(a, b, 1, 1, mode)


def mm_tn(a, b, mode=HIGHEST):  # a^T @ b
    return _dot(a, b, 0, 0, mode)


def _raw_dt(x, hi):
    """Operand mode for products of two inputs: their dtype, or ``hi`` for fp32 inputs."""
    return hi if x.dtype == F32 else x.dtype


# --------------------------------------------------------------------------------------------
# One chunk, forward and backward (values)
# --------------------------------------------------------------------------------------------


def _chunk_common(k, v, eta_c, g_c, g_r, cnt_c, cnt_r, hi):
    """Everything that does not depend on the state. Columns are [C,1], rows [1,C]."""
    c = k.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    same = cnt_c == cnt_r
    causal = same & (cols <= rows)
    strict = same & (cols < rows)
    gam = jnp.exp(jnp.where(causal, g_c - g_r, _MASKED))
    kk = mm_nt(k, k, _raw_dt(k, hi))
    a = jnp.where(strict, (eta_c * kk) * gam, 0.0)
    tinv = unit_lower_inverse(a, mm=functools.partial(mm, mode=hi))
    b_c = jnp.where(cnt_c == 0.0, jnp.exp(g_c), 0.0)
    last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    g_end = jnp.sum(jnp.where(last, g_c, 0.0), axis=0, keepdims=True)  # [1,1] (no slicing:
    cnt_end = jnp.sum(jnp.where(last, cnt_c, 0.0), axis=0, keepdims=True)  # Triton has none)
    e_c = jnp.exp(jnp.where(cnt_c == cnt_end, g_end - g_c, _MASKED))
    d = jnp.exp(jnp.where(cnt_end == 0.0, g_end, _MASKED))  # [1,1]
    kf = k.astype(F32)
    ueta = mm(tinv, eta_c * v.astype(F32), hi)
    w = mm(tinv, (eta_c * b_c) * kf, hi)
    return dict(
        causal=causal, strict=strict, gam=gam, kk=kk, a=a, tinv=tinv, b=b_c, e=e_c, d=d,
        ueta=ueta, w=w, kf=kf, last=last,
    )  # fmt: skip


def chunk_forward(q, k, v, eta_c, g_c, g_r, cnt_c, cnt_r, s, *, scale, want_out=True, hi=HIGHEST):
    """One chunk: returns (O [C,bv] fp32 or None, next state [dk,bv] fp32).

    q, k [C,dk], v [C,bv] in the input dtype; eta_c, g_c, cnt_c [C,1] and g_r, cnt_r [1,C]
    fp32 (cnt = index of the document inside the chunk, 0 = continues the previous chunk);
    s [dk,bv] fp32 chunk-start state."""
    lp = _raw_dt(v, hi)
    m = _chunk_common(k, v, eta_c, g_c, g_r, cnt_c, cnt_r, hi)
    u = m["ueta"] - mm(m["w"], s, lp)
    s_next = m["d"] * s + mm_tn(m["e"] * m["kf"], u, lp)
    if not want_out:
        return None, s_next
    p = mm_nt(q, k, _raw_dt(q, hi)) * (m["gam"] * scale)
    o = mm((scale * m["b"]) * q.astype(F32), s, lp) + mm(p, u, lp)
    return o, s_next


def chunk_backward(q, k, v, eta_c, g_c, g_r, cnt_c, cnt_r, s, do, ds, *, scale, hi=HIGHEST):
    """Backward of :func:`chunk_forward` given dO [C,bv] and dS' [dk,bv] (fp32).

    Returns dict: dq, dk [C,dk], dv [C,bv], ds (to the previous chunk) [dk,bv], deta_c and
    dg_c [C,1], dg_r [1,C] (dG = dg_c + dg_r^T), all fp32."""
    lp = _raw_dt(v, hi)
    m = _chunk_common(k, v, eta_c, g_c, g_r, cnt_c, cnt_r, hi)
    kf, b_c, e_c, d, gam = m["kf"], m["b"], m["e"], m["d"], m["gam"]
    qf = q.astype(F32)
    do = do.astype(F32)
    u = m["ueta"] - mm(m["w"], s, lp)
    p = mm_nt(q, k, _raw_dt(q, hi)) * (gam * scale)

    ke = e_c * kf
    du = mm_tn(p, do, lp) + mm(ke, ds, lp)
    dp = jnp.where(m["causal"], mm_nt(do, u, lp), 0.0)
    bq = (scale * b_c) * qf
    ds_prev = mm_tn(bq, do, lp) + d * ds - mm_tn(m["w"], du, hi)
    dos = mm_nt(do, s, lp)  # [C,dk]
    dke = mm_nt(u, ds, lp)  # [C,dk]
    dw = -mm_nt(du, s, lp)
    dx = mm_tn(m["tinv"], du, hi)
    dy = mm_tn(m["tinv"], dw, hi)
    da = jnp.where(m["strict"], -(mm_nt(dx, m["ueta"], hi) + mm_nt(dy, m["w"], hi)), 0.0)

    # Q K^T * Gam term
    dqk = dp * (gam * scale)
    dq = (scale * b_c) * dos + mm(dqk, kf, lp)
    dk = mm_tn(dqk, qf, lp)
    e_p = dp * p
    # A = eta K K^T * Gam term
    za = da * gam
    ca = eta_c * za
    dk = dk + mm(ca, kf, lp) + mm_tn(ca, kf, lp)
    e_a = da * m["a"]
    deta = jnp.sum(za * m["kk"], axis=1, keepdims=True)
    # X = eta V, Y = eta b K
    dv = eta_c * dx
    deta = deta + jnp.sum(dx * v.astype(F32), axis=1, keepdims=True)
    yk = jnp.sum(dy * kf, axis=1, keepdims=True)
    dk = dk + (eta_c * b_c) * dy
    deta = deta + b_c * yk
    db = eta_c * yk + scale * jnp.sum(qf * dos, axis=1, keepdims=True)
    # K e term and the chunk-end decay
    dk = dk + e_c * dke
    de = jnp.sum(kf * dke, axis=1, keepdims=True) * e_c
    dd = jnp.sum(jnp.sum(s * ds, axis=1, keepdims=True), axis=0, keepdims=True) * d
    g_end = jnp.sum(de, axis=0, keepdims=True) + dd  # [1,1]
    last = m["last"]
    dg_c = jnp.sum(e_p + e_a, axis=1, keepdims=True) + db * b_c - de + jnp.where(last, g_end, 0.0)
    dg_r = -jnp.sum(e_p + e_a, axis=0, keepdims=True)
    return dict(dq=dq, dk=dk, dv=dv, ds=ds_prev, deta=deta, dg_c=dg_c, dg_r=dg_r)


# --------------------------------------------------------------------------------------------
# XLA-side preparation and the custom VJP shared by both backends
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    chunk: int  # effective chunk length C (T is padded to a multiple)
    scale: float
    block_v: int
    interpret: Any  # False, True, or a backend interpret object (hashable)
    length: int  # the unpadded T
    hi: Any = HIGHEST  # precision of the fp32 x fp32 products (a Precision or DotAlgorithmPreset)


def to_bhtd(x, tp):
    """[B,T,H,...] -> zero-padded [B,H,Tp,...]."""
    return jnp.moveaxis(pad_time(x, tp), 2, 1)


def prep_gates(eta, log_a, seg_cnt, cfg: Config):
    """eta, log_a (or None) [B,T,H]; seg_cnt [B,Tp] fp32 or None -> fp32 [B,H,Tp] eta, in-chunk
    cumulative log decay g, in-chunk document counter cnt."""
    b, t, h = eta.shape
    c = cfg.chunk
    tp = -(-t // c) * c
    eta_t = to_bhtd(f32(eta), tp)
    if log_a is None:
        g = jnp.zeros((b, h, tp), F32)
    else:
        la = to_bhtd(f32(log_a), tp)
        g = jnp.cumsum(la.reshape(b, h, tp // c, c), axis=-1).reshape(b, h, tp)
    if seg_cnt is None:
        cnt = jnp.zeros((b, h, tp), F32)
    else:
        cnt = jnp.broadcast_to(seg_cnt[:, None, :], (b, h, tp))
    return eta_t, g, cnt


def segment_counter(segment_ids, b: int, t: int, c: int):
    """[B,Tp] fp32: index of the document of each token inside its chunk (None: no ids)."""
    if segment_ids is None:
        return None
    tp = -(-t // c) * c
    r = pad_time(segment_resets(segment_ids, b, t), tp).astype(jnp.int32)
    return jnp.cumsum(r.reshape(b, tp // c, c), axis=-1).reshape(b, tp).astype(F32)


def make_delta_op(run_forward, run_backward):
    """Build the differentiable op from a backend's two kernels.

    run_forward(q, k, v, eta, g, cnt, s0, cfg, want_y) with q, k, v [B,H,Tp,d] (input dtype),
    gates [B,H,Tp] fp32, s0 [B,H,dk,dv] fp32 -> (o [B,H,Tp,dv] fp32 or dtype v / None, final
    state [B,H,dk,dv] fp32, chunk-start states [B,H,N,dk,dv] fp32 or None (when want_y)).
    run_backward(q, k, v, eta, g, cnt, states, do, ds_final, cfg) -> (dq, dk, dv, deta, dg,
    ds0) in the same layouts (fp32; dg is the gradient of the in-chunk cumulative g).
    Residuals are only the inputs: the backward recomputes the chunk-start states."""

    def _prep(q, k, v, eta, log_a, seg_cnt, cfg):
        tp = -(-q.shape[1] // cfg.chunk) * cfg.chunk
        qt, kt, vt = (to_bhtd(x, tp) for x in (q, k, v))
        return (qt, kt, vt) + prep_gates(eta, log_a, seg_cnt, cfg)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
    def op(q, k, v, eta, log_a, s0, seg_cnt, cfg):
        args = _prep(q, k, v, eta, log_a, seg_cnt, cfg)
        o, s_final, _ = run_forward(*args, s0, cfg, True)
        y = jnp.moveaxis(o, 1, 2)[:, : cfg.length].astype(v.dtype)
        return y, s_final

    def fwd(q, k, v, eta, log_a, s0, seg_cnt, cfg):
        out = op(q, k, v, eta, log_a, s0, seg_cnt, cfg)
        return out, (q, k, v, eta, log_a, s0, seg_cnt)

    def bwd(cfg, res, cts):
        q, k, v, eta, log_a, s0, seg_cnt = res
        dy, ds_final = cts
        args = _prep(q, k, v, eta, log_a, seg_cnt, cfg)
        _, _, states = run_forward(*args, s0, cfg, False)
        tp = args[0].shape[2]
        do = to_bhtd(dy, tp)
        dq, dk, dv, deta, dg, ds0 = run_backward(*args, states, do, f32(ds_final), cfg)
        t = cfg.length

        def back(x, like):
            return jnp.moveaxis(x, 1, 2)[:, :t].astype(like.dtype)

        dlog_a = None
        if log_a is not None:
            b, h, _ = dg.shape
            c = cfg.chunk
            dgc = dg.reshape(b, h, tp // c, c)
            dla = jnp.flip(jnp.cumsum(jnp.flip(dgc, -1), axis=-1), -1).reshape(b, h, tp)
            dlog_a = back(dla, log_a)
        dseg = None if seg_cnt is None else jnp.zeros_like(seg_cnt)
        return (
            back(dq, q),
            back(dk, k),
            back(dv, v),
            back(deta, eta),
            dlog_a,
            ds0.astype(s0.dtype),
            dseg,
        )

    op.defvjp(fwd, bwd)

    def call(q, k, v, eta, log_a, initial_state, segment_ids, cfg_fn):
        """Entry point for a backend: cfg_fn(T) -> Config with the effective chunk."""
        b, t, h, dk = q.shape
        dv = v.shape[-1]
        cfg = cfg_fn(t)
        s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else f32(initial_state)
        seg_cnt = segment_counter(segment_ids, b, t, cfg.chunk)
        return op(q, k, v, eta, log_a, s0, seg_cnt, cfg)

    return call


def static_scale(scale, dk: int) -> float | None:
    """The read scale as a Python float, or None when it is traced (unsupported)."""
    s = default_scale(scale, dk)
    try:
        return float(s)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


__all__ = [
    "Config",
    "chunk_backward",
    "chunk_forward",
    "make_delta_op",
    "mm",
    "mm_nt",
    "mm_tn",
    "segment_counter",
    "static_scale",
]
