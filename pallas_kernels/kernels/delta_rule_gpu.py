"""Pallas Triton (GPU) kernels for ``delta_rule`` (SPEC regime B, DeltaNet / Gated DeltaNet).

Chunked WY form of Yang et al. 2024 ("Parallelizing Linear Transformers with the Delta Rule
over Sequence Length") for the delta rule of Schlag et al. 2021, with the scalar decay of Yang,
Kautz, Hatamizadeh 2025 (Gated DeltaNet); the per-chunk equations, the triangular inverse
(fp32 matmuls on the tensor cores: doubling product inside 8 x 8 diagonal blocks, then block
forward substitution) and the backward are in :mod:`._delta_math`, shared with the TPU kernel.

The Triton grid runs its programs in parallel, so the recurrence over chunks lives inside the
kernel: the grid is (B*H, dv blocks) and each program runs ``lax.fori_loop`` over the chunks,
loading [C, d] tiles with ``pl.ds`` and carrying the [dk, block_v] fp32 state in registers.
Backward (``jax.custom_vjp``): the forward kernel stores only the chunk-start states
[B*H, N, dk, dv] fp32, then a second kernel walks the chunks in reverse carrying dS and writes
dq, dk (one slice per dv block, summed in XLA), dv, deta, dG, d(initial_state).

Triton needs power-of-two tiles and dot dimensions >= 16: dk, block_v and the chunk are powers
of two >= 16 (dv a multiple of block_v).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..ops._common import register_kernel
from . import _cost
from ._delta_math import (
    F32,
    HIGHEST,
    Config,
    chunk_backward,
    chunk_forward,
    make_delta_op,
    static_scale,
)

MIN_DIM = 16


def _pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def default_block_v(dk: int, dv: int) -> int:
    """The largest power of two dividing dv, up to 64 (32 for dk > 128: the state tile and the
    [C, dk] temporaries share the registers); 0 when there is none >= 16."""
    bv = 64 if dk <= 128 else 32
    while bv >= MIN_DIM and dv % bv:
        bv //= 2
    return bv if bv >= MIN_DIM else 0


def _params(dk: int, backward: bool) -> plgpu.CompilerParams:
    warps = 4 if dk <= 64 and not backward else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=2)


def _gates(eta_ref, g_ref, cnt_ref, sl):
    eta = eta_ref[sl]
    g = g_ref[sl]
    cnt = cnt_ref[sl]
    return eta[:, None], g[:, None], g[None, :], cnt[:, None], cnt[None, :]


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _fwd_kernel(
    q_ref, k_ref, v_ref, eta_ref, g_ref, cnt_ref, s0_ref, *outs, c, n, scale, want_y, hi
):  # fmt: skip
    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        eta_c, g_c, g_r, cnt_c, cnt_r = _gates(eta_ref, g_ref, cnt_ref, sl)
        if not want_y:
            outs[0][i] = s
        o, s_next = chunk_forward(
            q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], eta_c, g_c, g_r, cnt_c, cnt_r, s,
            scale=scale, want_out=want_y, hi=hi,
        )  # fmt: skip
        if want_y:
            outs[0][sl, :] = o.astype(outs[0].dtype)
        return s_next

    s = lax.fori_loop(0, n, body, s0_ref[...].astype(F32))
    if want_y:
        outs[1][...] = s


def _run_forward(q, k, v, eta, g, cnt, s0, cfg: Config, want_y: bool):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n = tp // c
    bv = cfg.block_v
    nv = dv // bv
    bh = b * h
    q, k, v = (x.reshape(bh, tp, x.shape[-1]) for x in (q, k, v))
    eta, g, cnt = (x.reshape(bh, tp) for x in (eta, g, cnt))
    s0 = s0.reshape(bh, dk, dv)
    in_specs = [
        pl.BlockSpec((None, tp, dk), lambda i, j: (i, 0, 0)),
        pl.BlockSpec((None, tp, dk), lambda i, j: (i, 0, 0)),
        pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j)),
        pl.BlockSpec((None, tp), lambda i, j: (i, 0)),
        pl.BlockSpec((None, tp), lambda i, j: (i, 0)),
        pl.BlockSpec((None, tp), lambda i, j: (i, 0)),
        pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j)),
    ]
    if want_y:
        out_shape = (
            jax.ShapeDtypeStruct((bh, tp, dv), v.dtype),
            jax.ShapeDtypeStruct((bh, dk, dv), F32),
        )
        out_specs = (
            pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j)),
            pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j)),
        )
    else:
        out_shape = (jax.ShapeDtypeStruct((bh, n, dk, dv), F32),)
        out_specs = (pl.BlockSpec((None, n, dk, bv), lambda i, j: (i, 0, 0, j)),)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, c=c, n=n, scale=cfg.scale, want_y=want_y, hi=cfg.hi),
        out_shape=out_shape,
        grid=(bh, nv),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_params(dk, False),
        cost_estimate=_cost.chunked(
            bh, tp, dk, dv, c, (q, k, v, eta, g, cnt, s0), out_shape, factor=1.5
        ),
        interpret=bool(cfg.interpret),
        name="delta_rule_fwd" if want_y else "delta_rule_states",
    )(q, k, v, eta, g, cnt, s0)
    if want_y:
        o, s_final = out
        return o.reshape(b, h, tp, dv), s_final.reshape(b, h, dk, dv), None
    return None, None, out[0].reshape(b, h, n, dk, dv)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _bwd_kernel(
    q_ref, k_ref, v_ref, eta_ref, g_ref, cnt_ref, st_ref, do_ref, dsf_ref,
    dq_ref, dk_ref, dv_ref, deta_ref, dg_ref, ds0_ref, *, c, n, scale, hi,
):  # fmt: skip
    def body(step, ds):
        i = n - 1 - step
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        eta_c, g_c, g_r, cnt_c, cnt_r = _gates(eta_ref, g_ref, cnt_ref, sl)
        r = chunk_backward(
            q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], eta_c, g_c, g_r, cnt_c, cnt_r,
            st_ref[i], do_ref[sl, :], ds, scale=scale, hi=hi,
        )  # fmt: skip
        dq_ref[sl, :] = r["dq"]
        dk_ref[sl, :] = r["dk"]
        dv_ref[sl, :] = r["dv"]
        deta_ref[sl] = r["deta"].reshape(c)
        dg_ref[sl] = r["dg_c"].reshape(c) + r["dg_r"].reshape(c)
        return r["ds"]

    ds0_ref[...] = lax.fori_loop(0, n, body, dsf_ref[...])


def _run_backward(q, k, v, eta, g, cnt, states, do, ds_final, cfg: Config):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n = tp // c
    bv = cfg.block_v
    nv = dv // bv
    bh = b * h
    q, k, v, do = (x.reshape(bh, tp, x.shape[-1]) for x in (q, k, v, do))
    eta, g, cnt = (x.reshape(bh, tp) for x in (eta, g, cnt))
    states = states.reshape(bh, n, dk, dv)
    ds_final = ds_final.reshape(bh, dk, dv)
    in_specs = [
        pl.BlockSpec((None, tp, dk), lambda i, j: (i, 0, 0)),
        pl.BlockSpec((None, tp, dk), lambda i, j: (i, 0, 0)),
        pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j)),
        pl.BlockSpec((None, tp), lambda i, j: (i, 0)),
        pl.BlockSpec((None, tp), lambda i, j: (i, 0)),
        pl.BlockSpec((None, tp), lambda i, j: (i, 0)),
        pl.BlockSpec((None, n, dk, bv), lambda i, j: (i, 0, 0, j)),
        pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j)),
        pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j)),
    ]
    out_shape = (
        jax.ShapeDtypeStruct((nv, bh, tp, dk), F32),
        jax.ShapeDtypeStruct((nv, bh, tp, dk), F32),
        jax.ShapeDtypeStruct((bh, tp, dv), F32),
        jax.ShapeDtypeStruct((nv, bh, tp), F32),
        jax.ShapeDtypeStruct((nv, bh, tp), F32),
        jax.ShapeDtypeStruct((bh, dk, dv), F32),
    )
    out_specs = (
        pl.BlockSpec((None, None, tp, dk), lambda i, j: (j, i, 0, 0)),
        pl.BlockSpec((None, None, tp, dk), lambda i, j: (j, i, 0, 0)),
        pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j)),
        pl.BlockSpec((None, None, tp), lambda i, j: (j, i, 0)),
        pl.BlockSpec((None, None, tp), lambda i, j: (j, i, 0)),
        pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j)),
    )
    dq, dk_, dv_, deta, dg, ds0 = pl.pallas_call(
        functools.partial(_bwd_kernel, c=c, n=n, scale=cfg.scale, hi=cfg.hi),
        out_shape=out_shape,
        grid=(bh, nv),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_params(dk, True),
        cost_estimate=_cost.chunked(
            bh, tp, dk, dv, c, (q, k, v, eta, g, cnt, states, do, ds_final), out_shape, factor=4
        ),
        interpret=bool(cfg.interpret),
        name="delta_rule_bwd",
    )(q, k, v, eta, g, cnt, states, do, ds_final)
    r4 = lambda x, d: jnp.sum(x, axis=0).reshape(b, h, tp, d)
    r3 = lambda x: jnp.sum(x, axis=0).reshape(b, h, tp)
    return (
        r4(dq, dk),
        r4(dk_, dk),
        dv_.reshape(b, h, tp, dv),
        r3(deta),
        r3(dg),
        ds0.reshape(b, h, dk, dv),
    )


_call = make_delta_op(_run_forward, _run_backward)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def effective_chunk(chunk_size: int, t: int) -> int:
    """The kernel's chunk: chunk_size, shrunk to the next power of two >= max(T, 16)."""
    return min(chunk_size, max(MIN_DIM, pl.next_power_of_2(t)))


def supports(q, k, v, eta, log_a, *, initial_state, segment_ids, chunk_size, scale):
    """None when the GPU kernel runs this call, else the reason."""
    dk, dv = q.shape[-1], v.shape[-1]
    if log_a is not None and log_a.ndim != 3:
        return "only scalar (per-head) decay log_a [B,T,H] is supported"
    if not _pow2(dk) or dk < MIN_DIM:
        return f"dk={dk} is not a power of two >= {MIN_DIM} (Triton tiles)"
    if not default_block_v(dk, dv):
        return f"dv={dv} is not a multiple of {MIN_DIM} (Triton tiles)"
    if not _pow2(chunk_size) or chunk_size < MIN_DIM:
        return f"chunk_size={chunk_size} is not a power of two >= {MIN_DIM} (Triton tiles)"
    if static_scale(scale, dk) is None:
        return "scale must be a Python number (it is traced)"
    return None


def delta_rule_gpu(
    q, k, v, eta, log_a, *, initial_state, segment_ids, chunk_size, scale,
    interpret=False, block_v=None,
):  # fmt: skip
    """``delta_rule`` on GPU (Pallas Triton); same contract as the op's impl="scan"."""
    reason = supports(
        q, k, v, eta, log_a, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, scale=scale,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"delta_rule (pallas_gpu): {reason}")
    dk, dv = q.shape[-1], v.shape[-1]
    bv = default_block_v(dk, dv) if block_v is None else block_v
    if not _pow2(bv) or bv < MIN_DIM or dv % bv:
        raise ValueError(
            f"delta_rule (pallas_gpu): block_v={bv} must be a power of two >= {MIN_DIM} "
            f"dividing dv={dv}"
        )
    sc = static_scale(scale, dk)

    def cfg_fn(t):
        interp = bool(interpret)
        # fp32 products on the tensor cores (3 TF32 passes); interpret mode runs on the host
        hi = HIGHEST if interp else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        return Config(effective_chunk(chunk_size, t), sc, bv, interp, t, hi)

    return _call(q, k, v, eta, log_a, initial_state, segment_ids, cfg_fn)


def smem_bytes(dk: int, dv: int, chunk: int = 64, itemsize: int = 2, block_v=None) -> dict:
    """Analytic on-chip working set (bytes) of one program, an upper bound that counts every
    tile as live at once: the fp32 state (and dS in the backward), the double-buffered
    (``num_stages=2``) q / k / v / dO tiles of one chunk, and the fp32 C x C and C x dk
    temporaries. Triton keeps these in registers and stages / spills through shared memory;
    "min" is the part that must stay resident across the chunk loop (state, dS, one stage of
    loads)."""
    bv = default_block_v(dk, dv) if block_v is None else block_v
    c = chunk
    loads = 2 * (2 * c * dk * itemsize + c * bv * itemsize + 3 * c * 4)
    fwd = dk * bv * 4 + loads + 4 * (6 * c * c + 3 * c * dk + 3 * c * bv)
    bwd = (
        2 * dk * bv * 4 + loads + 2 * c * bv * itemsize + 4 * (10 * c * c + 8 * c * dk + 6 * c * bv)
    )
    resident = dk * bv * 4 + loads // 2
    return {"fwd": fwd, "bwd": bwd, "min_fwd": resident, "min_bwd": resident + dk * bv * 4}


def register() -> None:
    register_kernel("delta_rule", "gpu", delta_rule_gpu, supports=supports)


__all__ = ["default_block_v", "delta_rule_gpu", "register", "smem_bytes", "supports"]
