"""Mosaic TPU kernels for ``gla`` (SPEC regime A: no / scalar / per-channel decay).

Gated linear attention (Yang et al., ICML 2024), S_t = Diag(a_t) S_{t-1} + k_t v_t^T,
y_t = scale q_t^T S_t, in the chunked form of flash-linear-attention's ``chunk_gla``; the
per-chunk equations (forward and backward) and the custom VJP are in :mod:`._gla_math`.

Forward: one ``pl.pallas_call`` over the grid (B, H, dv blocks, chunks); the chunk axis is last
and "arbitrary" (the [dk, block_v] fp32 state lives in a VMEM scratch carried across chunks),
the other axes "parallel". Layout [B,H,T,d] (transposed and zero-padded to a whole number of
chunks in XLA). Blocks: q, k, per-channel G [C, dk]; v, y [C, block_v]; a scalar decay comes
as a [C, 1] column and a [1, C] row block, the document counter likewise; the chunk decay
dec = carry * exp(G_C) as a [dk|1, 1] column. All blocks satisfy the (8, 128) rule with C a
multiple of 16 and block_v a multiple of 128 or equal to dv.

Backward (``jax.custom_vjp``): the forward kernel run once more storing only the chunk-start
states [B, H, N, dk, dv] fp32 (recomputed, not saved by the forward); a reverse kernel over
(B, H, dv blocks, chunks reversed) carrying dS in VMEM that stores dS_end per chunk and
d(initial_state); then a fully parallel kernel over (B, H, dv blocks, chunks) producing dv,
per-dv-block partial dq, dk and the chunk-end dG row (summed in XLA). dG = q dq - k dk plus
that row, and dlog_a is its reverse in-chunk cumsum (XLA autodiff).

Per-channel decays use 16-row sub-chunks with every exponent <= 0 (finite for any decay
strength); the diagonal 16x16 blocks are unrolled row by row (static offsets: Mosaic needs
provably aligned dynamic sublane indices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..ops._common import register_kernel
from . import _gla_math as gm
from ._gla_math import F32, SUB, Config

LANE = 128
_PAR = ("parallel", "parallel", "parallel", "arbitrary")
_ALL_PAR = ("parallel", "parallel", "parallel", "parallel")


def _interpret(interpret):
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def default_block_v(dv: int) -> int:
    """128 when it divides dv (one MXU-wide lane block), else the whole dv."""
    return LANE if dv % LANE == 0 else dv


def effective_chunk(chunk_size: int, t: int) -> int:
    """chunk_size, or T rounded up to 16 when the sequence is shorter than one chunk."""
    return chunk_size if t >= chunk_size else -(-t // SUB) * SUB


# --------------------------------------------------------------------------------------------
# Chunk view over the refs of one grid step
# --------------------------------------------------------------------------------------------


class _Chunk:
    def __init__(self, refs: dict):
        self.r = refs

    def rows(self, name, start, size):
        return self.r[name][pl.ds(start, size), :].astype(F32)

    def row(self, name):
        return self.r[name + "_row"][...].astype(F32)

    def dec(self):
        return self.r["dec"][...]

    def rowsum_t(self, x):
        ones = jnp.ones((8, x.shape[1]), F32)
        dims = (((1,), (1,)), ((), ()))
        out = lax.dot_general(
            ones, x, dims, preferred_element_type=F32, precision=lax.Precision.HIGHEST
        )
        return out[0:1]


def _store(ref, pieces):
    for start, blk in pieces:
        ref[pl.ds(start, blk.shape[0]), :] = blk.astype(ref.dtype)


# --------------------------------------------------------------------------------------------
# Inputs shared by the kernels (names, arrays, block specs)
# --------------------------------------------------------------------------------------------


def _inputs(cfg: Config, q, k, v, g, cnt, dec, chunk_map, with_v=True, with_k=True):
    """(names, arrays, specs) for q, k, v and the decay / document inputs of one chunk;
    ``chunk_map(n)`` maps the grid's chunk index to the chunk read."""
    b, h, tp, dk = q.shape
    c, n_ch, bv = cfg.chunk, cfg.n_chunks, cfg.block_v
    names, arrays, specs = [], [], []

    def add(name, x, block, index):
        names.append(name)
        arrays.append(x)
        specs.append(pl.BlockSpec(block, index))

    add("q", q, (None, None, c, dk), lambda b_, h_, iv, n: (b_, h_, chunk_map(n), 0))
    if with_k:
        add("k", k, (None, None, c, dk), lambda b_, h_, iv, n: (b_, h_, chunk_map(n), 0))
    if with_v:
        add("v", v, (None, None, c, bv), lambda b_, h_, iv, n: (b_, h_, chunk_map(n), iv))
    if cfg.mode == "channel":
        add("g", g, (None, None, c, dk), lambda b_, h_, iv, n: (b_, h_, chunk_map(n), 0))
    elif cfg.mode == "scalar":
        add("gc", g[..., None], (None, None, c, 1), lambda b_, h_, iv, n: (b_, h_, chunk_map(n), 0))
        add(
            "g_row",
            g.reshape(b, h, n_ch, 1, c),
            (None, None, None, 1, c),
            lambda b_, h_, iv, n: (b_, h_, chunk_map(n), 0, 0),
        )
    if cfg.seg:
        add("cnt", cnt[..., None], (None, c, 1), lambda b_, h_, iv, n: (b_, chunk_map(n), 0))
        add(
            "cnt_row",
            cnt.reshape(b, n_ch, 1, c),
            (None, None, 1, c),
            lambda b_, h_, iv, n: (b_, chunk_map(n), 0, 0),
        )
    if cfg.has_dec:
        dd = dec.shape[-2]
        add(
            "dec",
            dec,
            (None, None, None, dd, 1),
            lambda b_, h_, iv, n: (b_, h_, chunk_map(n), 0, 0),
        )
    return names, arrays, specs


def _state_spec(cfg: Config):
    return pl.BlockSpec((None, None, cfg.dk, cfg.block_v), lambda b_, h_, iv, n: (b_, h_, 0, iv))


def _per_chunk_state_spec(cfg: Config, chunk_map):
    return pl.BlockSpec(
        (None, None, None, cfg.dk, cfg.block_v),
        lambda b_, h_, iv, n: (b_, h_, chunk_map(n), 0, iv),
    )


def _ident(n):
    return n


def _nbytes(*xs):
    return int(sum(x.size * x.dtype.itemsize for x in xs if x is not None))


def _flops(cfg: Config, b: int, h: int) -> tuple[int, int]:
    """(flops, transcendentals) of one forward pass (the backward is about 2.5x)."""
    c, dk, bv = cfg.chunk, cfg.dk, cfg.block_v
    per = 2 * c * c * (dk + bv) + 4 * c * dk * bv
    trans = c * c if cfg.mode == "scalar" else 0
    if cfg.mode == "channel":
        per += 6 * c * SUB * dk
        trans = c * SUB * dk + 3 * c * dk
    steps = b * h * cfg.n_chunks * cfg.nv
    return per * steps, trans * steps


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# --------------------------------------------------------------------------------------------
# Forward (and the backward's state pass)
# --------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: Config, names, want_y: bool):
    n_in = len(names) + 1
    r = dict(zip(names, refs[: len(names)]))
    s0_ref = refs[len(names)]
    out_refs, s_scr = refs[n_in:-1], refs[-1]
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...]

    L = _Chunk(r)
    s = s_scr[...]
    if want_y:
        _store(out_refs[0], gm.forward_chunk(cfg, L, s))
    else:
        out_refs[0][...] = s
    s_scr[...] = gm.state_update(cfg, L, s)

    if want_y:

        @pl.when(n == cfg.n_chunks - 1)
        def _():
            out_refs[1][...] = s_scr[...]


def _forward_call(cfg: Config, q, k, v, g, cnt, dec, s0, want_y: bool):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    names, arrays, specs = _inputs(cfg, q, k, v, g, cnt, dec, _ident)
    specs.append(_state_spec(cfg))
    if want_y:
        out_shape = (
            jax.ShapeDtypeStruct((b, h, tp, dv), v.dtype),
            jax.ShapeDtypeStruct((b, h, dk, dv), F32),
        )
        out_specs = (
            pl.BlockSpec(
                (None, None, cfg.chunk, cfg.block_v), lambda b_, h_, iv, n: (b_, h_, n, iv)
            ),
            _state_spec(cfg),
        )
    else:
        out_shape = (jax.ShapeDtypeStruct((b, h, cfg.n_chunks, dk, dv), F32),)
        out_specs = (_per_chunk_state_spec(cfg, _ident),)
    flops, trans = _flops(cfg, b, h)
    if not want_y:
        flops, trans = 2 * b * h * tp * dk * dv, (trans if cfg.mode == "channel" else 0)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, names=tuple(names), want_y=want_y),
        grid=(b, h, cfg.nv, cfg.n_chunks),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, cfg.block_v), F32)],
        compiler_params=_params(_PAR),
        cost_estimate=pl.CostEstimate(
            flops=flops,
            transcendentals=trans,
            bytes_accessed=_nbytes(*arrays, s0) + sum(_nbytes(o) for o in out_shape),
        ),
        interpret=_interpret(cfg.interpret),
        name="gla_fwd" if want_y else "gla_states",
    )(*arrays, s0)
    return outs


def _forward(cfg, q, k, v, g, cnt, dec, s0):
    y, sf = _forward_call(cfg, q, k, v, g, cnt, dec, s0, want_y=True)
    return y, sf


def _states(cfg, q, k, v, g, cnt, dec, s0):
    (states,) = _forward_call(cfg, q, k, v, g, cnt, dec, s0, want_y=False)
    return states


# --------------------------------------------------------------------------------------------
# Backward: reverse dS pass
# --------------------------------------------------------------------------------------------


def _rev_kernel(*refs, cfg: Config, names):
    r = dict(zip(names, refs[: len(names)]))
    dsf_ref = refs[len(names)]
    dse_ref, ds0_ref, ds_scr = refs[len(names) + 1 :]
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dsf_ref[...]

    ds = ds_scr[...]
    dse_ref[...] = ds
    ds_scr[...] = gm.dstate_update(cfg, _Chunk(r), ds)

    @pl.when(n == cfg.n_chunks - 1)
    def _():
        ds0_ref[...] = ds_scr[...]


def _reverse(cfg: Config, q, g, cnt, dec, dy, dsf):
    b, h, tp, dk = q.shape
    dv = dy.shape[-1]
    last = cfg.n_chunks - 1

    def rev(n):
        return last - n

    names, arrays, specs = _inputs(cfg, q, None, None, g, cnt, dec, rev, False, False)
    names.append("do")
    arrays.append(dy)
    specs.append(
        pl.BlockSpec(
            (None, None, cfg.chunk, cfg.block_v), lambda b_, h_, iv, n: (b_, h_, rev(n), iv)
        )
    )
    specs.append(_state_spec(cfg))
    out_shape = (
        jax.ShapeDtypeStruct((b, h, cfg.n_chunks, dk, dv), F32),
        jax.ShapeDtypeStruct((b, h, dk, dv), F32),
    )
    return pl.pallas_call(
        functools.partial(_rev_kernel, cfg=cfg, names=tuple(names)),
        grid=(b, h, cfg.nv, cfg.n_chunks),
        in_specs=specs,
        out_specs=(_per_chunk_state_spec(cfg, rev), _state_spec(cfg)),
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, cfg.block_v), F32)],
        compiler_params=_params(_PAR),
        cost_estimate=pl.CostEstimate(
            flops=2 * b * h * tp * dk * dv,
            transcendentals=b * h * tp * dk * cfg.nv if cfg.mode == "channel" else 0,
            bytes_accessed=_nbytes(*arrays, dsf) + sum(_nbytes(o) for o in out_shape),
        ),
        interpret=_interpret(cfg.interpret),
        name="gla_bwd_dstate",
    )(*arrays, dsf)


# --------------------------------------------------------------------------------------------
# Backward: parallel dq / dk / dv / dG pass
# --------------------------------------------------------------------------------------------


def _grads_kernel(*refs, cfg: Config, names):
    n_in = len(names) + 2
    r = dict(zip(names, refs[: len(names)]))
    s0_ref, dse_ref = refs[len(names) : n_in]
    outs = refs[n_in:]
    grads = gm.backward_chunk(cfg, _Chunk(r), s0_ref[...], dse_ref[...])
    _store(outs[0], grads.dq)
    _store(outs[1], grads.dk)
    _store(outs[2], grads.dv)
    if grads.dgl is not None:
        outs[3][...] = grads.dgl


def _grads(cfg: Config, q, k, v, g, cnt, dec, dy, states, dstates):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    nv, c, bv = cfg.nv, cfg.chunk, cfg.block_v
    names, arrays, specs = _inputs(cfg, q, k, v, g, cnt, dec, _ident)
    names.append("do")
    arrays.append(dy)
    specs.append(pl.BlockSpec((None, None, c, bv), lambda b_, h_, iv, n: (b_, h_, n, iv)))
    specs += [_per_chunk_state_spec(cfg, _ident)] * 2
    part = pl.BlockSpec((None, None, None, c, dk), lambda b_, h_, iv, n: (iv, b_, h_, n, 0))
    out_shape = [
        jax.ShapeDtypeStruct((nv, b, h, tp, dk), F32),
        jax.ShapeDtypeStruct((nv, b, h, tp, dk), F32),
        jax.ShapeDtypeStruct((b, h, tp, dv), v.dtype),
    ]
    out_specs = [
        part,
        part,
        pl.BlockSpec((None, None, c, bv), lambda b_, h_, iv, n: (b_, h_, n, iv)),
    ]
    if cfg.mode != "none":
        out_shape.append(jax.ShapeDtypeStruct((nv, b, h, cfg.n_chunks, 1, dk), F32))
        out_specs.append(
            pl.BlockSpec(
                (None, None, None, None, 1, dk), lambda b_, h_, iv, n: (iv, b_, h_, n, 0, 0)
            )
        )
    flops, trans = _flops(cfg, b, h)
    outs = pl.pallas_call(
        functools.partial(_grads_kernel, cfg=cfg, names=tuple(names)),
        grid=(b, h, nv, cfg.n_chunks),
        in_specs=specs,
        out_specs=tuple(out_specs),
        out_shape=tuple(out_shape),
        compiler_params=_params(_ALL_PAR),
        cost_estimate=pl.CostEstimate(
            flops=int(2.5 * flops),
            transcendentals=2 * trans,
            bytes_accessed=_nbytes(*arrays, states, dstates) + sum(_nbytes(o) for o in out_shape),
        ),
        interpret=_interpret(cfg.interpret),
        name="gla_bwd_grads",
    )(*arrays, states, dstates)
    dgl = outs[3] if cfg.mode != "none" else None
    return outs[0], outs[1], outs[2], dgl


BACKEND = gm.Backend(forward=_forward, states=_states, reverse=_reverse, grads=_grads)


# --------------------------------------------------------------------------------------------
# Public entry, supports, registration
# --------------------------------------------------------------------------------------------

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def supports(q, k, v, log_a, *, initial_state, segment_ids, chunk_size, scale) -> str | None:
    """None when the TPU kernel runs this call, else the reason."""
    reason = gm.common_unsupported(q, k, v, scale, _DTYPES)
    if reason is not None:
        return reason
    dk, dv = q.shape[-1], v.shape[-1]
    if chunk_size % SUB:
        return f"chunk_size={chunk_size} is not a multiple of {SUB}"
    if dk % 8:
        return f"dk={dk} is not a multiple of 8"
    if dv % 8:
        return f"dv={dv} is not a multiple of 8"
    return None


def check_block_v(dv: int, block_v: int | None) -> int:
    bv = default_block_v(dv) if block_v is None else block_v
    if bv != dv and (dv % bv or bv % LANE):
        raise NotImplementedError(
            f"gla (pallas_tpu): block_v={bv} must divide dv={dv} and be a multiple of {LANE} "
            "(or equal dv)"
        )
    return bv


def gla_tpu(
    q,
    k,
    v,
    log_a=None,
    *,
    initial_state=None,
    segment_ids=None,
    chunk_size=64,
    scale=None,
    interpret=False,
    block_v=None,
):
    """``gla`` on TPU (Mosaic); same contract as ``pallas_kernels.gla(..., impl="scan")``.

    Returns (y [B,T,H,dv] in v's dtype, final_state [B,H,dk,dv] fp32)."""
    reason = supports(
        q, k, v, log_a, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, scale=scale,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"gla (pallas_tpu) does not support this call: {reason}")
    return gm.run(
        BACKEND,
        Config,
        q,
        k,
        v,
        log_a,
        initial_state=initial_state,
        segment_ids=segment_ids,
        chunk=effective_chunk(chunk_size, q.shape[1]),
        scale=scale,
        block_v=check_block_v(v.shape[-1], block_v),
        interpret=interpret if interpret is not None else False,
        unroll=True,
    )


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] block after (8 or 16, 128) tile padding."""
    sub = 8 * (4 // itemsize)
    return -(-rows // sub) * sub * -(-cols // LANE) * LANE * itemsize


def vmem_bytes(
    dk: int,
    dv: int,
    chunk: int = 64,
    itemsize: int = 2,
    block_v: int | None = None,
    mode: str = "channel",
    seg: bool = True,
) -> dict:
    """Analytic VMEM footprint (bytes) of each kernel at the given blocks: every in/out block
    double-buffered and tile-padded, plus the state scratch; Mosaic's own temporaries for the
    chunk math (a few [C, dk] / [C, C] fp32 values) come on top."""
    bv = default_block_v(dv) if block_v is None else block_v
    c = chunk
    gates = []
    if mode == "channel":
        gates.append(_tile_bytes(c, dk, 4))
    elif mode == "scalar":
        gates += [_tile_bytes(c, 1, 4), _tile_bytes(1, c, 4)]
    if seg:
        gates += [_tile_bytes(c, 1, 4), _tile_bytes(1, c, 4)]
    if mode != "none" or seg:
        gates.append(_tile_bytes(dk if mode == "channel" else 1, 1, 4))
    qk = _tile_bytes(c, dk, itemsize)
    vb = _tile_bytes(c, bv, itemsize)
    st = _tile_bytes(dk, bv, 4)
    g = sum(gates)
    dgl = _tile_bytes(1, dk, 4) if mode != "none" else 0
    blocks = {
        "forward": (2 * qk + vb + g + st, vb + st, st),
        "states": (2 * qk + vb + g + st, st, st),
        "reverse": (qk + vb + g + st, 2 * st, st),
        "grads": (2 * qk + 2 * vb + g + 2 * st, 2 * _tile_bytes(c, dk, 4) + vb + dgl, 0),
    }
    return {name: 2 * (i + o) + scr for name, (i, o, scr) in blocks.items()}


def register() -> None:
    register_kernel("gla", "tpu", gla_tpu, supports=supports)


__all__ = ["gla_tpu", "register", "supports", "vmem_bytes"]
