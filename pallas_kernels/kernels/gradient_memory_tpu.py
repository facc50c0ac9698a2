"""Mosaic TPU kernels for the regime-C gradient memory with a linear or two-layer MLP memory
(forward and backward), behind ``gradient_memory(..., impl="pallas_tpu")`` / ``linear_memory``.

Math (SPEC section 2, regime C; Sun et al. 2024 TTT-Linear, Behrouz, Zhong, Mirrokni 2025
Titans, Behrouz et al. 2025 Miras): per head, inside the chunk that starts at t', every
gradient is taken at the anchor W(t'), u_j = k_j d_j^T with d_j = dl/dpred at k_j^T W(t'), and

    y_t   = bb_t q_t W(t') - f_t q_t Z(t') + rb_t q_t W0 - sum_{j<=t} Gc[t,j] (q_t . k_j) d_j
    W_end = bb_C W(t') - f_C Z(t') + rb_C W0 - (K o Gc[C,:])^T D
    Z_end = P_C Z(t') + (K o N_C)^T D

(see :mod:`._gradient_memory_math`; the coefficients come from the gates in XLA).

Layout: the op's ``_layout`` puts each row on its chunk grid, arrays go in as [B,H,n,C,d]
so every block's last two dims equal the full (C, d) dims (the (8,128) rule holds for any C
and head dim); the state blocks are (dk, block_v). Grid (B, H, dv blocks, n chunks): the chunk
axis is last and "arbitrary" and carries W and Z (fp32, VMEM scratch); the others are
"parallel". block_v: the output error of a linear memory is elementwise in the value dim for
all four losses (e = k W - v, column e depends on column e of W only), so dv splits into
independent blocks (a multiple of 128, or dv itself; default dv up to 256, else 256). In the
backward the per-token cotangents (dq, dk, gate coefficients) are partial sums over dv blocks
and are added up in XLA.

Backward: a custom_vjp whose residuals are the inputs only. It re-runs the forward kernel to
recompute the chunk-start states (written to HBM, transient), then a second kernel sweeps the
chunks in reverse (index maps n-1-c) carrying dW and dZ in VMEM scratch.

Two-layer MLP memory (TTT-MLP, Titans LMM L_M = 2: M(z) = [z +] [LN](act(z W0) W1), see
:mod:`._gradient_memory_math`): grid (B, H, n chunks), the same carry of (W0, W1) and their
momenta in VMEM scratch, reads in the dual form per layer. No dv blocks (the hidden layer and
the layer norm mix every value column); the weight-sized blocks whose index never changes
along the chunk axis are single-buffered (``pl.Buffered(1)``) and the scoped VMEM limit is
raised to 1.25x :func:`vmem_bytes` (at least 32, at most 100 MiB: v5e / v6e; compiled for
v5e and v6e at head dims up to 256, hidden 4 x dv). The chunk backward is ``jax.vjp`` of the
chunk forward inside the kernel body.

Supported: linear memory and the depth-2 MLP memory (gelu / silu / relu, residual and layer
norm on or off: the ``ttt_mlp`` and ``titans_lmm`` presets), losses dot / l2 / lp / huber,
per-head eta, mu, log_a, gamma ([B,T,H]), reset weights ``params``, segment_ids, a carried
state (also mid-chunk), bf16 or fp32 inputs (fp32 state and accumulation). Not supported
(``supports`` gives the reason; "auto" falls back to XLA): deeper MLPs, gated memories,
normalisers, Muon, Omega windows > 1, per-channel gates. Only jax is used here (never flax).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..ops._common import register_kernel
from . import _gradient_memory_math as gm

f32 = jnp.float32
PAR, ARB = "parallel", "arbitrary"


def default_block_v(dv: int) -> int:
    """dv itself up to 256 (or when 256 does not divide it), else 256."""
    return 256 if dv > 256 and dv % 256 == 0 else dv


def vmem_bytes(
    dk: int,
    dv: int,
    *,
    chunk: int = 64,
    itemsize: int = 2,
    momentum: bool = True,
    seg: bool = False,
    block_v: int | None = None,
    backward: bool = False,
    arch: str = "linear",
    expansion: float = 4.0,
) -> int:
    """Analytic VMEM footprint of one kernel at these sizes: every block double-buffered and
    padded to its (sublane, 128-lane) tile, plus the fp32 scratch. ``arch="mlp"``: the
    two-layer memory of hidden width ``expansion * dv`` (:func:`mlp_vmem_bytes`)."""
    if arch == "mlp":
        return mlp_vmem_bytes(
            dk,
            dv,
            expansion=expansion,
            chunk=chunk,
            itemsize=itemsize,
            momentum=momentum,
            seg=seg,
            backward=backward,
        )
    bv = block_v or default_block_v(dv)

    def tile(rows, cols, size=4):
        sub = 8 * (4 // size)
        return -(-rows // sub) * sub * (-(-cols // 128) * 128) * size

    C, st = chunk, tile(dk, bv)
    n_st = 1 + momentum + seg
    blocks = 2 * tile(C, dk, itemsize) + tile(C, bv, itemsize) + tile(C, gm.NS) + tile(C, C)
    if not backward:
        blocks += tile(C, bv, itemsize) + st * (1 + n_st) + st * (2 + momentum)
        return 2 * blocks + st * (1 + momentum)
    blocks += tile(C, bv, itemsize) + st * (1 + momentum)  # dy, chunk-start states
    blocks += st * (3 + momentum + seg)  # anchor, dW_end, d anchor, dZ_end, W0
    blocks += 2 * tile(C, dk) + tile(C, bv) + tile(C, gm.NS) + tile(C, C)  # cotangents
    blocks += st * (2 + momentum + seg)
    return 2 * blocks + st * (1 + momentum)


def _interpret(interpret: Any) -> Any:
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def _row_col(C):
    last_row = (lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1).astype(f32)

    def onehot(slot):
        return (lax.broadcasted_iota(jnp.int32, (1, gm.NS), 1) == slot).astype(f32)

    return last_row, onehot


def _specs(cfg: gm.Config, reverse: bool):
    n = cfg.n

    def cidx(c):
        return n - 1 - c if reverse else c

    def tok(d):  # [B,H,n,C,d]
        return pl.BlockSpec((None, None, None, cfg.C, d), lambda b, h, j, c: (b, h, cidx(c), 0, 0))

    def tok_v():  # [B,H,n,C,dv], blocked on dv
        return pl.BlockSpec(
            (None, None, None, cfg.C, cfg.bv), lambda b, h, j, c: (b, h, cidx(c), 0, j)
        )

    def tok_part(d):  # [B,H,nv,n,C,d]: per-dv-block partial sums
        return pl.BlockSpec(
            (None, None, None, None, cfg.C, d), lambda b, h, j, c: (b, h, j, cidx(c), 0, 0)
        )

    state = pl.BlockSpec((None, None, cfg.dk, cfg.bv), lambda b, h, j, c: (b, h, 0, j))
    per_chunk = pl.BlockSpec(
        (None, None, None, cfg.dk, cfg.bv), lambda b, h, j, c: (b, h, cidx(c), 0, j)
    )
    return tok, tok_v, tok_part, state, per_chunk


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=(PAR, PAR, PAR, ARB)),
        interpret=_interpret(interpret),
    )


def _fwd_call(cfg: gm.Config, q, k, v, sc, gc, A0, anc0, Z0, T0, *, save, interpret=False):
    B, H = q.shape[:2]
    C, n, dk, dv, bv = cfg.C, cfg.n, cfg.dk, cfg.dv, cfg.bv
    mom, seg = cfg.momentum, cfg.seg
    tok, tok_v, _, state, per_chunk = _specs(cfg, reverse=False)
    want_y = not save
    ops = gm.make_ops()

    ins = [q, k, v, sc, gc, A0, anc0]
    in_specs = [tok(dk), tok(dk), tok_v(), tok(gm.NS), tok(C), state, state]
    if mom:
        ins.append(Z0)
        in_specs.append(state)
    if seg:
        ins.append(T0)
        in_specs.append(state)
    st_shape = jax.ShapeDtypeStruct((B, H, dk, dv), f32)
    out_shape, out_specs = [], []
    if want_y:
        out_shape.append(jax.ShapeDtypeStruct((B, H, n, C, dv), v.dtype))
        out_specs.append(tok_v())
    out_shape += [st_shape, st_shape]  # W_end, anchor of the last chunk with a token
    out_specs += [state, state]
    if mom:
        out_shape.append(st_shape)
        out_specs.append(state)
    if save:
        for _ in range(1 + mom):
            out_shape.append(jax.ShapeDtypeStruct((B, H, n, dk, dv), f32))
            out_specs.append(per_chunk)
    scratch = [pltpu.VMEM((dk, bv), f32) for _ in range(1 + mom)]

    def kernel(*refs):
        it = iter(refs)
        q_r, k_r, v_r, sc_r, gc_r, a0_r, anc0_r = (next(it) for _ in range(7))
        z0_r = next(it) if mom else None
        t0_r = next(it) if seg else None
        y_r = next(it) if want_y else None
        a_r, ao_r = next(it), next(it)
        z_r = next(it) if mom else None
        ss_r = next(it) if save else None
        zs_r = next(it) if save and mom else None
        s_scr = next(it)
        z_scr = next(it) if mom else None
        c = pl.program_id(3)

        @pl.when(c == 0)
        def _init():
            s_scr[...] = a0_r[...]
            if mom:
                z_scr[...] = z0_r[...]

        S = s_scr[...]
        Z = z_scr[...] if mom else None
        T0v = t0_r[...] if seg else None
        anc = lax.cond(c == 0, lambda: anc0_r[...], lambda: S)
        col, sca, last = gm.split_scalars(cfg, sc_r[...].astype(f32))
        y, S1, Z1 = gm.chunk_forward(
            cfg, ops, q_r[...], k_r[...], v_r[...], col, sca, gc_r[...], S, Z, anc, T0v, want_y
        )
        if want_y:
            y_r[...] = y.astype(y_r.dtype)
        if save:
            ss_r[...] = S
            if mom:
                zs_r[...] = Z

        @pl.when(c == 0)
        def _first_anchor():
            ao_r[...] = anc

        ao_r[...] = last * anc + (1.0 - last) * ao_r[...]
        s_scr[...] = S1
        if mom:
            z_scr[...] = Z1

        @pl.when(c == n - 1)
        def _final():
            a_r[...] = S1
            if mom:
                z_r[...] = Z1

    flops, nbytes = gm.cost(cfg, B, H, q.dtype.itemsize, backward=False)
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(B, H, cfg.nv, n),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        scratch_shapes=scratch,
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
        name="gradient_memory_fwd" + ("_states" if save else ""),
        **_params(interpret),
    )(*ins)
    outs = list(outs)
    y = outs.pop(0) if want_y else None
    A, ao = outs.pop(0), outs.pop(0)
    Z = outs.pop(0) if mom else None
    Ss = outs.pop(0) if save else None
    Zs = outs.pop(0) if save and mom else None
    return y, A, ao, Z, Ss, Zs


def _bwd_call(cfg: gm.Config, q, k, v, sc, gc, Ss, Zs, anc0, T0, dy, dA, dZ, dao, *, interpret):
    B, H = q.shape[:2]
    C, n, dk, dv, bv, nv = cfg.C, cfg.n, cfg.dk, cfg.dv, cfg.bv, cfg.nv
    mom, seg = cfg.momentum, cfg.seg
    tok, tok_v, tok_part, state, per_chunk = _specs(cfg, reverse=True)
    ops = gm.make_ops()

    ins = [q, k, v, sc, gc, dy, Ss]
    in_specs = [tok(dk), tok(dk), tok_v(), tok(gm.NS), tok(C), tok_v(), per_chunk]
    if mom:
        ins.append(Zs)
        in_specs.append(per_chunk)
    ins += [anc0, dA, dao]
    in_specs += [state, state, state]
    if mom:
        ins.append(dZ)
        in_specs.append(state)
    if seg:
        ins.append(T0)
        in_specs.append(state)

    def part(d):
        return jax.ShapeDtypeStruct((B, H, nv, n, C, d), f32)

    st_shape = jax.ShapeDtypeStruct((B, H, dk, dv), f32)
    out_shape = [part(dk), part(dk), jax.ShapeDtypeStruct((B, H, n, C, dv), f32)]
    out_shape += [part(gm.NS), part(C), st_shape, st_shape]
    out_specs = [tok_part(dk), tok_part(dk), tok_v(), tok_part(gm.NS), tok_part(C), state, state]
    if mom:
        out_shape.append(st_shape)
        out_specs.append(state)
    if seg:
        out_shape.append(st_shape)
        out_specs.append(state)
    scratch = [pltpu.VMEM((dk, bv), f32) for _ in range(1 + mom)]

    def kernel(*refs):
        it = iter(refs)
        q_r, k_r, v_r, sc_r, gc_r, dy_r, ss_r = (next(it) for _ in range(7))
        zs_r = next(it) if mom else None
        anc0_r, da_r, dao_r = next(it), next(it), next(it)
        dz_r = next(it) if mom else None
        t0_r = next(it) if seg else None
        dq_r, dk_r, dv_r, dsc_r, dgc_r, da0_r, danc0_r = (next(it) for _ in range(7))
        dz0_r = next(it) if mom else None
        dt0_r = next(it) if seg else None
        ds_scr = next(it)
        dz_scr = next(it) if mom else None
        c = pl.program_id(3)  # this step handles chunk n-1-c

        @pl.when(c == 0)
        def _init():
            ds_scr[...] = da_r[...]
            if mom:
                dz_scr[...] = dz_r[...]
            if seg:
                dt0_r[...] = jnp.zeros_like(dt0_r)

        S = ss_r[...]
        Z = zs_r[...] if mom else None
        T0v = t0_r[...] if seg else None
        anc = lax.cond(c == n - 1, lambda: anc0_r[...], lambda: S)
        col, sca, last = gm.split_scalars(cfg, sc_r[...].astype(f32))
        g = gm.chunk_backward(
            cfg,
            ops,
            q_r[...],
            k_r[...],
            v_r[...],
            col,
            sca,
            gc_r[...],
            S,
            Z,
            anc,
            T0v,
            dy_r[...],
            ds_scr[...],
            dz_scr[...] if mom else None,
        )
        danc = last * dao_r[...]
        if g["danc"] is not None:
            danc = danc + g["danc"]
        dq_r[...] = g["dq"]
        dk_r[...] = g["dk"]
        dv_r[...] = g["dv"]
        last_row, onehot = _row_col(C)
        dsc_r[...] = gm.scalar_cotangent(g["cols"], g["ends"], last_row, onehot)
        dgc_r[...] = g["dgc"]
        if seg:
            dt0_r[...] += g["dT0"]

        @pl.when(c < n - 1)
        def _carry():
            ds_scr[...] = g["dS"] + danc
            if mom:
                dz_scr[...] = g["dZ"]

        @pl.when(c == n - 1)
        def _first_chunk():
            da0_r[...] = g["dS"]
            danc0_r[...] = danc
            if mom:
                dz0_r[...] = g["dZ"]

    flops, nbytes = gm.cost(cfg, B, H, q.dtype.itemsize, backward=True)
    outs = list(
        pl.pallas_call(
            kernel,
            out_shape=tuple(out_shape),
            grid=(B, H, nv, n),
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            scratch_shapes=scratch,
            cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
            name="gradient_memory_bwd",
            **_params(interpret),
        )(*ins)
    )
    dq, dk_, dv_, dsc, dgc, dA0, danc0 = (outs.pop(0) for _ in range(7))
    dZ0 = outs.pop(0) if mom else None
    dT0 = outs.pop(0) if seg else None
    dq, dk_, dsc, dgc = (x.sum(2) for x in (dq, dk_, dsc, dgc))
    return dq, dk_, dv_, dsc, dgc, dA0, danc0, dZ0, dT0


def supports(q, k, v, eta, **kw) -> str | None:
    """None when the TPU kernel runs the call, else the reason (any C and head dims work: the
    blocks span the full (C, d) dims)."""
    return gm.unsupported(q, k, v, eta, **kw)


def gradient_memory_tpu(q, k, v, eta, *, interpret=False, block_v=None, **kw):
    """``gradient_memory`` (linear or two-layer MLP memory) with Mosaic TPU kernels; see the
    module docstring."""
    dv = v.shape[-1]
    mlp = kw["spec"].arch.kind == "mlp"
    if mlp:  # the hidden layer and the layer norm mix every value column: no dv blocks
        if block_v not in (None, dv):
            raise ValueError(
                f"gradient_memory (pallas_tpu): block_v={block_v}: an mlp memory runs the "
                f"whole value dim (dv={dv}) in one block"
            )
        bv = dv
    else:
        bv = block_v or default_block_v(dv)
    if dv % bv or (bv != dv and bv % 128):
        raise ValueError(
            f"gradient_memory (pallas_tpu): block_v={bv} must divide dv={dv} and be a "
            "multiple of 128 (or dv itself)"
        )
    fwd_call, bwd_call = (_mlp_fwd_call, _mlp_bwd_call) if mlp else (_fwd_call, _bwd_call)

    def fwd(cfg, *args, save):
        return fwd_call(cfg, *args, save=save, interpret=interpret)

    def bwd(cfg, *args):
        return bwd_call(cfg, *args, interpret=interpret)

    return gm.run(fwd, bwd, q, k, v, eta, block_v=bv, **kw)


def register() -> None:
    register_kernel("gradient_memory", "tpu", gradient_memory_tpu, supports=supports)


# --------------------------------------------------------------------------------------------
# Two-layer MLP memory
# --------------------------------------------------------------------------------------------

MLP_VMEM_CAP = 100 * 2**20  # v5e / v6e have 128 MiB of VMEM per core


def mlp_vmem_bytes(
    dk: int,
    dv: int,
    *,
    expansion: float = 4.0,
    chunk: int = 64,
    itemsize: int = 2,
    momentum: bool = True,
    seg: bool = False,
    backward: bool = False,
) -> int:
    """Analytic VMEM footprint of one two-layer-memory kernel (W0 [dk,dh], W1 [dh,dv],
    dh = expansion * dv): the token blocks double-buffered, the weight-sized carried inputs
    single-buffered and outputs double-buffered, the fp32 scratch, and the chunk's live
    [C, dh] / weight-sized fp32 temporaries (counts calibrated against Mosaic's scoped-VMEM
    checks for v5e at head dims 128 / 256, chunk 64: an upper bound there, by 4-5%)."""
    dh = max(1, int(round(expansion * dv)))

    def tile(rows, cols, size=4):
        sub = 8 * (4 // size)
        return -(-rows // sub) * sub * (-(-cols // 128) * 128) * size

    C = chunk
    w = tile(dk, dh) + tile(dh, dv)  # one fp32 copy of both weights
    toks = 2 * tile(C, dk, itemsize) + 2 * tile(C, dv, itemsize) + tile(C, gm.NS) + tile(C, C)
    temps = 8 * tile(C, dh) + 2 * w  # activations, errors, dual-form scores; S_end / Z_end
    if not backward:
        n_in = 2 + momentum + seg  # A0, anchor, Z0, W0
        n_out = 2 + momentum  # A_end, anchor out, Z_end
        return 2 * toks + w * (n_in + 2 * n_out + 1 + momentum) + temps
    toks += 2 * tile(C, dk) + tile(C, dv) + tile(C, gm.NS) + tile(C, C)  # cotangents
    per_chunk = 2 * w * (1 + momentum)  # chunk-start states, double-buffered
    n_in = 3 + momentum + seg  # anchor, dA, d anchor, dZ, W0
    n_out = 2 + momentum + seg  # dA0, d anchor0, dZ0, dW0
    temps += 3 * w * (2 + momentum + seg)  # the vjp's weight-sized cotangents
    temps += 6 * w + 40 * tile(C, dh)  # the vjp's residuals of the anchor pass and the reads
    return 2 * toks + per_chunk + w * (n_in + n_out + 1 + momentum) + temps


def _mlp_vmem_limit(cfg: gm.Config, itemsize: int, backward: bool) -> int:
    need = mlp_vmem_bytes(
        cfg.dk,
        cfg.dv,
        expansion=cfg.dh / cfg.dv,
        chunk=cfg.C,
        itemsize=itemsize,
        momentum=cfg.momentum,
        seg=cfg.seg,
        backward=backward,
    )
    return int(min(MLP_VMEM_CAP, max(32 * 2**20, need + need // 4)))  # v5e's default is 16 MiB


def _mlp_specs(cfg: gm.Config, reverse: bool):
    n = cfg.n

    def cidx(c):
        return n - 1 - c if reverse else c

    def tok(d):  # [B,H,n,C,d]
        return pl.BlockSpec((None, None, None, cfg.C, d), lambda b, h, c: (b, h, cidx(c), 0, 0))

    def state(i):  # [B,H,din,dout], resident across the chunk axis: one buffer
        din, dout = gm.mlp_shapes(cfg)[i]
        return pl.BlockSpec(
            (None, None, din, dout), lambda b, h, c: (b, h, 0, 0), pipeline_mode=pl.Buffered(1)
        )

    def per_chunk(i):  # [B,H,n,din,dout]
        din, dout = gm.mlp_shapes(cfg)[i]
        return pl.BlockSpec((None, None, None, din, dout), lambda b, h, c: (b, h, cidx(c), 0, 0))

    return tok, state, per_chunk


def _mlp_params(cfg, interpret, itemsize, backward):
    return dict(
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(PAR, PAR, ARB),
            vmem_limit_bytes=_mlp_vmem_limit(cfg, itemsize, backward),
        ),
        interpret=_interpret(interpret),
    )


def _take(it, count):
    return tuple(next(it) for _ in range(count))


def _mlp_fwd_call(cfg: gm.Config, q, k, v, sc, gc, A0, anc0, Z0, T0, *, save, interpret=False):
    B, H = q.shape[:2]
    C, n, dk, dv = cfg.C, cfg.n, cfg.dk, cfg.dv
    mom, seg, want_y = cfg.momentum, cfg.seg, not save
    shapes = gm.mlp_shapes(cfg)
    tok, state, per_chunk = _mlp_specs(cfg, reverse=False)
    ops = gm.make_ops()
    pair = [state(0), state(1)]

    ins = [q, k, v, sc, gc, *A0, *anc0]
    in_specs = [tok(dk), tok(dk), tok(dv), tok(gm.NS), tok(C), *pair, *pair]
    if mom:
        ins += list(Z0)
        in_specs += pair
    if seg:
        ins += list(T0)
        in_specs += pair
    st = [jax.ShapeDtypeStruct((B, H) + s, f32) for s in shapes]
    out_shape, out_specs = [], []
    if want_y:
        out_shape.append(jax.ShapeDtypeStruct((B, H, n, C, dv), v.dtype))
        out_specs.append(tok(dv))
    for _ in range(2 + mom):  # W_end, anchor of the last chunk with a token, Z_end
        out_shape += st
        out_specs += pair
    if save:
        for _ in range(1 + mom):
            out_shape += [jax.ShapeDtypeStruct((B, H, n) + s, f32) for s in shapes]
            out_specs += [per_chunk(0), per_chunk(1)]
    scratch = [pltpu.VMEM(s, f32) for _ in range(1 + mom) for s in shapes]

    def kernel(*refs):
        it = iter(refs)
        q_r, k_r, v_r, sc_r, gc_r = _take(it, 5)
        a0_r, anc0_r = _take(it, 2), _take(it, 2)
        z0_r = _take(it, 2) if mom else None
        t0_r = _take(it, 2) if seg else None
        y_r = next(it) if want_y else None
        a_r, ao_r = _take(it, 2), _take(it, 2)
        z_r = _take(it, 2) if mom else None
        ss_r = _take(it, 2) if save else None
        zs_r = _take(it, 2) if save and mom else None
        s_scr = _take(it, 2)
        z_scr = _take(it, 2) if mom else None
        c = pl.program_id(2)

        @pl.when(c == 0)
        def _init():
            for i in range(2):
                s_scr[i][...] = a0_r[i][...]
                if mom:
                    z_scr[i][...] = z0_r[i][...]

        S = tuple(r[...] for r in s_scr)
        Z = tuple(r[...] for r in z_scr) if mom else None
        T0v = tuple(r[...] for r in t0_r) if seg else None
        anc = lax.cond(c == 0, lambda: tuple(r[...] for r in anc0_r), lambda: S)
        col, sca, last = gm.split_scalars(cfg, sc_r[...].astype(f32))
        y, S1, Z1 = gm.mlp_chunk_forward(
            cfg, ops, q_r[...], k_r[...], v_r[...], col, sca, gc_r[...], S, Z, anc, T0v, want_y
        )
        if want_y:
            y_r[...] = y.astype(y_r.dtype)
        for i in range(2):
            if save:
                ss_r[i][...] = S[i]
                if mom:
                    zs_r[i][...] = Z[i]

            @pl.when(c == 0)
            def _first_anchor(i=i):
                ao_r[i][...] = anc[i]

            ao_r[i][...] = last * anc[i] + (1.0 - last) * ao_r[i][...]
            s_scr[i][...] = S1[i]
            if mom:
                z_scr[i][...] = Z1[i]

        @pl.when(c == n - 1)
        def _final():
            for i in range(2):
                a_r[i][...] = S1[i]
                if mom:
                    z_r[i][...] = Z1[i]

    flops, nbytes = gm.cost_mlp(cfg, B, H, q.dtype.itemsize, backward=False)
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(B, H, n),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        scratch_shapes=scratch,
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
        name="gradient_memory_mlp_fwd" + ("_states" if save else ""),
        **_mlp_params(cfg, interpret, q.dtype.itemsize, backward=False),
    )(*ins)
    outs = list(outs)
    y = outs.pop(0) if want_y else None

    def two():
        return (outs.pop(0), outs.pop(0))

    A, ao = two(), two()
    Z = two() if mom else None
    Ss = two() if save else None
    Zs = two() if save and mom else None
    return y, A, ao, Z, Ss, Zs


def _mlp_bwd_call(cfg: gm.Config, q, k, v, sc, gc, Ss, Zs, anc0, T0, dy, dA, dZ, dao, *, interpret):
    B, H = q.shape[:2]
    C, n, dk, dv = cfg.C, cfg.n, cfg.dk, cfg.dv
    mom, seg = cfg.momentum, cfg.seg
    shapes = gm.mlp_shapes(cfg)
    tok, state, per_chunk = _mlp_specs(cfg, reverse=True)
    ops = gm.make_ops()
    pair, chunks = [state(0), state(1)], [per_chunk(0), per_chunk(1)]

    ins = [q, k, v, sc, gc, dy, *Ss]
    in_specs = [tok(dk), tok(dk), tok(dv), tok(gm.NS), tok(C), tok(dv), *chunks]
    if mom:
        ins += list(Zs)
        in_specs += chunks
    ins += [*anc0, *dA, *dao]
    in_specs += pair * 3
    if mom:
        ins += list(dZ)
        in_specs += pair
    if seg:
        ins += list(T0)
        in_specs += pair

    def tok_out(d):
        return jax.ShapeDtypeStruct((B, H, n, C, d), f32)

    st = [jax.ShapeDtypeStruct((B, H) + s, f32) for s in shapes]
    out_shape = [tok_out(dk), tok_out(dk), tok_out(dv), tok_out(gm.NS), tok_out(C)]
    out_specs = [tok(dk), tok(dk), tok(dv), tok(gm.NS), tok(C)]
    for _ in range(2 + mom + seg):  # dA0, d anchor0, dZ0, dW0
        out_shape += st
        out_specs += pair
    scratch = [pltpu.VMEM(s, f32) for _ in range(1 + mom) for s in shapes]

    def kernel(*refs):
        it = iter(refs)
        q_r, k_r, v_r, sc_r, gc_r, dy_r = _take(it, 6)
        ss_r = _take(it, 2)
        zs_r = _take(it, 2) if mom else None
        anc0_r, da_r, dao_r = _take(it, 2), _take(it, 2), _take(it, 2)
        dz_r = _take(it, 2) if mom else None
        t0_r = _take(it, 2) if seg else None
        dq_r, dk_r, dv_r, dsc_r, dgc_r = _take(it, 5)
        da0_r, danc0_r = _take(it, 2), _take(it, 2)
        dz0_r = _take(it, 2) if mom else None
        dt0_r = _take(it, 2) if seg else None
        ds_scr = _take(it, 2)
        dz_scr = _take(it, 2) if mom else None
        c = pl.program_id(2)  # this step handles chunk n-1-c

        @pl.when(c == 0)
        def _init():
            for i in range(2):
                ds_scr[i][...] = da_r[i][...]
                if mom:
                    dz_scr[i][...] = dz_r[i][...]
                if seg:
                    dt0_r[i][...] = jnp.zeros_like(dt0_r[i])

        S = tuple(r[...] for r in ss_r)
        Z = tuple(r[...] for r in zs_r) if mom else None
        T0v = tuple(r[...] for r in t0_r) if seg else None
        anc = lax.cond(c == n - 1, lambda: tuple(r[...] for r in anc0_r), lambda: S)
        col, sca, last = gm.split_scalars(cfg, sc_r[...].astype(f32))
        g = gm.mlp_chunk_backward(
            cfg,
            ops,
            q_r[...],
            k_r[...],
            v_r[...],
            col,
            sca,
            gc_r[...],
            S,
            Z,
            anc,
            T0v,
            dy_r[...],
            tuple(r[...] for r in ds_scr),
            tuple(r[...] for r in dz_scr) if mom else None,
        )
        danc = tuple(last * dao_r[i][...] + g["danc"][i] for i in range(2))
        dq_r[...] = g["dq"]
        dk_r[...] = g["dk"]
        dv_r[...] = g["dv"]
        last_row, onehot = _row_col(C)
        dsc_r[...] = gm.scalar_cotangent(g["cols"], g["ends"], last_row, onehot)
        dgc_r[...] = g["dgc"]
        for i in range(2):
            if seg:
                dt0_r[i][...] += g["dT0"][i]

            @pl.when(c < n - 1)
            def _carry(i=i):
                ds_scr[i][...] = g["dS"][i] + danc[i]
                if mom:
                    dz_scr[i][...] = g["dZ"][i]

            @pl.when(c == n - 1)
            def _first_chunk(i=i):
                da0_r[i][...] = g["dS"][i]
                danc0_r[i][...] = danc[i]
                if mom:
                    dz0_r[i][...] = g["dZ"][i]

    flops, nbytes = gm.cost_mlp(cfg, B, H, q.dtype.itemsize, backward=True)
    outs = list(
        pl.pallas_call(
            kernel,
            out_shape=tuple(out_shape),
            grid=(B, H, n),
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            scratch_shapes=scratch,
            cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
            name="gradient_memory_mlp_bwd",
            **_mlp_params(cfg, interpret, q.dtype.itemsize, backward=True),
        )(*ins)
    )
    dq, dk_, dv_, dsc, dgc = (outs.pop(0) for _ in range(5))

    def two():
        return (outs.pop(0), outs.pop(0))

    dA0, danc0 = two(), two()
    dZ0 = two() if mom else None
    dT0 = two() if seg else None
    return dq, dk_, dv_, dsc, dgc, dA0, danc0, dZ0, dT0
