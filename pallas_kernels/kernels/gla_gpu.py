"""Pallas Triton (GPU) kernels for ``gla`` (SPEC regime A: no / scalar / per-channel decay).

Gated linear attention (Yang et al., ICML 2024) in the chunked form of flash-linear-attention's
``chunk_gla``; the per-chunk equations (forward and backward) and the custom VJP are shared with
the TPU kernels in :mod:`._gla_math`.

The GPU grid runs in parallel, so the sequential passes keep the chunk loop inside the kernel:

- forward: grid (B*H, dv blocks); ``lax.fori_loop`` over chunks with the [dk, block_v] fp32
  state in registers, chunk rows read with ``pl.ds``; writes y and the final state.
- backward (``jax.custom_vjp``): the same loop storing only the chunk-start states
  [B*H, N, dk, dv] (recomputed, not saved by the forward); a reverse loop carrying dS that
  stores dS_end per chunk and d(initial_state); then a fully parallel grid
  (B*H, dv blocks, chunks) for dv, per-dv-block partial dq, dk and the chunk-end dG row
  (summed in XLA). dlog_a is the reverse in-chunk cumsum of dG (XLA autodiff).

Triton needs power-of-two block dims and dots with every dim >= 16: dk, dv, block_v and the
chunk are powers of two >= 16. fp32 inputs use IEEE fp32 dots (``Precision.HIGHEST``); bf16 /
fp16 inputs feed the tensor cores with fp32 accumulation. Per-channel decays use 16-row
sub-chunks with every exponent <= 0 (finite for any decay strength).
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
from . import _gla_math as gm
from ._gla_math import F32, SUB, Config

MAX_HEAD = 256
DEFAULT_BLOCK_V = 64


def _pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_block_v(dv: int) -> int:
    return min(dv, DEFAULT_BLOCK_V)


def effective_chunk(chunk_size: int, t: int) -> int:
    """chunk_size, or the next power of two >= max(T, 16) when T is shorter than a chunk."""
    return chunk_size if t >= chunk_size else max(SUB, _next_pow2(t))


def _params(cfg: Config, sequential: bool):
    big = cfg.chunk * max(cfg.dk, cfg.block_v) >= 64 * 128
    return plgpu.CompilerParams(num_warps=8 if big else 4, num_stages=1 if sequential else 2)


# --------------------------------------------------------------------------------------------
# Chunk view: refs over the whole sequence (offset = chunk start) or over one chunk (offset 0)
# --------------------------------------------------------------------------------------------


class _Chunk:
    def __init__(self, refs: dict, offset, chunk: int, dec=None):
        self.r = refs
        self.off = offset
        self.c = chunk
        self._dec = dec

    def rows(self, name, start, size):
        ref = self.r[name]
        if name in ("gc", "cnt"):  # 1-D per-token values
            return ref[pl.ds(self.off + start, size)].astype(F32)[:, None]
        return ref[pl.ds(self.off + start, size), :].astype(F32)

    def row(self, name):
        return self.r["gc" if name == "g" else name][pl.ds(self.off, self.c)].astype(F32)[None, :]

    def dec(self):
        return self._dec

    def rowsum_t(self, x):
        return jnp.sum(x, axis=1)[None, :]


def _store(ref, offset, pieces):
    for start, blk in pieces:
        ref[pl.ds(offset + start, blk.shape[0]), :] = blk.astype(ref.dtype)


# --------------------------------------------------------------------------------------------
# Inputs (B and H merged into one grid axis)
# --------------------------------------------------------------------------------------------


def _inputs(cfg: Config, heads: int, q, k, v, g, cnt, dec, whole: bool, with_kv=True):
    """(names, arrays, specs). whole=True: blocks span the sequence (grid (BH, NV));
    whole=False: one chunk per program (grid (BH, NV, N))."""
    bh, tp, dk = q.shape
    c, bv = cfg.chunk, cfg.block_v
    t_blk = tp if whole else c
    names, arrays, specs = [], [], []

    def add(name, x, block, index):
        names.append(name)
        arrays.append(x)
        specs.append(pl.BlockSpec(block, index))

    if whole:

        def tok(i, iv, *rest):
            return (i, 0)

        def tok_v(i, iv, *rest):
            return (i, 0, iv)

        def tok_b(i, iv, *rest):
            return (i // heads, 0)

        def chunk_blk(i, iv, *rest):
            return (i, 0, 0, 0)
    else:

        def tok(i, iv, n):
            return (i, n)

        def tok_v(i, iv, n):
            return (i, n, iv)

        def tok_b(i, iv, n):
            return (i // heads, n)

        def chunk_blk(i, iv, n):
            return (i, n, 0, 0)

    def tok_d(*idx):
        return tok(*idx) + (0,)

    add("q", q, (None, t_blk, dk), tok_d)
    if with_kv:
        add("k", k, (None, t_blk, dk), tok_d)
        add("v", v, (None, t_blk, bv), tok_v)
    if cfg.mode == "channel":
        add("g", g, (None, t_blk, dk), tok_d)
    elif cfg.mode == "scalar":
        add("gc", g, (None, t_blk), tok)
    if cfg.seg:
        add("cnt", cnt, (None, t_blk), tok_b)
    if cfg.has_dec:
        dd = dec.shape[-2]
        block = (None, cfg.n_chunks, dd, 1) if whole else (None, None, dd, 1)
        add("dec", dec, block, chunk_blk)
    return names, arrays, specs


def _merge(x):
    return None if x is None else x.reshape((-1,) + x.shape[2:])


# --------------------------------------------------------------------------------------------
# Forward (and the backward's state pass)
# --------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: Config, names, want_y: bool):
    r = dict(zip(names, refs[: len(names)]))
    s0_ref = refs[len(names)]
    outs = refs[len(names) + 1 :]
    c = cfg.chunk

    def body(n, s):
        dec = r["dec"][n].astype(F32) if cfg.has_dec else None
        L = _Chunk(r, n * c, c, dec)
        if want_y:
            _store(outs[0], n * c, gm.forward_chunk(cfg, L, s))
        else:
            outs[0][n] = s
        return gm.state_update(cfg, L, s)

    s = lax.fori_loop(0, cfg.n_chunks, body, s0_ref[...].astype(F32))
    if want_y:
        outs[1][...] = s


def _forward_call(cfg: Config, q, k, v, g, cnt, dec, s0, want_y: bool):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    bv, nv = cfg.block_v, cfg.nv
    names, arrays, specs = _inputs(
        cfg, h, _merge(q), _merge(k), _merge(v), _merge(g), cnt, _merge(dec), whole=True
    )
    state_spec = pl.BlockSpec((None, dk, bv), lambda i, iv: (i, 0, iv))
    specs.append(state_spec)
    if want_y:
        out_shape = (
            jax.ShapeDtypeStruct((b * h, tp, dv), v.dtype),
            jax.ShapeDtypeStruct((b * h, dk, dv), F32),
        )
        out_specs = (pl.BlockSpec((None, tp, bv), lambda i, iv: (i, 0, iv)), state_spec)
    else:
        out_shape = (jax.ShapeDtypeStruct((b * h, cfg.n_chunks, dk, dv), F32),)
        out_specs = (pl.BlockSpec((None, cfg.n_chunks, dk, bv), lambda i, iv: (i, 0, 0, iv)),)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, names=tuple(names), want_y=want_y),
        grid=(b * h, nv),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(cfg, sequential=True),
        cost_estimate=_cost.chunked(b * h, tp, dk, dv, cfg.chunk, [*arrays, s0], out_shape),
        interpret=bool(cfg.interpret),
        name="gla_fwd" if want_y else "gla_states",
    )(*arrays, _merge(s0))
    return tuple(o.reshape((b, h) + o.shape[1:]) for o in outs)


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
    dse_ref, ds0_ref = refs[len(names) + 1 :]
    c, last = cfg.chunk, cfg.n_chunks - 1

    def body(m, ds):
        n = last - m
        dec = r["dec"][n].astype(F32) if cfg.has_dec else None
        dse_ref[n] = ds
        return gm.dstate_update(cfg, _Chunk(r, n * c, c, dec), ds)

    ds0_ref[...] = lax.fori_loop(0, cfg.n_chunks, body, dsf_ref[...].astype(F32))


def _reverse(cfg: Config, q, g, cnt, dec, dy, dsf):
    b, h, tp, dk = q.shape
    dv = dy.shape[-1]
    bv = cfg.block_v
    names, arrays, specs = _inputs(
        cfg, h, _merge(q), None, None, _merge(g), cnt, _merge(dec), whole=True, with_kv=False
    )
    names.append("do")
    arrays.append(_merge(dy))
    specs.append(pl.BlockSpec((None, tp, bv), lambda i, iv: (i, 0, iv)))
    state_spec = pl.BlockSpec((None, dk, bv), lambda i, iv: (i, 0, iv))
    specs.append(state_spec)
    rev_out = (
        jax.ShapeDtypeStruct((b * h, cfg.n_chunks, dk, dv), F32),
        jax.ShapeDtypeStruct((b * h, dk, dv), F32),
    )
    dse, ds0 = pl.pallas_call(
        functools.partial(_rev_kernel, cfg=cfg, names=tuple(names)),
        grid=(b * h, cfg.nv),
        in_specs=specs,
        out_specs=(
            pl.BlockSpec((None, cfg.n_chunks, dk, bv), lambda i, iv: (i, 0, 0, iv)),
            state_spec,
        ),
        out_shape=rev_out,
        compiler_params=_params(cfg, sequential=True),
        cost_estimate=_cost.chunked(b * h, tp, dk, dv, cfg.chunk, [*arrays, dsf], rev_out),
        interpret=bool(cfg.interpret),
        name="gla_bwd_dstate",
    )(*arrays, _merge(dsf))
    return dse.reshape((b, h) + dse.shape[1:]), ds0.reshape(b, h, dk, dv)


# --------------------------------------------------------------------------------------------
# Backward: parallel dq / dk / dv / dG pass
# --------------------------------------------------------------------------------------------


def _grads_kernel(*refs, cfg: Config, names):
    n_in = len(names) + 2
    r = dict(zip(names, refs[: len(names)]))
    s0_ref, dse_ref = refs[len(names) : n_in]
    outs = refs[n_in:]
    dec = r["dec"][...].astype(F32) if cfg.has_dec else None
    L = _Chunk(r, 0, cfg.chunk, dec)
    grads = gm.backward_chunk(cfg, L, s0_ref[...].astype(F32), dse_ref[...].astype(F32))
    _store(outs[0], 0, grads.dq)
    _store(outs[1], 0, grads.dk)
    _store(outs[2], 0, grads.dv)
    if grads.dgl is not None:
        outs[3][...] = grads.dgl


def _grads(cfg: Config, q, k, v, g, cnt, dec, dy, states, dstates):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    nv, c, bv, n_ch = cfg.nv, cfg.chunk, cfg.block_v, cfg.n_chunks
    names, arrays, specs = _inputs(
        cfg, h, _merge(q), _merge(k), _merge(v), _merge(g), cnt, _merge(dec), whole=False
    )
    names.append("do")
    arrays.append(_merge(dy))
    specs.append(pl.BlockSpec((None, c, bv), lambda i, iv, n: (i, n, iv)))
    st_spec = pl.BlockSpec((None, None, dk, bv), lambda i, iv, n: (i, n, 0, iv))
    specs += [st_spec, st_spec]
    part = pl.BlockSpec((None, None, c, dk), lambda i, iv, n: (iv, i, n, 0))
    out_shape = [
        jax.ShapeDtypeStruct((nv, b * h, tp, dk), F32),
        jax.ShapeDtypeStruct((nv, b * h, tp, dk), F32),
        jax.ShapeDtypeStruct((b * h, tp, dv), v.dtype),
    ]
    out_specs = [part, part, pl.BlockSpec((None, c, bv), lambda i, iv, n: (i, n, iv))]
    if cfg.mode != "none":
        out_shape.append(jax.ShapeDtypeStruct((nv, b * h, n_ch, 1, dk), F32))
        out_specs.append(pl.BlockSpec((None, None, None, 1, dk), lambda i, iv, n: (iv, i, n, 0, 0)))
    outs = pl.pallas_call(
        functools.partial(_grads_kernel, cfg=cfg, names=tuple(names)),
        grid=(b * h, nv, n_ch),
        in_specs=specs,
        out_specs=tuple(out_specs),
        out_shape=tuple(out_shape),
        compiler_params=_params(cfg, sequential=False),
        cost_estimate=_cost.chunked(
            b * h, tp, dk, dv, cfg.chunk, [*arrays, states, dstates], out_shape, factor=2.5
        ),
        interpret=bool(cfg.interpret),
        name="gla_bwd_grads",
    )(*arrays, _merge(states), _merge(dstates))
    dq = outs[0].reshape(nv, b, h, tp, dk)
    dk_ = outs[1].reshape(nv, b, h, tp, dk)
    dv_ = outs[2].reshape(b, h, tp, dv)
    dgl = outs[3].reshape(nv, b, h, n_ch, 1, dk) if cfg.mode != "none" else None
    return dq, dk_, dv_, dgl


BACKEND = gm.Backend(forward=_forward, states=_states, reverse=_reverse, grads=_grads)


# --------------------------------------------------------------------------------------------
# Public entry, supports, registration
# --------------------------------------------------------------------------------------------

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(q, k, v, log_a, *, initial_state, segment_ids, chunk_size, scale) -> str | None:
    """None when the Triton kernel runs this call, else the reason."""
    reason = gm.common_unsupported(q, k, v, scale, _DTYPES)
    if reason is not None:
        return reason
    if not _pow2(chunk_size) or chunk_size < SUB:
        return f"chunk_size={chunk_size} is not a power of two >= {SUB}"
    for name, d in (("dk", q.shape[-1]), ("dv", v.shape[-1])):
        if not _pow2(d) or d < 16:
            return f"{name}={d} is not a power of two >= 16"
        if d > MAX_HEAD:
            return f"{name}={d} is larger than {MAX_HEAD}"
    return None


def check_block_v(dv: int, block_v: int | None) -> int:
    bv = default_block_v(dv) if block_v is None else block_v
    if not _pow2(bv) or bv < 16 or dv % bv:
        raise NotImplementedError(
            f"gla (pallas_gpu): block_v={bv} must be a power of two >= 16 that divides dv={dv}"
        )
    return bv


def gla_gpu(
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
    """``gla`` on GPU (Pallas Triton); same contract as ``pallas_kernels.gla(..., impl="scan")``.

    Returns (y [B,T,H,dv] in v's dtype, final_state [B,H,dk,dv] fp32)."""
    reason = supports(
        q, k, v, log_a, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, scale=scale,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"gla (pallas_gpu) does not support this call: {reason}")
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
        interpret=bool(interpret),
        unroll=False,
    )


def register() -> None:
    register_kernel("gla", "gpu", gla_gpu, supports=supports)


__all__ = ["gla_gpu", "register", "supports"]
