"""Pallas Triton (GPU) kernels for the regime-C gradient memory with a linear or two-layer MLP
memory (forward and backward), behind ``gradient_memory(..., impl="pallas_gpu")`` /
``linear_memory``.

Math (SPEC section 2, regime C; Sun et al. 2024 TTT-Linear, Behrouz, Zhong, Mirrokni 2025
Titans, Behrouz et al. 2025 Miras): inside the chunk that starts at t', every gradient is taken
at the anchor W(t'), u_j = k_j d_j^T with d_j = dl/dpred at k_j^T W(t'), and

    y_t   = bb_t q_t W(t') - f_t q_t Z(t') + rb_t q_t W0 - sum_{j<=t} Gc[t,j] (q_t . k_j) d_j
    W_end = bb_C W(t') - f_C Z(t') + rb_C W0 - (K o Gc[C,:])^T D
    Z_end = P_C Z(t') + (K o N_C)^T D

(:mod:`._gradient_memory_math`; the coefficients come from the gates in XLA).

One program per (batch x head, dv block): the chunk loop runs inside the kernel
(``lax.fori_loop`` over ``pl.ds`` slices) with W and Z (fp32, [dk, block_v]) carried as loop
values. The value dim splits into blocks because every loss's output error is elementwise in
it (default block_v = min(dv, 8192 / dk), keeping one fp32 state at 32 KiB); per-token
cotangents are partial over dv blocks and summed in XLA. Triton needs power-of-two block dims
and dots with every dim >= 16, so ``supports`` asks for C, dk, dv powers of two >= 16. fp32
dots use IEEE precision (``Precision.HIGHEST``), q k^T runs in the input dtype.

Backward: a custom_vjp whose residuals are the inputs only; it re-runs the forward kernel to
recompute the chunk-start states (written to HBM, transient), then a second kernel loops over
the chunks in reverse carrying dW, dZ and dW0.

Two-layer MLP memory (TTT-MLP, Titans LMM L_M = 2; :mod:`._gradient_memory_math`): one
program per batch x head, the chunk loop inside the kernel carrying (W0, W1) and their momenta
as loop values, reads in the dual form per layer, the chunk backward ``jax.vjp`` of the chunk
forward inside the kernel body. No dv blocks (the hidden layer and the layer norm mix every
value column), and the hidden width must be a power of two too. The whole weight pair lives in
registers / shared memory, so large head dims will spill (lowering is checked from this host;
GPU run time is not measured).

Supported / unsupported calls: as the TPU kernel (linear and depth-2 MLP memories; dot / l2 /
lp / huber; per-head gates; params; segment_ids; carried state), plus the power-of-two rule
above. Only jax is used here (never flax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..ops._common import register_kernel
from . import _gradient_memory_math as gm

f32 = jnp.float32


def _pow2(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


def default_block_v(dk: int, dv: int) -> int:
    return max(16, min(dv, 8192 // dk))


def _compiler(cfg: gm.Config):
    return plgpu.CompilerParams(num_warps=4 if cfg.dk * cfg.bv <= 4096 else 8, num_stages=1)


def _estimate(flops_bytes: tuple[int, int]) -> pl.CostEstimate:
    flops, nbytes = flops_bytes
    return pl.CostEstimate(flops=int(flops), transcendentals=0, bytes_accessed=int(nbytes))


def _to_rows(cfg: gm.Config, q, k, v, sc, gc):
    """[B,H,n,C,...] -> the kernels' layout: [BH, L, d]; sc slot-major [BH, NS, L]."""
    B, H = q.shape[:2]
    L = cfg.n * cfg.C

    def rows(x):
        return x.reshape(B * H, L, x.shape[-1])

    sc = jnp.moveaxis(sc, -1, 2).reshape(B * H, gm.NS, L)
    return rows(q), rows(k), rows(v), sc, rows(gc)


def _flat(x):
    return None if x is None else x.reshape((-1,) + x.shape[2:])


def _load_cols(cfg: gm.Config, sc_r, c):
    sl = pl.ds(c * cfg.C, cfg.C)
    col = {nm: sc_r[slot, sl][:, None] for nm, slot in gm.COLS.items()}
    end = c * cfg.C + cfg.C - 1
    sca = {nm: sc_r[slot, end] for nm, slot in (("bb", gm.BB), ("f", gm.F), ("rb", gm.RB))}
    sca["pe"] = sc_r[gm.PE, end]
    return col, sca, sc_r[gm.LAST, c * cfg.C]


def _fwd_call(cfg: gm.Config, q, k, v, sc, gc, A0, anc0, Z0, T0, *, save, interpret=False):
    B, H = q.shape[:2]
    BH, C, n, dk, dv, bv = B * H, cfg.C, cfg.n, cfg.dk, cfg.dv, cfg.bv
    L = n * C
    mom, seg, want_y = cfg.momentum, cfg.seg, not save
    ops = gm.make_ops()
    qr, kr, vr, scr, gcr = _to_rows(cfg, q, k, v, sc, gc)

    def full(d):
        return pl.BlockSpec((None, L, d), lambda i, j: (i, 0, 0))

    vspec = pl.BlockSpec((None, L, bv), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j))
    ins = [qr, kr, vr, scr, gcr, _flat(A0), _flat(anc0)]
    in_specs = [full(dk), full(dk), vspec, pl.BlockSpec((None, gm.NS, L), lambda i, j: (i, 0, 0))]
    in_specs += [full(C), state, state]
    if mom:
        ins.append(_flat(Z0))
        in_specs.append(state)
    if seg:
        ins.append(_flat(T0))
        in_specs.append(state)
    st_shape = jax.ShapeDtypeStruct((BH, dk, dv), f32)
    out_shape, out_specs = [], []
    if want_y:
        out_shape.append(jax.ShapeDtypeStruct((BH, L, dv), v.dtype))
        out_specs.append(vspec)
    out_shape += [st_shape, st_shape]
    out_specs += [state, state]
    if mom:
        out_shape.append(st_shape)
        out_specs.append(state)
    if save:
        for _ in range(1 + mom):
            out_shape.append(jax.ShapeDtypeStruct((BH, n, dk, dv), f32))
            out_specs.append(pl.BlockSpec((None, n, dk, bv), lambda i, j: (i, 0, 0, j)))

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
        anc0 = anc0_r[...]
        T0v = t0_r[...] if seg else None

        def body(c, carry):
            S, Z, ao = carry
            sl = pl.ds(c * C, C)
            col, sca, last = _load_cols(cfg, sc_r, c)
            anc = jnp.where(c == 0, anc0, S)
            y, S1, Z1 = gm.chunk_forward(
                cfg, ops, q_r[sl, :], k_r[sl, :], v_r[sl, :], col, sca, gc_r[sl, :],
                S, Z, anc, T0v, want_y,
            )  # fmt: skip
            if want_y:
                y_r[sl, :] = y.astype(y_r.dtype)
            if save:
                ss_r[c] = S
                if mom:
                    zs_r[c] = Z
            ao = last * anc + (1.0 - last) * ao
            return S1, Z1, ao

        Z0v = z0_r[...] if mom else None
        S, Z, ao = lax.fori_loop(0, n, body, (a0_r[...], Z0v, anc0))
        a_r[...] = S
        ao_r[...] = ao
        if mom:
            z_r[...] = Z

    outs = list(
        pl.pallas_call(
            kernel,
            out_shape=tuple(out_shape),
            grid=(BH, cfg.nv),
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            compiler_params=_compiler(cfg),
            cost_estimate=_estimate(gm.cost(cfg, B, H, q.dtype.itemsize, backward=False)),
            interpret=bool(interpret),
            name="gradient_memory_fwd" + ("_states" if save else ""),
        )(*ins)
    )
    y = outs.pop(0) if want_y else None
    if y is not None:
        y = y.reshape(B, H, n, C, dv)
    A, ao = outs.pop(0).reshape(B, H, dk, dv), outs.pop(0).reshape(B, H, dk, dv)
    Z = outs.pop(0).reshape(B, H, dk, dv) if mom else None
    Ss = outs.pop(0) if save else None
    Zs = outs.pop(0) if save and mom else None
    return y, A, ao, Z, Ss, Zs


def _bwd_call(cfg: gm.Config, q, k, v, sc, gc, Ss, Zs, anc0, T0, dy, dA, dZ, dao, *, interpret):
    B, H = q.shape[:2]
    BH, C, n, dk, dv, bv, nv = B * H, cfg.C, cfg.n, cfg.dk, cfg.dv, cfg.bv, cfg.nv
    L = n * C
    mom, seg = cfg.momentum, cfg.seg
    ops = gm.make_ops()
    qr, kr, vr, scr, gcr = _to_rows(cfg, q, k, v, sc, gc)
    dyr = dy.reshape(BH, L, dv)

    def full(d):
        return pl.BlockSpec((None, L, d), lambda i, j: (i, 0, 0))

    def part(d):
        return pl.BlockSpec((None, None, L, d), lambda i, j: (i, j, 0, 0))

    vspec = pl.BlockSpec((None, L, bv), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j))
    snaps = pl.BlockSpec((None, n, dk, bv), lambda i, j: (i, 0, 0, j))
    ins = [qr, kr, vr, scr, gcr, dyr, Ss]
    in_specs = [full(dk), full(dk), vspec, pl.BlockSpec((None, gm.NS, L), lambda i, j: (i, 0, 0))]
    in_specs += [full(C), vspec, snaps]
    if mom:
        ins.append(Zs)
        in_specs.append(snaps)
    ins += [_flat(anc0), _flat(dA), _flat(dao)]
    in_specs += [state, state, state]
    if mom:
        ins.append(_flat(dZ))
        in_specs.append(state)
    if seg:
        ins.append(_flat(T0))
        in_specs.append(state)
    st_shape = jax.ShapeDtypeStruct((BH, dk, dv), f32)
    out_shape = [jax.ShapeDtypeStruct((BH, nv, L, dk), f32)] * 2
    out_shape += [jax.ShapeDtypeStruct((BH, L, dv), f32)]
    out_shape += [
        jax.ShapeDtypeStruct((BH, nv, gm.NS, L), f32),
        jax.ShapeDtypeStruct((BH, nv, L, C), f32),
        st_shape,
        st_shape,
    ]
    out_specs = [part(dk), part(dk), vspec]
    out_specs += [pl.BlockSpec((None, None, gm.NS, L), lambda i, j: (i, j, 0, 0)), part(C)]
    out_specs += [state, state]
    if mom:
        out_shape.append(st_shape)
        out_specs.append(state)
    if seg:
        out_shape.append(st_shape)
        out_specs.append(state)

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
        anc0, dao = anc0_r[...], dao_r[...]
        T0v = t0_r[...] if seg else None
        last_row = (lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1).astype(f32)

        def body(i, carry):
            dS1, dZ1, dT0 = carry
            c = n - 1 - i
            sl = pl.ds(c * C, C)
            col, sca, last = _load_cols(cfg, sc_r, c)
            S = ss_r[c]
            Z = zs_r[c] if mom else None
            anc = jnp.where(c == 0, anc0, S)
            g = gm.chunk_backward(
                cfg, ops, q_r[sl, :], k_r[sl, :], v_r[sl, :], col, sca, gc_r[sl, :],
                S, Z, anc, T0v, dy_r[sl, :], dS1, dZ1,
            )  # fmt: skip
            danc = last * dao
            if g["danc"] is not None:
                danc = danc + g["danc"]
            dq_r[sl, :] = g["dq"]
            dk_r[sl, :] = g["dk"]
            dv_r[sl, :] = g["dv"]
            dgc_r[sl, :] = g["dgc"]
            for slot in range(gm.NS):
                x = jnp.zeros((C, 1), f32)
                for nm, s in gm.COLS.items():
                    if s == slot and g["cols"].get(nm) is not None:
                        x = x + g["cols"][nm]
                for nm, s in (("bb", gm.BB), ("f", gm.F), ("rb", gm.RB), ("pe", gm.PE)):
                    if s == slot and g["ends"].get(nm) is not None:
                        x = x + g["ends"][nm] * last_row
                dsc_r[slot, sl] = x.reshape(C)

            @pl.when(c == 0)
            def _first_chunk():
                danc0_r[...] = danc

            dS = g["dS"] + jnp.where(c == 0, 0.0, danc)
            if seg:
                dT0 = dT0 + g["dT0"]
            return dS, g["dZ"], dT0

        init = (da_r[...], dz_r[...] if mom else None, jnp.zeros((dk, bv), f32) if seg else None)
        dS, dZ0, dT0 = lax.fori_loop(0, n, body, init)
        da0_r[...] = dS
        if mom:
            dz0_r[...] = dZ0
        if seg:
            dt0_r[...] = dT0

    outs = list(
        pl.pallas_call(
            kernel,
            out_shape=tuple(out_shape),
            grid=(BH, nv),
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            compiler_params=_compiler(cfg),
            cost_estimate=_estimate(gm.cost(cfg, B, H, q.dtype.itemsize, backward=True)),
            interpret=bool(interpret),
            name="gradient_memory_bwd",
        )(*ins)
    )
    dq, dk_, dv_, dsc, dgc, dA0, danc0 = (outs.pop(0) for _ in range(7))
    dZ0 = outs.pop(0) if mom else None
    dT0 = outs.pop(0) if seg else None

    def tok(x, d):  # [BH, nv, L, d] -> [B,H,n,C,d] (summed over dv blocks)
        return x.sum(1).reshape(B, H, n, C, d)

    dsc = jnp.moveaxis(dsc.sum(1).reshape(B, H, gm.NS, n, C), 2, -1)
    st = (B, H, dk, dv)
    return (
        tok(dq, dk),
        tok(dk_, dk),
        dv_.reshape(B, H, n, C, dv),
        dsc,
        tok(dgc, C),
        dA0.reshape(st),
        danc0.reshape(st),
        None if dZ0 is None else dZ0.reshape(st),
        None if dT0 is None else dT0.reshape(st),
    )


def supports(q, k, v, eta, **kw) -> str | None:
    reason = gm.unsupported(q, k, v, eta, **kw)
    if reason is not None:
        return reason
    dk, dv, C = q.shape[-1], v.shape[-1], kw["chunk_size"]
    dims = [("chunk_size", C), ("dk", dk), ("dv", dv)]
    if kw["spec"].arch.kind == "mlp":
        dims.append(("the mlp hidden width", kw["spec"].arch.hidden(dv)))
    for name, x in dims:
        if not _pow2(x):
            return f"{name}={x} is not a power of two >= 16 (Triton block dims)"
    return None


def gradient_memory_gpu(q, k, v, eta, *, interpret=False, block_v=None, **kw):
    """``gradient_memory`` (linear or two-layer MLP memory) with Pallas Triton kernels; see the
    module docstring."""
    dk, dv = q.shape[-1], v.shape[-1]
    mlp = kw["spec"].arch.kind == "mlp"
    if mlp:  # the hidden layer and the layer norm mix every value column: no dv blocks
        if block_v not in (None, dv):
            raise ValueError(
                f"gradient_memory (pallas_gpu): block_v={block_v}: an mlp memory runs the "
                f"whole value dim (dv={dv}) in one block"
            )
        bv = dv
    else:
        bv = block_v or default_block_v(dk, dv)
    if dv % bv or not _pow2(bv):
        raise ValueError(
            f"gradient_memory (pallas_gpu): block_v={bv} must be a power of two >= 16 dividing "
            f"dv={dv}"
        )
    fwd_call, bwd_call = (_mlp_fwd_call, _mlp_bwd_call) if mlp else (_fwd_call, _bwd_call)

    def fwd(cfg, *args, save):
        return fwd_call(cfg, *args, save=save, interpret=interpret)

    def bwd(cfg, *args):
        return bwd_call(cfg, *args, interpret=interpret)

    return gm.run(fwd, bwd, q, k, v, eta, block_v=bv, **kw)


def register() -> None:
    register_kernel("gradient_memory", "gpu", gradient_memory_gpu, supports=supports)


# --------------------------------------------------------------------------------------------
# Two-layer MLP memory
# --------------------------------------------------------------------------------------------


def _mlp_compiler(cfg: gm.Config):
    return plgpu.CompilerParams(num_warps=4 if cfg.dk * cfg.dh <= 4096 else 8, num_stages=1)


def _mlp_col_sca(cfg: gm.Config, sc_r, c):
    col, sca, last = _load_cols(cfg, sc_r, c)
    return col, {nm: jnp.full((1, 1), x, f32) for nm, x in sca.items()}, last


def _mlp_fwd_call(cfg: gm.Config, q, k, v, sc, gc, A0, anc0, Z0, T0, *, save, interpret=False):
    B, H = q.shape[:2]
    BH, C, n, dk, dv = B * H, cfg.C, cfg.n, cfg.dk, cfg.dv
    L = n * C
    mom, seg, want_y = cfg.momentum, cfg.seg, not save
    shapes = gm.mlp_shapes(cfg)
    ops = gm.make_ops()
    qr, kr, vr, scr, gcr = _to_rows(cfg, q, k, v, sc, gc)

    def full(d):
        return pl.BlockSpec((None, L, d), lambda i: (i, 0, 0))

    pair = [pl.BlockSpec((None,) + s, lambda i: (i, 0, 0)) for s in shapes]
    chunks = [pl.BlockSpec((None, n) + s, lambda i: (i, 0, 0, 0)) for s in shapes]
    ins = [qr, kr, vr, scr, gcr, *map(_flat, A0), *map(_flat, anc0)]
    in_specs = [full(dk), full(dk), full(dv), pl.BlockSpec((None, gm.NS, L), lambda i: (i, 0, 0))]
    in_specs += [full(C), *pair, *pair]
    if mom:
        ins += list(map(_flat, Z0))
        in_specs += pair
    if seg:
        ins += list(map(_flat, T0))
        in_specs += pair
    st = [jax.ShapeDtypeStruct((BH,) + s, f32) for s in shapes]
    out_shape, out_specs = [], []
    if want_y:
        out_shape.append(jax.ShapeDtypeStruct((BH, L, dv), v.dtype))
        out_specs.append(full(dv))
    for _ in range(2 + mom):
        out_shape += st
        out_specs += pair
    if save:
        for _ in range(1 + mom):
            out_shape += [jax.ShapeDtypeStruct((BH, n) + s, f32) for s in shapes]
            out_specs += chunks

    def kernel(*refs):
        it = iter(refs)
        q_r, k_r, v_r, sc_r, gc_r = (next(it) for _ in range(5))
        a0_r, anc0_r = (next(it), next(it)), (next(it), next(it))
        z0_r = (next(it), next(it)) if mom else None
        t0_r = (next(it), next(it)) if seg else None
        y_r = next(it) if want_y else None
        a_r, ao_r = (next(it), next(it)), (next(it), next(it))
        z_r = (next(it), next(it)) if mom else None
        ss_r = (next(it), next(it)) if save else None
        zs_r = (next(it), next(it)) if save and mom else None
        anc0 = tuple(r[...] for r in anc0_r)
        T0v = tuple(r[...] for r in t0_r) if seg else None

        def body(c, carry):
            S, Z, ao = carry
            sl = pl.ds(c * C, C)
            col, sca, last = _mlp_col_sca(cfg, sc_r, c)
            anc = tuple(jnp.where(c == 0, a, s) for a, s in zip(anc0, S, strict=True))
            y, S1, Z1 = gm.mlp_chunk_forward(
                cfg, ops, q_r[sl, :], k_r[sl, :], v_r[sl, :], col, sca, gc_r[sl, :],
                S, Z, anc, T0v, want_y,
            )  # fmt: skip
            if want_y:
                y_r[sl, :] = y.astype(y_r.dtype)
            if save:
                for i in range(2):
                    ss_r[i][c] = S[i]
                    if mom:
                        zs_r[i][c] = Z[i]
            ao = tuple(last * a + (1.0 - last) * o for a, o in zip(anc, ao, strict=True))
            return S1, Z1, ao

        init = (tuple(r[...] for r in a0_r), tuple(r[...] for r in z0_r) if mom else None, anc0)
        S, Z, ao = lax.fori_loop(0, n, body, init)
        for i in range(2):
            a_r[i][...] = S[i]
            ao_r[i][...] = ao[i]
            if mom:
                z_r[i][...] = Z[i]

    outs = list(
        pl.pallas_call(
            kernel,
            out_shape=tuple(out_shape),
            grid=(BH,),
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            compiler_params=_mlp_compiler(cfg),
            cost_estimate=_estimate(gm.cost_mlp(cfg, B, H, q.dtype.itemsize, backward=False)),
            interpret=bool(interpret),
            name="gradient_memory_mlp_fwd" + ("_states" if save else ""),
        )(*ins)
    )
    y = outs.pop(0).reshape(B, H, n, C, dv) if want_y else None

    def two(lead=(B, H)):
        return tuple(outs.pop(0).reshape(lead + s) for s in shapes)

    A, ao = two(), two()
    Z = two() if mom else None
    Ss = two((BH, n)) if save else None
    Zs = two((BH, n)) if save and mom else None
    return y, A, ao, Z, Ss, Zs


def _mlp_bwd_call(cfg: gm.Config, q, k, v, sc, gc, Ss, Zs, anc0, T0, dy, dA, dZ, dao, *, interpret):
    B, H = q.shape[:2]
    BH, C, n, dk, dv = B * H, cfg.C, cfg.n, cfg.dk, cfg.dv
    L = n * C
    mom, seg = cfg.momentum, cfg.seg
    shapes = gm.mlp_shapes(cfg)
    ops = gm.make_ops()
    qr, kr, vr, scr, gcr = _to_rows(cfg, q, k, v, sc, gc)
    dyr = dy.reshape(BH, L, dv)

    def full(d):
        return pl.BlockSpec((None, L, d), lambda i: (i, 0, 0))

    pair = [pl.BlockSpec((None,) + s, lambda i: (i, 0, 0)) for s in shapes]
    chunks = [pl.BlockSpec((None, n) + s, lambda i: (i, 0, 0, 0)) for s in shapes]
    sc_spec = pl.BlockSpec((None, gm.NS, L), lambda i: (i, 0, 0))
    ins = [qr, kr, vr, scr, gcr, dyr, *Ss]
    in_specs = [full(dk), full(dk), full(dv), sc_spec, full(C), full(dv), *chunks]
    if mom:
        ins += list(Zs)
        in_specs += chunks
    ins += [*map(_flat, anc0), *map(_flat, dA), *map(_flat, dao)]
    in_specs += pair * 3
    if mom:
        ins += list(map(_flat, dZ))
        in_specs += pair
    if seg:
        ins += list(map(_flat, T0))
        in_specs += pair
    st = [jax.ShapeDtypeStruct((BH,) + s, f32) for s in shapes]
    out_shape = [jax.ShapeDtypeStruct((BH, L, d), f32) for d in (dk, dk, dv)]
    out_shape += [jax.ShapeDtypeStruct((BH, gm.NS, L), f32), jax.ShapeDtypeStruct((BH, L, C), f32)]
    out_specs = [full(dk), full(dk), full(dv), sc_spec, full(C)]
    for _ in range(2 + mom + seg):
        out_shape += st
        out_specs += pair

    def kernel(*refs):
        it = iter(refs)
        q_r, k_r, v_r, sc_r, gc_r, dy_r = (next(it) for _ in range(6))
        ss_r = (next(it), next(it))
        zs_r = (next(it), next(it)) if mom else None
        anc0_r, da_r, dao_r = ((next(it), next(it)) for _ in range(3))
        dz_r = (next(it), next(it)) if mom else None
        t0_r = (next(it), next(it)) if seg else None
        dq_r, dk_r, dv_r, dsc_r, dgc_r = (next(it) for _ in range(5))
        da0_r, danc0_r = (next(it), next(it)), (next(it), next(it))
        dz0_r = (next(it), next(it)) if mom else None
        dt0_r = (next(it), next(it)) if seg else None
        anc0 = tuple(r[...] for r in anc0_r)
        dao = tuple(r[...] for r in dao_r)
        T0v = tuple(r[...] for r in t0_r) if seg else None
        last_row = (lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1).astype(f32)

        def body(j, carry):
            dS1, dZ1, dT0 = carry
            c = n - 1 - j
            sl = pl.ds(c * C, C)
            col, sca, last = _mlp_col_sca(cfg, sc_r, c)
            S = tuple(r[c] for r in ss_r)
            Z = tuple(r[c] for r in zs_r) if mom else None
            anc = tuple(jnp.where(c == 0, a, s) for a, s in zip(anc0, S, strict=True))
            g = gm.mlp_chunk_backward(
                cfg, ops, q_r[sl, :], k_r[sl, :], v_r[sl, :], col, sca, gc_r[sl, :],
                S, Z, anc, T0v, dy_r[sl, :], dS1, dZ1,
            )  # fmt: skip
            danc = tuple(last * dao[i] + g["danc"][i] for i in range(2))
            dq_r[sl, :] = g["dq"]
            dk_r[sl, :] = g["dk"]
            dv_r[sl, :] = g["dv"]
            dgc_r[sl, :] = g["dgc"]
            for slot in range(gm.NS):
                x = jnp.zeros((C, 1), f32)
                for nm, s in gm.COLS.items():
                    if s == slot and nm in g["cols"]:
                        x = x + g["cols"][nm]
                for nm, s in (("bb", gm.BB), ("f", gm.F), ("rb", gm.RB), ("pe", gm.PE)):
                    if s == slot:
                        x = x + g["ends"][nm] * last_row
                dsc_r[slot, sl] = x.reshape(C)

            @pl.when(c == 0)
            def _first_chunk():
                for i in range(2):
                    danc0_r[i][...] = danc[i]

            dS = tuple(g["dS"][i] + jnp.where(c == 0, 0.0, danc[i]) for i in range(2))
            if seg:
                dT0 = tuple(dT0[i] + g["dT0"][i] for i in range(2))
            return dS, g["dZ"], dT0

        init = (
            tuple(r[...] for r in da_r),
            tuple(r[...] for r in dz_r) if mom else None,
            tuple(jnp.zeros(s, f32) for s in shapes) if seg else None,
        )
        dS, dZ0, dT0 = lax.fori_loop(0, n, body, init)
        for i in range(2):
            da0_r[i][...] = dS[i]
            if mom:
                dz0_r[i][...] = dZ0[i]
            if seg:
                dt0_r[i][...] = dT0[i]

    outs = list(
        pl.pallas_call(
            kernel,
            out_shape=tuple(out_shape),
            grid=(BH,),
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            compiler_params=_mlp_compiler(cfg),
            cost_estimate=_estimate(gm.cost_mlp(cfg, B, H, q.dtype.itemsize, backward=True)),
            interpret=bool(interpret),
            name="gradient_memory_mlp_bwd",
        )(*ins)
    )
    dq, dk_, dv_, dsc, dgc = (outs.pop(0) for _ in range(5))

    def tok(x, d):
        return x.reshape(B, H, n, C, d)

    def two():
        return tuple(outs.pop(0).reshape((B, H) + s) for s in shapes)

    dA0, danc0 = two(), two()
    dZ0 = two() if mom else None
    dT0 = two() if seg else None
    dsc = jnp.moveaxis(dsc.reshape(B, H, gm.NS, n, C), 2, -1)
    return tok(dq, dk), tok(dk_, dk), tok(dv_, dv), dsc, tok(dgc, C), dA0, danc0, dZ0, dT0
