"""Shared pieces of the regime-C gradient-memory kernels (linear and two-layer MLP memories): the
XLA set-up around
the kernels, the value-level chunk math (forward and hand-written backward) used inside both
the Mosaic TPU and the Triton kernel bodies, and the ``jax.custom_vjp`` that ties a backend's
forward and backward ``pallas_call``s together.

The memory (SPEC regime C, linear M(z) = z W, per head; Sun et al. 2024 TTT-Linear, Behrouz,
Zhong, Mirrokni 2025 Titans LMM with L_M = 1, Behrouz et al. 2025 Miras biases). Inside a chunk
that starts at t' every gradient is taken at the chunk's anchor W(t'):

    u_j = k_j d_j^T,   d_j = dl/dpred (pred_j = k_j^T W_anc):  dot -v_j;  l2 e_j;
          lp p e (e^2 + eps)^(p/2 - 1);  huber e inside |e| <= delta_j, delta_j sign(e) outside
    Z_s = mu_s Z_{s-1} + eta_s gamma_s u_s,   W_t = a_t W_{t-1} - Z_t
    (without momentum W_t = a_t W_{t-1} - eta_t gamma_t u_t; gamma = the window-1 Omega weight)

whose chunk form (SPEC section 2, with bb_t, f_t, Gc[t, j], rb_t precomputed in XLA from the
gates: retention products, momentum carry and the reset-weight term of packed documents) is

    y_t   = bb_t q_t W(t') - f_t q_t Z(t') + rb_t q_t W0 - sum_j Gc[t, j] (q_t . k_j) d_j
    W_end = bb_C W(t') - f_C Z(t') + rb_C W0 - (K o Gc[C, :])^T D
    Z_end = P_C Z(t') + (K o N[C, :])^T D

(W0 = the reset weights ``params``; a token of a document that starts inside the chunk takes
its gradient at W0). Every term is column-separable in dv (the output error of column e only
involves column e of W, for all four losses), so the kernels may split dv into blocks.

Design: the kernels replace only the op's sequential chunk loop. Validation, the grid layout
of a call that starts mid-chunk (``_layout``), document resets and the state dict stay in XLA,
and the gate coefficients are precomputed there as one packed per-token array sc [B,H,n,C,9]
(bb, f, rb, in-anchor-document flag, huber delta, Gc's last row, N's last row, P_C, last-real-
chunk flag) plus Gc [B,H,n,C,C] fp32 (about C floats per token and head); their cotangents
come back from the backward kernel and XLA differentiates the precomputation, which gives the
gradients of eta, mu, log_a and gamma.

The two-layer MLP memory (Sun et al. 2024 TTT-MLP; Titans' LMM with L_M = 2, Behrouz, Zhong,
Mirrokni 2025 eq. 12), M(z) = [z +] [LN](act(z W0) W1) exactly as ``MemoryArch.apply`` (LN
without affine, eps 1e-6; the residual adds z's first dv features). The anchor pass at
W(t') = (W0, W1) over the chunk's keys gives per layer the inputs x and output errors delta:

    h_j = k_j W0,  x1_j = act(h_j),  o_j = x1_j W1,  pred_j = [k_j +] [LN](o_j)
    delta1_j = LN'(o_j)^T d_j,  delta0_j = (delta1_j W1^T) o act'(h_j),  d_j = dl/dpred_j

so d l_j / d W_i = x_i,j delta_i,j^T (x0 = k) and every matmul of the read through the
per-token weights W_i,t is evaluated in the dual form, never materialising them:

    z_t W_i,t = (z_t bb_t) W_i(t') - (z_t f_t) Z_i(t') + (z_t rb_t) W0_i
                - sum_j Gc[t, j] (z_t . x_i,j) delta_i,j

(layer 0 with z = q, layer 1 with z = act(layer 0's output)); the chunk-end states follow the
linear formulas per layer. The hidden layer and the layer norm mix all value columns, so the
MLP kernels run dv in one block. Their chunk backward is ``jax.vjp`` of the value-level chunk
forward, traced inside the backward kernel body (plain jnp ops, which lower for Mosaic and
Triton); the sweep around it (recomputed chunk-start states, reverse carry of dW / dZ) is the
linear kernels'.

Only jax is used here (never flax).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..ops._common import NEG_INF, segment_resets
from ..ops.gradient_memory import GradientMemorySpec, _layout, init_state

f32 = jnp.float32

# per-token scalar slots of the packed coefficient array sc[..., C, NS]
BB, F, RB, FS, DL, GE, NE, PE, LAST = range(9)
NS = 9
COLS = {"bb": BB, "f": F, "rb": RB, "fs": FS, "dl": DL, "ge": GE, "ne": NE}
HIGHEST = lax.Precision.HIGHEST
ACT_NAMES = ("gelu", "silu", "relu")
GELU_C = math.sqrt(2.0 / math.pi)
LN_EPS = 1e-6  # MemoryArch.apply's layer norm


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one kernel call."""

    loss: str
    lp_p: float
    lp_eps: float
    momentum: bool
    seg: bool
    C: int  # chunk length
    n: int  # chunks per row (on the grid)
    dk: int
    dv: int
    bv: int  # dv block
    arch: str = "linear"  # "linear" | "mlp" (two layers)
    dh: int = 0  # hidden width of the mlp memory
    activation: str = "gelu"
    residual: bool = False
    layer_norm: bool = False

    @property
    def nv(self) -> int:
        return self.dv // self.bv


# --------------------------------------------------------------------------------------------
# supports()
# --------------------------------------------------------------------------------------------


def unsupported(
    q, k, v, eta, *, spec, params, mu, log_a, gamma, delta, initial_state, segment_ids, chunk_size
) -> str | None:
    """The reason a linear-memory kernel cannot run the call (None when it can)."""
    if not isinstance(spec, GradientMemorySpec):
        return "spec is not a GradientMemorySpec"
    arch = spec.arch
    if arch.kind == "gated_mlp":
        return "memory arch 'gated_mlp' (the kernels cover the linear and 2-layer mlp memories)"
    if arch.kind == "mlp" and arch.depth != 2:
        return f"an mlp memory of depth {arch.depth} (the kernels cover depth 2)"
    if arch.kind == "mlp" and arch.activation not in ACT_NAMES:
        return f"mlp activation {arch.activation!r}"
    if arch.kind == "linear" and (arch.residual or arch.layer_norm):
        return "a residual / layer-normalised linear memory"
    if spec.normalizer != "none":
        return f"normalizer {spec.normalizer!r}"
    if spec.muon:
        return "Muon updates"
    if spec.window != 1:
        return f"Omega window {spec.window} > 1"
    lead = tuple(q.shape[:-1])
    for name, g in (("eta", eta), ("mu", mu), ("log_a", log_a), ("gamma", gamma)):
        if g is not None and tuple(g.shape) != lead:
            return f"{name} of shape {tuple(g.shape)} (only per-head gates [B,T,H] are supported)"
    if initial_state is not None and "window" in initial_state:
        return "an initial state with an Omega window"
    return None


# --------------------------------------------------------------------------------------------
# Value-level chunk math (runs inside the kernel bodies, and as a pure-jnp reference)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ops:
    """The matmuls a backend lowers; all return fp32."""

    dot: Callable[[Any, Any], Any]  # a @ b
    dot_nt: Callable[[Any, Any], Any]  # a @ b.T
    dot_tn: Callable[[Any, Any], Any]  # a.T @ b


def make_ops(precision=HIGHEST) -> Ops:
    def prec(a, b):
        both_low = a.dtype != f32 and b.dtype != f32 and a.dtype == b.dtype
        return None if both_low else precision

    def dg(dims):
        def fn(a, b):
            if a.dtype != b.dtype:
                a, b = a.astype(f32), b.astype(f32)
            return lax.dot_general(
                a, b, (dims, ((), ())), precision=prec(a, b), preferred_element_type=f32
            )

        return fn

    return Ops(dot=dg(((1,), (0,))), dot_nt=dg(((1,), (1,))), dot_tn=dg(((0,), (0,))))


def total(x):
    """Sum of a 2-D value as [1,1] (one axis at a time, as Triton reductions need)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _sign(x):
    return jnp.where(x > 0, 1.0, jnp.where(x < 0, -1.0, 0.0)).astype(x.dtype)


def loss_error(cfg: Config, p, v, dl):
    """d = dl/dpred at pred = p (elementwise in the value dim)."""
    if cfg.loss == "dot":
        return -v
    e = p - v
    if cfg.loss == "l2":
        return e
    if cfg.loss == "lp":
        s = e * e + cfg.lp_eps
        return cfg.lp_p * e * jnp.exp((0.5 * cfg.lp_p - 1.0) * jnp.log(s))
    return jnp.where(jnp.abs(e) <= dl, e, dl * _sign(e))  # huber


def loss_error_vjp(cfg: Config, p, v, dl, dd):
    """Cotangents (dp or None, dv, ddelta column or None) of :func:`loss_error`."""
    if cfg.loss == "dot":
        return None, -dd, None
    if cfg.loss == "l2":
        return dd, -dd, None
    e = p - v
    if cfg.loss == "lp":
        s = e * e + cfg.lp_eps
        pp = cfg.lp_p
        g = pp * jnp.exp((0.5 * pp - 2.0) * jnp.log(s)) * (s + (pp - 2.0) * e * e)
        dp = dd * g
        return dp, -dp, None
    inside = jnp.abs(e) <= dl
    dp = jnp.where(inside, dd, 0.0)
    ddl = jnp.sum(jnp.where(inside, 0.0, dd * _sign(e)), axis=1, keepdims=True)
    return dp, -dp, ddl


def chunk_forward(cfg: Config, ops: Ops, q, k, v, col, sca, gc, S, Z, anc, T0, want_y=True):
    """One chunk. q, k [C,dk], v [C,bv] (input dtype); col: per-token columns [C,1]; sca:
    chunk-end scalars ([1,1] or 0-d); gc [C,C]; S, Z, anc, T0 [dk,bv] fp32 (Z / T0 None when
    unused). Returns (y [C,bv] fp32 or None, S_end, Z_end)."""
    kf, vf = k.astype(f32), v.astype(f32)
    p = ops.dot(kf, anc)
    if cfg.seg:  # tokens of a document that starts inside the chunk: gradient at W0
        p = jnp.where(col["fs"] > 0, p, ops.dot(kf, T0))
    d = loss_error(cfg, p, vf, col.get("dl"))
    y = None
    if want_y:
        qf = q.astype(f32)
        m = ops.dot_nt(q, k) * gc
        y = ops.dot(qf * col["bb"], S) - ops.dot(m, d)
        if cfg.momentum:
            y = y - ops.dot(qf * col["f"], Z)
        if cfg.seg:
            y = y + ops.dot(qf * col["rb"], T0)
    S_end = sca["bb"] * S - ops.dot_tn(kf * col["ge"], d)
    if cfg.seg:
        S_end = S_end + sca["rb"] * T0
    Z_end = None
    if cfg.momentum:
        S_end = S_end - sca["f"] * Z
        Z_end = sca["pe"] * Z + ops.dot_tn(kf * col["ne"], d)
    return y, S_end, Z_end


def chunk_backward(cfg: Config, ops: Ops, q, k, v, col, sca, gc, S, Z, anc, T0, dy, dS1, dZ1):
    """Cotangents of :func:`chunk_forward` given dy [C,bv], dS1 / dZ1 (of S_end / Z_end).

    Returns a dict: dq, dk [C,dk]; dv [C,bv]; per-token columns [C,1] (bb, f, rb, dl, ge, ne);
    chunk-end scalars [1,1]/0-d (bb, f, rb, pe); dS / dZ (of the chunk-start state, without
    the anchor's share), danc (of the anchor), dT0 (of the reset weights; None without
    documents)."""
    qf, kf, vf = q.astype(f32), k.astype(f32), v.astype(f32)
    dy = dy.astype(f32)
    p_anc = ops.dot(kf, anc)
    p = jnp.where(col["fs"] > 0, p_anc, ops.dot(kf, T0)) if cfg.seg else p_anc
    d = loss_error(cfg, p, vf, col.get("dl"))
    qk = ops.dot_nt(q, k)
    m = qk * gc
    out: dict[str, Any] = {}
    # y = (q o bb) S - (q o f) Z + (q o rb) T0 - m d
    ys = ops.dot_nt(dy, S)  # [C,dk]
    dq = ys * col["bb"]
    cbb = jnp.sum(qf * ys, axis=1, keepdims=True)
    dS = sca["bb"] * dS1 + ops.dot_tn(qf * col["bb"], dy)
    sbb = total(dS1 * S)
    dm = -ops.dot_nt(dy, d)  # [C,C]
    dgc = dm * qk
    dqk = dm * gc
    dq = dq + ops.dot(dqk, kf)
    dk = ops.dot_tn(dqk, qf)
    # d enters y (-m d), S_end (-(k o ge)^T d) and Z_end ((k o ne)^T d)
    dd = -ops.dot_tn(m, dy) - ops.dot(kf * col["ge"], dS1)
    ds_d = ops.dot_nt(d, dS1)  # [C,dk]
    dk = dk - ds_d * col["ge"]
    cge = -jnp.sum(kf * ds_d, axis=1, keepdims=True)
    cf = crb = cne = sf = srb = spe = dZ = dT0 = None
    if cfg.momentum:
        yz = ops.dot_nt(dy, Z)
        dq = dq - yz * col["f"]
        cf = -jnp.sum(qf * yz, axis=1, keepdims=True)
        dZ = sca["pe"] * dZ1 - sca["f"] * dS1 - ops.dot_tn(qf * col["f"], dy)
        sf = -total(dS1 * Z)
        spe = total(dZ1 * Z)
        dd = dd + ops.dot(kf * col["ne"], dZ1)
        dz_d = ops.dot_nt(d, dZ1)
        dk = dk + dz_d * col["ne"]
        cne = jnp.sum(kf * dz_d, axis=1, keepdims=True)
    if cfg.seg:
        yt = ops.dot_nt(dy, T0)
        dq = dq + yt * col["rb"]
        crb = jnp.sum(qf * yt, axis=1, keepdims=True)
        dT0 = sca["rb"] * dS1 + ops.dot_tn(qf * col["rb"], dy)
        srb = total(dS1 * T0)
    dp, dv, cdl = loss_error_vjp(cfg, p, vf, col.get("dl"), dd)
    danc = None
    if dp is not None:
        dp_anc = jnp.where(col["fs"] > 0, dp, 0.0) if cfg.seg else dp
        dk = dk + ops.dot_nt(dp_anc, anc)
        danc = ops.dot_tn(kf, dp_anc)
        if cfg.seg:
            dp0 = dp - dp_anc
            dk = dk + ops.dot_nt(dp0, T0)
            dT0 = dT0 + ops.dot_tn(kf, dp0)
    out.update(dq=dq, dk=dk, dv=dv, dgc=dgc, dS=dS, dZ=dZ, danc=danc, dT0=dT0)
    out["cols"] = {"bb": cbb, "f": cf, "rb": crb, "dl": cdl, "ge": cge, "ne": cne}
    out["ends"] = {"bb": sbb, "f": sf, "rb": srb, "pe": spe}
    return out


def scalar_cotangent(cols, ends, last_row, lane_onehot):
    """Assemble the [C, NS] cotangent of the packed coefficients: per-token columns plus the
    chunk-end scalars on the last row. ``last_row`` [C,1] float (1 on row C-1);
    ``lane_onehot(slot)`` -> [1,NS] float one-hot."""
    out = None

    def add(acc, x, slot):
        term = x * lane_onehot(slot)
        return term if acc is None else acc + term

    for name, slot in (("bb", BB), ("f", F), ("rb", RB), ("dl", DL), ("ge", GE), ("ne", NE)):
        if cols.get(name) is not None:
            out = add(out, cols[name], slot)
    for name, slot in (("bb", BB), ("f", F), ("rb", RB), ("pe", PE)):
        if ends.get(name) is not None:
            out = add(out, ends[name] * last_row, slot)
    return out


# --------------------------------------------------------------------------------------------
# The two-layer MLP memory (TTT-MLP, Titans LMM with L_M = 2): value-level chunk math
# --------------------------------------------------------------------------------------------


def act_fwd(name: str, h):
    """(act(h), act'(h)) elementwise; gelu is jax.nn.gelu's tanh form (its default)."""
    if name == "gelu":
        c = GELU_C
        t = jnp.tanh(c * (h + 0.044715 * h * h * h))
        der = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * h * h)
        return 0.5 * h * (1.0 + t), der
    if name == "silu":
        s = 1.0 / (1.0 + jnp.exp(-h))
        return h * s, s * (1.0 + h * (1.0 - s))
    pos = (h > 0).astype(h.dtype)  # relu
    return h * pos, pos


def layer_norm(o):
    """LN without affine over the value dim (as ``MemoryArch.apply``): (xhat, 1/std)."""
    mean = jnp.mean(o, axis=1, keepdims=True)
    xc = o - mean
    rstd = lax.rsqrt(jnp.mean(xc * xc, axis=1, keepdims=True) + LN_EPS)
    return xc * rstd, rstd


def layer_norm_vjp(xhat, rstd, g):
    """d/do of sum(g * LN(o)) = rstd (g - mean(g) - xhat mean(g xhat))."""
    mg = jnp.mean(g, axis=1, keepdims=True)
    mgx = jnp.mean(g * xhat, axis=1, keepdims=True)
    return rstd * (g - mg - xhat * mgx)


def _mlp_out(cfg: Config, ops: Ops, z, o):
    """The memory's output from the second layer's pre-output o: z[:, :dv] + LN(o)."""
    out = layer_norm(o)[0] if cfg.layer_norm else o
    if cfg.residual:
        if cfg.dk == cfg.dv:
            out = out + z
        else:  # the leading dv features of z, as a matmul with a [dk, dv] selection
            rows = lax.broadcasted_iota(jnp.int32, (cfg.dk, cfg.dv), 0)
            sel = (rows == lax.broadcasted_iota(jnp.int32, (cfg.dk, cfg.dv), 1)).astype(f32)
            out = out + ops.dot(z, sel)
    return out


def mlp_anchor(cfg: Config, ops: Ops, kf, vf, dl, W):
    """One forward / backward of the memory at weights W = (W0 [dk,dh], W1 [dh,dv]) over the
    chunk's keys: the second layer's inputs x1 = act(k W0) [C,dh] and the output errors of both
    layers, delta0 [C,dh] and delta1 [C,dv] (d l_j / d W_i = x_i,j delta_i,j^T, x0 = k)."""
    h = ops.dot(kf, W[0])
    a, da = act_fwd(cfg.activation, h)
    o = ops.dot(a, W[1])
    if cfg.layer_norm:
        xhat, rstd = layer_norm(o)
    d = loss_error(cfg, _mlp_out(cfg, ops, kf, o), vf, dl)
    d1 = layer_norm_vjp(xhat, rstd, d) if cfg.layer_norm else d
    return a, ops.dot_nt(d1, W[1]) * da, d1


def mlp_chunk_forward(cfg: Config, ops: Ops, q, k, v, col, sca, gc, S, Z, anc, T0, want_y=True):
    """One chunk of the two-layer memory. q, k [C,dk], v [C,dv]; col / sca / gc as in
    :func:`chunk_forward`; S, Z, anc, T0: (W0 [dk,dh], W1 [dh,dv]) fp32 tuples (Z / T0 None
    when unused). Every matmul z @ W_t of the read is the dual form

        z W_t = (z o bb) W(t') - (z o f) Z(t') + (z o rb) W0 - ((z X^T) o Gc) Delta

    with the layer's inputs X and output errors Delta from the anchor pass. Returns (y [C,dv]
    fp32 or None, S_end tuple, Z_end tuple or None)."""
    qf, kf, vf = q.astype(f32), k.astype(f32), v.astype(f32)
    x1, d0, d1 = mlp_anchor(cfg, ops, kf, vf, col.get("dl"), anc)
    if cfg.seg:  # tokens of a document that starts inside the chunk: gradients at W0
        sel = col["fs"] > 0
        x1b, d0b, d1b = mlp_anchor(cfg, ops, kf, vf, col.get("dl"), T0)
        x1, d0, d1 = jnp.where(sel, x1, x1b), jnp.where(sel, d0, d0b), jnp.where(sel, d1, d1b)
    xs, ds = (kf, x1), (d0, d1)

    def mm(i, z):
        out = ops.dot(z * col["bb"], S[i]) - ops.dot(ops.dot_nt(z, xs[i]) * gc, ds[i])
        if cfg.momentum:
            out = out - ops.dot(z * col["f"], Z[i])
        if cfg.seg:
            out = out + ops.dot(z * col["rb"], T0[i])
        return out

    y = None
    if want_y:
        a = act_fwd(cfg.activation, mm(0, qf))[0]
        y = _mlp_out(cfg, ops, qf, mm(1, a))
    S_end, Z_end = [], []
    for i in range(2):
        s1 = sca["bb"] * S[i] - ops.dot_tn(xs[i] * col["ge"], ds[i])
        if cfg.seg:
            s1 = s1 + sca["rb"] * T0[i]
        if cfg.momentum:
            s1 = s1 - sca["f"] * Z[i]
            Z_end.append(sca["pe"] * Z[i] + ops.dot_tn(xs[i] * col["ne"], ds[i]))
        S_end.append(s1)
    return y, tuple(S_end), (tuple(Z_end) if cfg.momentum else None)


def mlp_chunk_backward(cfg: Config, ops: Ops, q, k, v, col, sca, gc, S, Z, anc, T0, dy, dS1, dZ1):
    """Cotangents of :func:`mlp_chunk_forward` (``jax.vjp`` of it, traced inside the kernel
    body: plain jnp, so it lowers like the forward). Same keys as :func:`chunk_backward`, with
    tuples for the weights."""
    fs = col["fs"]
    cols = {nm: c for nm, c in col.items() if nm != "fs"}

    def f(q, k, v, cols, sca, gc, S, Z, anc, T0):
        y, S1, Z1 = mlp_chunk_forward(cfg, ops, q, k, v, dict(cols, fs=fs), sca, gc, S, Z, anc, T0)
        return y, S1, Z1

    prim = (q.astype(f32), k.astype(f32), v.astype(f32), cols, sca, gc, S, Z, anc, T0)
    _, vjp = jax.vjp(f, *prim)
    dZ1 = tuple(dZ1) if cfg.momentum else None
    dq, dk, dv, dcols, dsca, dgc, dS, dZ, danc, dT0 = vjp((dy.astype(f32), tuple(dS1), dZ1))
    return {
        "dq": dq,
        "dk": dk,
        "dv": dv,
        "dgc": dgc,
        "dS": dS,
        "dZ": dZ,
        "danc": danc,
        "dT0": dT0,
        "cols": dcols,
        "ends": dsca,
    }


def mlp_shapes(cfg: Config) -> tuple[tuple[int, int], tuple[int, int]]:
    return (cfg.dk, cfg.dh), (cfg.dh, cfg.dv)


# --------------------------------------------------------------------------------------------
# Pure-jnp versions of the two kernel calls (same contract), to test the chunk math alone
# --------------------------------------------------------------------------------------------


def split_scalars(cfg: Config, sc):
    """[C, NS] block -> (per-token columns [C,1], chunk-end scalars [1,1], last flag [1,1])."""
    col = {nm: sc[:, s : s + 1] for nm, s in COLS.items()}
    end = cfg.C - 1
    sca = {nm: sc[end:, s : s + 1] for nm, s in (("bb", BB), ("f", F), ("rb", RB), ("pe", PE))}
    return col, sca, sc[:1, LAST : LAST + 1]


def _per_row(fn, *args):
    for _ in range(2):
        fn = jax.vmap(fn, in_axes=tuple(None if a is None else 0 for a in args))
    return fn(*args)


def reference_fwd(cfg: Config, q, k, v, sc, gc, A0, anc0, Z0, T0, *, save):
    ops = make_ops()

    def row(q, k, v, sc, gc, A0, anc0, Z0, T0):
        def body(carry, x):
            S, Z, ao, c = carry
            qc, kc, vc, scc, gcc = x
            col, sca, last = split_scalars(cfg, scc)
            anc = jnp.where(c == 0, anc0, S)
            y, S1, Z1 = chunk_forward(cfg, ops, qc, kc, vc, col, sca, gcc, S, Z, anc, T0)
            ao = last * anc + (1.0 - last) * ao
            return (S1, Z1, ao, c + 1), (y.astype(v.dtype), S, Z)

        (S, Z, ao, _), (y, Ss, Zs) = lax.scan(body, (A0, Z0, anc0, 0), (q, k, v, sc, gc))
        return y, S, ao, Z, Ss, Zs

    y, S, ao, Z, Ss, Zs = _per_row(row, q, k, v, sc, gc, A0, anc0, Z0, T0)
    return y, S, ao, Z, (Ss if save else None), (Zs if save else None)


def reference_bwd(cfg: Config, q, k, v, sc, gc, Ss, Zs, anc0, T0, dy, dA, dZ, dao):
    ops = make_ops()
    n = cfg.n
    last_row = (jnp.arange(cfg.C) == cfg.C - 1).astype(f32)[:, None]

    def onehot(slot):
        return (jnp.arange(NS) == slot).astype(f32)[None, :]

    def row(q, k, v, sc, gc, Ss, Zs, anc0, T0, dy, dA, dZ, dao):
        def body(carry, x):
            dS1, dZ1, dT0, danc0, c = carry
            qc, kc, vc, scc, gcc, S, Z, dyc = x
            col, sca, last = split_scalars(cfg, scc)
            anc = jnp.where(c == 0, anc0, S)
            g = chunk_backward(cfg, ops, qc, kc, vc, col, sca, gcc, S, Z, anc, T0, dyc, dS1, dZ1)
            danc = last * dao if g["danc"] is None else g["danc"] + last * dao
            dS = g["dS"] + jnp.where(c == 0, 0.0, danc)
            danc0 = jnp.where(c == 0, danc, danc0)
            if cfg.seg:
                dT0 = dT0 + g["dT0"]
            dsc = scalar_cotangent(g["cols"], g["ends"], last_row, onehot)
            outs = (g["dq"], g["dk"], g["dv"], dsc, g["dgc"])
            return (dS, g["dZ"], dT0, danc0, c - 1), outs

        init = (dA, dZ, None if T0 is None else jnp.zeros_like(T0), jnp.zeros_like(anc0), n - 1)
        xs = (q, k, v, sc, gc, Ss, Zs, dy)
        (dA0, dZ0, dT0, danc0, _), outs = lax.scan(body, init, xs, reverse=True)
        return outs + (dA0, danc0, dZ0, dT0)

    return _per_row(row, q, k, v, sc, gc, Ss, Zs, anc0, T0, dy, dA, dZ, dao)


# --------------------------------------------------------------------------------------------
# XLA set-up and tear-down around the kernels
# --------------------------------------------------------------------------------------------


def prepare(
    q,
    k,
    v,
    eta,
    *,
    spec,
    params,
    mu,
    log_a,
    gamma,
    delta,
    initial_state,
    segment_ids,
    chunk_size,
    block_v,
):
    """Lay the call on the per-row chunk grid (the op's ``_layout``), precompute the chunk
    coefficients from the gates (differentiable XLA; the kernels' cotangents flow back through
    it) and the carried state. Returns (cfg, core arguments, meta for :func:`finish`)."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    C = chunk_size
    momentum = mu is not None
    seg = segment_ids is not None
    arch = spec.arch
    names = sorted(arch.shapes(dk, dv))  # ("W",) or ("W0", "W1")
    if params is None:
        params = {"W": jnp.zeros((H, dk, dv), f32)}
    params = {nm: params[nm].astype(f32) for nm in names}
    resets = segment_resets(segment_ids, B, T)
    docs = jnp.cumsum(resets.astype(jnp.int32), 1)
    xs = {
        "q": q,
        "k": k,
        "v": v,
        "delta": delta.astype(f32) if spec.loss == "huber" else None,
        "eta": eta.astype(f32),
        "log_a": None if log_a is None else log_a.astype(f32),
        "log_mu": None if mu is None else jnp.log(jnp.maximum(mu.astype(f32), 1e-30)),
        "gamma": jnp.ones((B, T, H), f32) if gamma is None else gamma.astype(f32),
    }
    lay, r, L = _layout(xs, initial_state, docs, 0, C)
    n = L // C

    def proper(x):  # [B, L, H, ...] -> [B, H, n, C, ...]
        return jnp.moveaxis(x.reshape((B, n, C) + x.shape[2:]), 3, 1)

    zeros = jnp.zeros((B, H, n, C), f32)
    la = zeros if lay["log_a"] is None else proper(lay["log_a"])
    et, gm = proper(lay["eta"]), proper(lay["gamma"])
    docs_l = lay["docs"]
    doc_p = docs_l.reshape(B, n, C)
    writer = lay["real"].reshape(B, n, C).astype(f32)[:, None]  # [B,1,n,C]
    prev_doc = jnp.concatenate([docs_l[:, :1], doc_p[:, :-1, -1]], 1)  # doc before each chunk
    fs = (doc_p == prev_doc[..., None])[:, None]  # token is in the anchor's document
    first = jnp.concatenate(
        [doc_p[..., :1] != prev_doc[..., None], doc_p[..., 1:] != doc_p[..., :-1]], -1
    )[:, None]  # token starts a document
    tri = jnp.tril(jnp.ones((C, C), bool))
    caus = (tri & (doc_p[..., :, None] == doc_p[..., None, :]))[:, None]  # [B,1,n,C,C]

    def seg_products(g):  # exp(sum_{l=s+1..t} g_l) on the causal same-document mask
        G = jnp.cumsum(g, -1)
        return G, jnp.exp(jnp.where(caus, G[..., :, None] - G[..., None, :], NEG_INF))

    fsf = fs.astype(f32)
    Ga, Amat = seg_products(la)
    bb = jnp.exp(Ga) * fsf
    rb = jnp.einsum("...ts,...s->...t", Amat, first.astype(f32) * jnp.exp(la), precision=HIGHEST)
    Amat = Amat * writer[..., None, :]  # padding steps retain but never write
    w = et * gm * writer
    if momentum:
        Gm, Nm = seg_products(proper(lay["log_mu"]))
        Nm = Nm * w[..., None, :]
        Pm = jnp.exp(Gm) * fsf
        gc = jnp.einsum("...ts,...si->...ti", Amat, Nm, precision=HIGHEST)
        ff = jnp.einsum("...ts,...s->...t", Amat, Pm, precision=HIGHEST)
        ne, pe = Nm[..., -1, :], jnp.broadcast_to(Pm[..., -1:], (B, H, n, C))
    else:
        gc = Amat * w[..., None, :]
        ff = ne = pe = zeros
    dl = jnp.ones((B, H, n, C), f32) if lay["delta"] is None else proper(lay["delta"])
    any_real = jnp.any(writer[:, 0] > 0, -1)  # [B, n]
    last_idx = n - 1 - jnp.argmax(any_real[:, ::-1], -1)
    last = (jnp.arange(n)[None] == last_idx[:, None]).astype(f32)  # last chunk with a token
    slots = [bb, ff, rb, fsf, dl, gc[..., -1, :], ne, pe, last[:, None, :, None]]
    sc = jnp.stack([jnp.broadcast_to(s, (B, H, n, C)) for s in slots], -1)

    t0 = {nm: jnp.broadcast_to(w, (B,) + w.shape[-3:]) for nm, w in params.items()}
    st0 = initial_state
    if st0 is None:
        st0 = init_state(spec, params, B, momentum=momentum, dk=dk, dv=dv)
    at0 = (r == 0)[:, None, None, None]
    A0 = tuple(st0["A"][nm].astype(f32) for nm in names)
    anc0 = tuple(
        jnp.where(at0, a, st0["anchor"][nm].astype(f32)) for nm, a in zip(names, A0, strict=True)
    )
    Z0 = tuple(st0["Z"][nm].astype(f32) for nm in names) if momentum else None
    T0 = tuple(t0[nm] for nm in names) if seg else None
    if arch.kind == "linear":  # the linear kernels take single arrays
        A0, anc0 = A0[0], anc0[0]
        Z0 = None if Z0 is None else Z0[0]
        T0 = None if T0 is None else T0[0]
    cfg = Config(
        loss=spec.loss,
        lp_p=float(spec.lp_p),
        lp_eps=float(spec.lp_eps),
        momentum=momentum,
        seg=seg,
        C=C,
        n=n,
        dk=dk,
        dv=dv,
        bv=dv if block_v is None else block_v,
        arch=arch.kind,
        dh=arch.hidden(dv) if arch.kind == "mlp" else 0,
        activation=arch.activation,
        residual=arch.residual,
        layer_norm=arch.layer_norm,
    )
    args = (proper(lay["q"]), proper(lay["k"]), proper(lay["v"]), sc, gc, A0, anc0, Z0, T0)
    fs_last = jnp.sum(fsf[:, 0, :, -1] * last, -1)
    meta = {"r": r, "T": T, "L": L, "t0": t0, "fs_last": fs_last, "names": names}
    return cfg, args, meta


def finish(cfg: Config, outs, meta, v_dtype):
    """Kernel outputs -> (y [B,T,H,dv] in v's dtype, the state dict of impl="xla")."""
    y, A, ao, Z = outs
    B, H = y.shape[:2]
    r, T, names = meta["r"], meta["T"], meta["names"]
    y = jnp.moveaxis(y, 1, 3).reshape(B, meta["L"], H, cfg.dv)
    y = jnp.take_along_axis(y, (jnp.arange(T)[None] + r[:, None])[..., None, None], axis=1)

    def named(x):  # an array (linear) or a tuple of arrays in ``names`` order -> dict
        return dict(zip(names, (x,) if cfg.arch == "linear" else x, strict=True))

    A, ao = named(A), named(ao)
    if cfg.seg:  # a document that started inside the last chunk anchors at the reset weights
        in_doc = meta["fs_last"][:, None, None, None] > 0
        ao = {nm: jnp.where(in_doc, a, meta["t0"][nm]) for nm, a in ao.items()}
    state = {"A": A, "anchor": ao, "pos": (r + T) % cfg.C}
    if cfg.momentum:
        state["Z"] = named(Z)
    return y.astype(v_dtype), state


# --------------------------------------------------------------------------------------------
# custom_vjp around a backend's forward / backward pallas_calls
# --------------------------------------------------------------------------------------------


def make_core(cfg: Config, fwd_call, bwd_call):
    """``core(q, k, v, sc, gc, A0, anc0, Z0, T0) -> (y, A_end, anchor_out, Z_end)`` with a
    Pallas backward. The residuals are the inputs only: the backward re-runs the forward kernel
    to recompute the chunk-start states (transient, [B,H,n,dk,dv] fp32), then sweeps the chunks
    in reverse carrying dW / dZ.

    ``fwd_call(cfg, *args, save)`` -> (y | None, A_end, anc_out, Z_end | None, S_states | None,
    Z_states | None); ``bwd_call(cfg, q, k, v, sc, gc, S_states, Z_states, anc0, T0, dy, dA,
    dZ, d_anc_out)`` -> (dq, dk, dv, dsc, dgc, dA0, danc0, dZ0, dT0)."""

    @jax.custom_vjp
    def core(q, k, v, sc, gc, A0, anc0, Z0, T0):
        y, A, ao, Z, _, _ = fwd_call(cfg, q, k, v, sc, gc, A0, anc0, Z0, T0, save=False)
        return y, A, ao, Z

    def fwd(q, k, v, sc, gc, A0, anc0, Z0, T0):
        return core(q, k, v, sc, gc, A0, anc0, Z0, T0), (q, k, v, sc, gc, A0, anc0, Z0, T0)

    def bwd(res, cts):
        q, k, v, sc, gc, A0, anc0, Z0, T0 = res
        dy, dA, dao, dZ = cts
        _, _, _, _, Sst, Zst = fwd_call(cfg, q, k, v, sc, gc, A0, anc0, Z0, T0, save=True)
        dq, dk, dv, dsc, dgc, dA0, danc0, dZ0, dT0 = bwd_call(
            cfg, q, k, v, sc, gc, Sst, Zst, anc0, T0, dy, dA, dZ, dao
        )
        return (
            dq.astype(q.dtype),
            dk.astype(k.dtype),
            dv.astype(v.dtype),
            dsc,
            dgc,
            dA0,
            danc0,
            dZ0,
            dT0,
        )

    core.defvjp(fwd, bwd)
    return core


def run(kernel_fwd, kernel_bwd, q, k, v, eta, *, block_v, **kw):
    """The whole kernel path of one call: prepare, core (custom_vjp), finish."""
    cfg, args, meta = prepare(q, k, v, eta, block_v=block_v, **kw)
    outs = make_core(cfg, kernel_fwd, kernel_bwd)(*args)
    return finish(cfg, outs, meta, v.dtype)


def cost(cfg: Config, B: int, H: int, itemsize: int, backward: bool) -> tuple[int, int]:
    """(flops, bytes) of the forward (or backward) kernel, for pl.CostEstimate."""
    C, n, dk, dv = cfg.C, cfg.n, cfg.dk, cfg.dv
    per_chunk = 2 * C * dk * dv * (4 + 2 * cfg.momentum + 2 * cfg.seg) + 2 * C * C * (dk + dv)
    flops = B * H * n * per_chunk * (3 if backward else 1)
    tok = B * H * n * C
    nbytes = tok * (2 * dk + dv) * itemsize + tok * (NS + C) * 4
    nbytes += tok * dv * itemsize + B * H * dk * dv * 4 * (4 + 2 * cfg.momentum)
    if backward:
        nbytes = 2 * nbytes + B * H * n * dk * dv * 4 * (1 + cfg.momentum)
    return int(flops), int(nbytes)


def cost_mlp(cfg: Config, B: int, H: int, itemsize: int, backward: bool) -> tuple[int, int]:
    """(flops, bytes) of the two-layer memory's forward (or backward) kernel."""
    C, n, dk, dv, dh = cfg.C, cfg.n, cfg.dk, cfg.dv, cfg.dh
    w = dk * dh + dh * dv
    anchor = 2 * C * (w + dh * dv) * (1 + cfg.seg)
    read = 2 * C * w * (1 + cfg.momentum + cfg.seg) + 2 * C * C * (dk + 2 * dh + dv)
    end = 2 * C * w * (1 + cfg.momentum)
    flops = B * H * n * (anchor + read + end) * (3 if backward else 1)
    tok = B * H * n * C
    nbytes = tok * (2 * dk + 2 * dv) * itemsize + tok * (NS + C) * 4
    nbytes += B * H * w * 4 * (4 + 2 * cfg.momentum + cfg.seg)
    if backward:
        nbytes = 2 * nbytes + B * H * n * w * 4 * (1 + cfg.momentum)
    return int(flops), int(nbytes)


__all__ = [
    "Config",
    "chunk_backward",
    "chunk_forward",
    "make_core",
    "mlp_chunk_backward",
    "mlp_chunk_forward",
    "prepare",
    "unsupported",
]
