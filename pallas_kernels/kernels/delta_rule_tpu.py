"""Mosaic TPU kernels for ``delta_rule`` (SPEC regime B, DeltaNet / Gated DeltaNet).

Chunked WY form of Yang et al. 2024 ("Parallelizing Linear Transformers with the Delta Rule
over Sequence Length") for the delta rule of Schlag et al. 2021, with the scalar decay of Yang,
Kautz, Hatamizadeh 2025 (Gated DeltaNet) folded into the intra-chunk matrices exactly as the
op's "xla" path does; the per-chunk equations, the triangular inverse (fp32 on the MXU:
doubling product inside 8 x 8 diagonal blocks, then block forward substitution, matmuls only)
and the backward are in :mod:`._delta_math`.

Forward: ``pl.pallas_call`` over the grid (B, H, dv blocks, chunks); the chunk axis is last and
"arbitrary" (the [dk, block_v] fp32 state lives in a VMEM scratch carried across chunks), the
other axes "parallel". Blocks: q, k [C, dk], v / y [C, block_v], per-token gates packed as a
[C, 3] column block (eta, G, document counter) and a [2, C] row block (G, counter), so the
(8, 128) rule holds with C a multiple of 16 and block_v a multiple of 128 or equal to dv.

Backward (``jax.custom_vjp``): one run of the forward kernel that stores only the chunk-start
states [B, H, N, dk, dv] fp32 (no outputs), then a kernel over (B, H, dv blocks, chunks
reversed) carrying dS in VMEM; it writes dq, dk per dv block (summed in XLA when there are
several), dv, deta, dG and d(initial_state). Gradients of log a are the reverse in-chunk
cumsum of dG, done in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..ops._common import register_kernel
from ._delta_math import F32, Config, chunk_backward, chunk_forward, make_delta_op, static_scale

SUBLANE = 16  # chunk granularity (bf16 sublane tile; fp32 needs 8)
LANE = 128
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _interpret(interpret):
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def default_block_v(dv: int) -> int:
    """Whole dv up to 256 (one dv block: the inverse is computed once per chunk), else the
    largest multiple of 128 up to 256 that divides dv."""
    if dv <= 256:
        return dv
    for bv in (256, 128):
        if dv % bv == 0:
            return bv
    return dv


def _check_block_v(dv: int, block_v: int | None) -> int:
    bv = default_block_v(dv) if block_v is None else block_v
    if bv != dv and (dv % bv or bv % LANE):
        raise ValueError(
            f"delta_rule (pallas_tpu): block_v={bv} must divide dv={dv} and be a multiple of "
            f"{LANE} (or equal dv)"
        )
    return bv


def _packs(eta, g, cnt, c):
    """[B,H,Tp] gates -> column pack [B,H,Tp,3] and row pack [B,H,N,2,C]."""
    b, h, tp = eta.shape
    col = jnp.stack([eta, g, cnt], axis=-1)
    row = jnp.stack([g, cnt], axis=-2).reshape(b, h, 2, tp // c, c)
    return col, jnp.moveaxis(row, 2, 3)


def _gates(col_ref, row_ref):
    col = col_ref[...]
    row = row_ref[...]
    return col[:, 0:1], col[:, 1:2], row[0:1, :], col[:, 2:3], row[1:2, :]


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, col_ref, row_ref, s0_ref, *rest, scale, want_y, hi):
    if want_y:
        o_ref, sf_ref, s_scr = rest
    else:
        st_ref, s_scr = rest
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(F32)

    s = s_scr[...]
    if not want_y:
        st_ref[...] = s
    eta_c, g_c, g_r, cnt_c, cnt_r = _gates(col_ref, row_ref)
    o, s_next = chunk_forward(
        q_ref[...], k_ref[...], v_ref[...], eta_c, g_c, g_r, cnt_c, cnt_r, s,
        scale=scale, want_out=want_y, hi=hi,
    )  # fmt: skip
    s_scr[...] = s_next
    if want_y:
        o_ref[...] = o.astype(o_ref.dtype)

        @pl.when(n == pl.num_programs(3) - 1)
        def _():
            sf_ref[...] = s_next


def _flops_fwd(b, h, n, c, dk, dv, nv):
    per_block = 2 * c * c * dk * 2 + 2 * c**3 * (4 + c // 8)  # K K^T, Q K^T, the inverse
    per_block += 2 * c * c * (dv // nv) + 2 * c * c * dk
    per_state = 2 * c * dk * dv * 3 + 2 * c * c * dv
    return b * h * n * (nv * per_block + per_state)


def _run_forward(q, k, v, eta, g, cnt, s0, cfg: Config, want_y: bool):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n = tp // c
    bv = cfg.block_v
    nv = dv // bv
    col, row = _packs(eta, g, cnt, c)
    in_specs = [
        pl.BlockSpec((None, None, c, dk), lambda i, j, l, m: (i, j, m, 0)),
        pl.BlockSpec((None, None, c, dk), lambda i, j, l, m: (i, j, m, 0)),
        pl.BlockSpec((None, None, c, bv), lambda i, j, l, m: (i, j, m, l)),
        pl.BlockSpec((None, None, c, 3), lambda i, j, l, m: (i, j, m, 0)),
        pl.BlockSpec((None, None, None, 2, c), lambda i, j, l, m: (i, j, m, 0, 0)),
        pl.BlockSpec((None, None, dk, bv), lambda i, j, l, m: (i, j, 0, l)),
    ]
    state_spec = pl.BlockSpec((None, None, dk, bv), lambda i, j, l, m: (i, j, 0, l))
    if want_y:
        out_shape = (
            jax.ShapeDtypeStruct((b, h, tp, dv), v.dtype),
            jax.ShapeDtypeStruct((b, h, dk, dv), F32),
        )
        out_specs = (pl.BlockSpec((None, None, c, bv), lambda i, j, l, m: (i, j, m, l)), state_spec)
    else:
        out_shape = jax.ShapeDtypeStruct((b, h, n, dk, dv), F32)
        out_specs = pl.BlockSpec((None, None, None, dk, bv), lambda i, j, l, m: (i, j, m, 0, l))
    isz = q.dtype.itemsize
    nbytes = b * h * tp * (
        2 * dk * isz + dv * v.dtype.itemsize * (2 if want_y else 1) + 20
    ) + b * h * dk * dv * 4 * (2 if want_y else 1 + n)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=cfg.scale, want_y=want_y, hi=cfg.hi),
        out_shape=out_shape,
        grid=(b, h, nv, n),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, bv), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        cost_estimate=pl.CostEstimate(
            flops=_flops_fwd(b, h, n, c, dk, dv, nv),
            transcendentals=b * h * n * nv * (c * c + 3 * c),
            bytes_accessed=nbytes,
        ),
        interpret=_interpret(cfg.interpret),
        name="delta_rule_fwd" if want_y else "delta_rule_states",
    )(q, k, v, col, row, s0)
    if want_y:
        o, s_final = out
        return o, s_final, None
    return None, None, out


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _bwd_kernel(
    q_ref, k_ref, v_ref, col_ref, row_ref, st_ref, do_ref, dsf_ref,
    dq_ref, dk_ref, dv_ref, dcol_ref, drow_ref, ds0_ref, ds_scr, *, scale, hi,
):  # fmt: skip
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dsf_ref[...]

    eta_c, g_c, g_r, cnt_c, cnt_r = _gates(col_ref, row_ref)
    r = chunk_backward(
        q_ref[...], k_ref[...], v_ref[...], eta_c, g_c, g_r, cnt_c, cnt_r,
        st_ref[...], do_ref[...], ds_scr[...], scale=scale, hi=hi,
    )  # fmt: skip
    ds_scr[...] = r["ds"]
    dq_ref[...] = r["dq"]
    dk_ref[...] = r["dk"]
    dv_ref[...] = r["dv"]
    dcol_ref[:, 0:1] = r["deta"]
    dcol_ref[:, 1:2] = r["dg_c"]
    drow_ref[...] = r["dg_r"]

    @pl.when(n == pl.num_programs(3) - 1)
    def _():
        ds0_ref[...] = r["ds"]


def _run_backward(q, k, v, eta, g, cnt, states, do, ds_final, cfg: Config):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n = tp // c
    bv = cfg.block_v
    nv = dv // bv
    col, row = _packs(eta, g, cnt, c)
    rev = lambda m: n - 1 - m
    in_specs = [
        pl.BlockSpec((None, None, c, dk), lambda i, j, l, m: (i, j, rev(m), 0)),
        pl.BlockSpec((None, None, c, dk), lambda i, j, l, m: (i, j, rev(m), 0)),
        pl.BlockSpec((None, None, c, bv), lambda i, j, l, m: (i, j, rev(m), l)),
        pl.BlockSpec((None, None, c, 3), lambda i, j, l, m: (i, j, rev(m), 0)),
        pl.BlockSpec((None, None, None, 2, c), lambda i, j, l, m: (i, j, rev(m), 0, 0)),
        pl.BlockSpec((None, None, None, dk, bv), lambda i, j, l, m: (i, j, rev(m), 0, l)),
        pl.BlockSpec((None, None, c, bv), lambda i, j, l, m: (i, j, rev(m), l)),
        pl.BlockSpec((None, None, dk, bv), lambda i, j, l, m: (i, j, 0, l)),
    ]
    out_shape = (
        jax.ShapeDtypeStruct((nv, b, h, tp, dk), F32),
        jax.ShapeDtypeStruct((nv, b, h, tp, dk), F32),
        jax.ShapeDtypeStruct((b, h, tp, dv), F32),
        jax.ShapeDtypeStruct((nv, b, h, tp, 2), F32),
        jax.ShapeDtypeStruct((nv, b, h, n, 1, c), F32),
        jax.ShapeDtypeStruct((b, h, dk, dv), F32),
    )
    out_specs = (
        pl.BlockSpec((None, None, None, c, dk), lambda i, j, l, m: (l, i, j, rev(m), 0)),
        pl.BlockSpec((None, None, None, c, dk), lambda i, j, l, m: (l, i, j, rev(m), 0)),
        pl.BlockSpec((None, None, c, bv), lambda i, j, l, m: (i, j, rev(m), l)),
        pl.BlockSpec((None, None, None, c, 2), lambda i, j, l, m: (l, i, j, rev(m), 0)),
        pl.BlockSpec((None, None, None, None, 1, c), lambda i, j, l, m: (l, i, j, rev(m), 0, 0)),
        pl.BlockSpec((None, None, dk, bv), lambda i, j, l, m: (i, j, 0, l)),
    )
    isz = q.dtype.itemsize
    nbytes = b * h * tp * (2 * dk * isz + 2 * dv * v.dtype.itemsize + 20 + nv * 8 * dk + 4 * dv)
    nbytes += b * h * dk * dv * 4 * (n + 2)
    dq, dk_, dv_, dcol, drow, ds0 = pl.pallas_call(
        functools.partial(_bwd_kernel, scale=cfg.scale, hi=cfg.hi),
        out_shape=out_shape,
        grid=(b, h, nv, n),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, bv), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        cost_estimate=pl.CostEstimate(
            flops=3 * _flops_fwd(b, h, n, c, dk, dv, nv),
            transcendentals=b * h * n * nv * (c * c + 3 * c),
            bytes_accessed=nbytes,
        ),
        interpret=_interpret(cfg.interpret),
        name="delta_rule_bwd",
    )(q, k, v, col, row, states, do, ds_final)
    deta = jnp.sum(dcol[..., 0], axis=0)
    dg = jnp.sum(dcol[..., 1], axis=0) + jnp.sum(drow, axis=0).reshape(b, h, tp)
    return jnp.sum(dq, axis=0), jnp.sum(dk_, axis=0), dv_, deta, dg, ds0


_call = make_delta_op(_run_forward, _run_backward)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def effective_chunk(chunk_size: int, t: int) -> int:
    """The kernel's chunk: chunk_size, shrunk (to a multiple of 16) for short sequences."""
    return min(chunk_size, -(-t // SUBLANE) * SUBLANE)


def supports(q, k, v, eta, log_a, *, initial_state, segment_ids, chunk_size, scale):
    """None when the TPU kernel runs this call, else the reason."""
    dk, dv = q.shape[-1], v.shape[-1]
    if log_a is not None and log_a.ndim != 3:
        return "only scalar (per-head) decay log_a [B,T,H] is supported"
    if dk % SUBLANE:
        return f"dk={dk} is not a multiple of {SUBLANE}"
    if dv % SUBLANE:
        return f"dv={dv} is not a multiple of {SUBLANE}"
    if chunk_size % SUBLANE:
        return f"chunk_size={chunk_size} is not a multiple of {SUBLANE}"
    if static_scale(scale, dk) is None:
        return "scale must be a Python number (it is traced)"
    return None


def delta_rule_tpu(
    q, k, v, eta, log_a, *, initial_state, segment_ids, chunk_size, scale,
    interpret=False, block_v=None,
):  # fmt: skip
    """``delta_rule`` on TPU (Mosaic); same contract as the op's impl="scan"."""
    reason = supports(
        q, k, v, eta, log_a, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, scale=scale,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"delta_rule (pallas_tpu): {reason}")
    dk, dv = q.shape[-1], v.shape[-1]
    bv = _check_block_v(dv, block_v)
    sc = static_scale(scale, dk)
    interp = interpret if interpret is not None else False

    def cfg_fn(t):
        return Config(effective_chunk(chunk_size, t), sc, bv, interp, t)

    return _call(q, k, v, eta, log_a, initial_state, segment_ids, cfg_fn)


def vmem_bytes(dk: int, dv: int, chunk: int = 64, itemsize: int = 2, block_v=None) -> dict:
    """Analytic VMEM footprint (bytes) of the pipelined blocks and scratch at one grid step
    (double-buffered inputs / outputs; lane-padded gate packs), forward and backward. Values
    held in vregs / Mosaic internal scratch (the C x C and C x dk temporaries) come on top."""
    bv = default_block_v(dv) if block_v is None else block_v
    c = chunk
    pad = lambda x, m: -(-x // m) * m
    gates = c * LANE * 4 + 8 * pad(c, LANE) * 4  # [C,3] and [2,C] packs, lane / sublane padded
    fwd = 2 * (2 * c * dk * itemsize + c * bv * itemsize + gates + dk * bv * 4)  # inputs
    fwd += 2 * (c * bv * itemsize + dk * bv * 4) + dk * bv * 4  # y, final state, scratch
    bwd = 2 * (2 * c * dk * itemsize + 2 * c * bv * itemsize + gates + 2 * dk * bv * 4)
    bwd += 2 * (2 * c * dk * 4 + c * bv * 4 + c * LANE * 4 + 8 * pad(c, LANE) * 4 + dk * bv * 4)
    bwd += dk * bv * 4
    temps = 4 * (12 * c * c + 8 * c * dk + 6 * c * bv)  # live fp32 temporaries (estimate)
    return {"fwd_blocks": fwd, "bwd_blocks": bwd, "temporaries_estimate": temps}


def register() -> None:
    register_kernel("delta_rule", "tpu", delta_rule_tpu, supports=supports)


__all__ = ["default_block_v", "delta_rule_tpu", "register", "supports", "vmem_bytes"]
