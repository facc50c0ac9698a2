"""Gradient memories (SPEC regime C): a memory that learns at test time by descent on an inner
loss, trained in parallel with frozen-gradient chunks. TTT, Titans, Miras and ATLAS are all
instances of one update (SPEC G0, one sign convention):

    g_t = d/dW sum_{i=t-c+1..t} gamma_i l_i(W),  taken at the anchor W(t')     (E1, E3)
    Z_t = mu_t Z_{t-1} + eta_t g_t                                            (E2 momentum)
    A_t = a_t A_{t-1} - Z_t                                                   (retention a_t)
    Muon (ATLAS):  Z_t = mu_t Z_{t-1} + g_t;  A_t = a_t A_{t-1} - eta_t NS_5(Z_t)
    W_t = N(A_t)   (N = identity; Moneta: A / ||A||_q^(q-2); Memora: softmax)
    y_t = M(q_t; W_t)

A memory is four choices (Behrouz et al. 2025, "It's All Connected", the Miras framing):
architecture M (:class:`MemoryArch`: linear matrix, MLP with optional residual + LayerNorm,
ATLAS++ gated MLP), attentional bias l (``loss``: dot, l2, lp, huber), retention (``log_a``
scalar/per-head/per-channel, plus the normaliser N), learning algorithm (plain descent,
momentum, Muon, the Omega window of ``window`` tokens weighted by ``gamma``).

Regime C: inside a chunk of C tokens every gradient is taken at the chunk-start state, so the
C gradients are independent and, for any M, each weight's gradient is an outer product
x_j delta_j^T (layer input x error at the layer's output). With A[t,s] = prod_{l=s+1..t} a_l and
n_{j,s} = eta_j prod_{l=j+1..s} mu_l (SPEC section 2):

    A_t = bb_t A(t') - f_t Z(t') - sum_j Gc[t,j] x_j delta_j^T,
    f_t = sum_{s<=t} A[t,s] prod_{l<=s} mu_l,   Gc[t,j] = sum_{s=j..t} A[t,s] n_{j,s}

and every matmul ``x_t @ W_t`` of a read is evaluated in the dual form
``(x_t*bb_t) @ A(t') - (x_t*f_t) @ Z(t') - sum_j Gc[t,j] (x_t . x_j) delta_j``: batched C x C
matmuls, no per-token weight copies. The Omega window composes ``Gc`` with a banded matrix of
``gamma``. Muon and Memora's softmax are not linear in the accumulator, so for them the chunk
materialises per-token weights (C Newton-Schulz runs per chunk, as SPEC allows for Muon).

Chunking is part of the model (C changes the function; C = 1 is the per-token model). Chunks
follow one grid per row: the state carries its position in the current chunk (``pos``) and the
chunk's anchor, so a sequence split anywhere and carried, or prefilled and decoded token by
token, equals the whole sequence. choice: a packed document starts a new state (the reset
weights ``params``) but not a new chunk: a document that starts mid-chunk takes its gradients
at the reset weights until the next grid boundary. Packed equals alone when documents start at
multiples of C.

choice (Moneta): reads inside a chunk use the normaliser of the chunk's anchor,
W_t = A_t / ||A(t')||_q^(q-2) ("normalisation at chunk ends", SPEC regime C); at C = 1 the read
scale lags the accumulator by one token.
choice (lp): the loss is sum_i (e_i^2 + eps)^(p/2), whose gradient
p e (e^2 + eps)^(p/2-1) uses the smooth |x| ~ sqrt(x^2 + eps) and sign x ~ x / sqrt(x^2 + eps);
an exact gradient of a smooth loss (SPEC suggests tanh for the sign, which is not one).

``impl="scan"`` runs the same surrogate token by token; ``impl="xla"`` is the chunked form.
Both compute in fp32. References: Sun et al. 2024 (TTT), Behrouz, Zhong, Mirrokni 2025
(Titans), Behrouz et al. 2025 (Miras, ATLAS).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._common import (
    NEG_INF,
    check_chunk_size,
    check_segment_ids,
    f32,
    fmt_shape,
    resolve_impl,
    segment_resets,
    shape_of,
)

Array = jax.Array
Params = dict[str, Array]

ARCHS = ("linear", "mlp", "gated_mlp")
LOSSES = ("dot", "l2", "lp", "huber")
NORMALIZERS = ("none", "lq", "softmax")
ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu}
NS_COEFFS = (3.4445, -4.7750, 2.0315)


# --------------------------------------------------------------------------------------------
# The four choices
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryArch:
    """The memory function M(z; W) from R^dk to R^dv, one weight per matmul.

    * ``linear``: M(z) = z W (W in R^{dk x dv}); the matrix memory of TTT-Linear, LMM with
      L_M = 1, OmegaNet.
    * ``mlp``: ``depth`` >= 2 layers z W0 -> act -> ... -> W_{L-1} (Titans eq. 12 memory,
      TTT-MLP); hidden width ``expansion * dv`` (the value width: a wide feature map on the
      keys, e.g. ATLAS's polynomial one, does not widen the hidden layer).
    * ``gated_mlp``: (act(z W2) * (z W3)) W1 (the ATLAS++ / DeepTransformers gated memory).
    ``layer_norm`` (no affine) then ``residual`` wrap the output: M(z) = z + LN(f(z)), as in
    Titans and TTT (residual needs dk >= dv and adds z's first dv features).
    """

    kind: str = "linear"
    depth: int = 2
    expansion: float = 4.0
    activation: str = "gelu"
    residual: bool = False
    layer_norm: bool = False

    def __post_init__(self):
        if self.kind not in ARCHS:
            raise ValueError(f"memory arch: unknown kind {self.kind!r}; valid: {ARCHS}")
        if self.kind == "mlp" and self.depth < 2:
            raise ValueError(
                f"memory arch: mlp depth must be >= 2 (use kind='linear'), got {self.depth}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"memory arch: unknown activation {self.activation!r}; valid: {tuple(ACTIVATIONS)}"
            )

    def hidden(self, dv: int) -> int:
        return max(1, int(round(self.expansion * dv)))

    def shapes(self, dk: int, dv: int) -> dict[str, tuple[int, int]]:
        """Weight name -> (d_in, d_out)."""
        if self.kind == "linear":
            return {"W": (dk, dv)}
        dh = self.hidden(dv)
        if self.kind == "gated_mlp":
            return {"W2": (dk, dh), "W3": (dk, dh), "W1": (dh, dv)}
        dims = [dk] + [dh] * (self.depth - 1) + [dv]
        return {f"W{i}": (dims[i], dims[i + 1]) for i in range(self.depth)}

    def apply(self, z: Array, mm: Callable[[str, Array], Array]) -> Array:
        """M(z) with every weight applied through ``mm(name, x)`` (= x @ W[name] normally)."""
        act = ACTIVATIONS[self.activation]
        if self.kind == "linear":
            out = mm("W", z)
        elif self.kind == "gated_mlp":
            out = mm("W1", act(mm("W2", z)) * mm("W3", z))
        else:
            h = z
            for i in range(self.depth):
                h = mm(f"W{i}", h)
                if i < self.depth - 1:
                    h = act(h)
            out = h
        if self.layer_norm:
            mean = jnp.mean(out, -1, keepdims=True)
            var = jnp.mean(jnp.square(out - mean), -1, keepdims=True)
            out = (out - mean) * lax.rsqrt(var + 1e-6)
        if self.residual:  # with a wider feature map (dk > dv), the leading dv features
            out = z[..., : out.shape[-1]] + out
        return out

    def init(
        self, key: Array, num_heads: int, dk: int, dv: int, std: float | None = None
    ) -> Params:
        """Initial weights [H, d_in, d_out]: normal(0, 1/sqrt(d_in)) per layer (zeros for a
        linear memory, which starts empty like every linear-attention state)."""
        out = {}
        for i, (name, (din, dout)) in enumerate(sorted(self.shapes(dk, dv).items())):
            if self.kind == "linear":
                out[name] = jnp.zeros((num_heads, din, dout), jnp.float32)
                continue
            s = std if std is not None else 1.0 / math.sqrt(din)
            out[name] = s * jax.random.normal(jax.random.fold_in(key, i), (num_heads, din, dout))
        return out


@dataclasses.dataclass(frozen=True)
class GradientMemorySpec:
    """Static choices of a gradient memory (everything that is not a per-token array).

    loss: "dot" (-<M(k), v>), "l2" (1/2 ||M(k) - v||^2), "lp" (sum (e^2 + lp_eps)^(p/2),
      Moneta), "huber" (Yaad: per coordinate 1/2 e^2 inside the radius ``delta`` (per token),
      delta * (|e| - delta/2) outside; choice: the paper switches on ||e|| for the whole
      token, which makes the update jump by up to sqrt(dv) at the radius).
    normalizer: "none"; "lq" (Moneta W = A / ||A||_q^(q-2) per weight matrix, q = norm_q);
      "softmax" (Memora, W = softmax(A) over each weight row; A is the log-weight).
    muon: ATLAS's Muon update (``ns_steps`` Newton-Schulz iterations on the momentum).
    window: the Omega rule's c (1 = online update).
    """

    arch: MemoryArch = MemoryArch()
    loss: str = "l2"
    lp_p: float = 3.0
    lp_eps: float = 1e-6
    normalizer: str = "none"
    norm_q: float = 4.0
    muon: bool = False
    ns_steps: int = 5
    window: int = 1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"gradient memory: unknown loss {self.loss!r}; valid: {LOSSES}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(
                f"gradient memory: unknown normalizer {self.normalizer!r}; valid: {NORMALIZERS}"
            )
        if self.window < 1:
            raise ValueError(f"gradient memory: window must be >= 1, got {self.window}")
        if self.loss == "lp" and self.lp_p < 1:
            raise ValueError(f"gradient memory: lp needs p >= 1, got {self.lp_p}")
        if self.normalizer == "lq" and self.norm_q <= 2:
            raise ValueError(f"gradient memory: lq normaliser needs q > 2, got {self.norm_q}")


# --------------------------------------------------------------------------------------------
# Pieces shared by every path
# --------------------------------------------------------------------------------------------


def token_loss(spec: GradientMemorySpec, pred: Array, v: Array, delta: Array | None) -> Array:
    """Per-token inner loss l(pred, v), summed over the value dim: [..., n, dv] -> [..., n]."""
    if spec.loss == "dot":
        return -jnp.sum(pred * v, -1)
    e = pred - v
    if spec.loss == "l2":
        return 0.5 * jnp.sum(e * e, -1)
    if spec.loss == "lp":
        return jnp.sum((e * e + spec.lp_eps) ** (0.5 * spec.lp_p), -1)
    # Yaad (Miras eq. 26): an l2 step inside the radius delta_t, a delta_t * l1 step outside,
    # per coordinate (the elementwise Huber, whose gradient clip(e, -delta, delta) is continuous)
    d = delta[..., None]
    ae = jnp.abs(e)
    return jnp.sum(jnp.where(ae <= d, 0.5 * e * e, d * (ae - 0.5 * d)), -1)


def _matmul(x: Array, w: Array) -> Array:
    return jnp.einsum("...nd,...de->...ne", x, w)


def anchor_pass(
    spec: GradientMemorySpec, W: Params, z: Array, v: Array, delta: Array | None
) -> tuple[Params, Params]:
    """One forward/backward of the memory at weights W over n tokens.

    z [..., n, dk], v [..., n, dv]. Returns per weight the layer inputs x [..., n, d_in] and
    the errors at its output delta [..., n, d_out], so that d l_j / dW = x_j delta_j^T.
    """
    eps = {name: jnp.zeros(z.shape[:-1] + (w.shape[-1],), jnp.float32) for name, w in W.items()}

    def f(eps):
        inputs = {}

        def mm(name, x):
            inputs[name] = x
            return _matmul(x, W[name]) + eps[name]

        out = spec.arch.apply(z, mm)
        return jnp.sum(token_loss(spec, out, v, delta)), inputs

    deltas, inputs = jax.grad(f, has_aux=True)(eps)
    return inputs, deltas


def newton_schulz(g: Array, steps: int) -> Array:
    """Quintic Newton-Schulz orthogonalisation of the last two axes (Muon; Jordan et al. 2024)."""
    a, b, c = NS_COEFFS
    transpose = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if transpose else g
    x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + 1e-7)
    for _ in range(steps):
        s = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * s + c * s @ s) @ x
    return jnp.swapaxes(x, -1, -2) if transpose else x


def lq_scale(spec: GradientMemorySpec, a: Array) -> Array:
    """Moneta's 1 / ||A||_q^(q-2) per weight matrix: [..., din, dout] -> [..., 1, 1].

    The norm is taken as m ||A / m||_q with m = max |A|, so |A|^q neither underflows nor
    overflows: a head whose accumulator decays to ~1e-10 made sum |A|^4 round to 0 in fp32 and
    its gradient 0 * inf = NaN. The value and gradient are those of ||A||_q (it is homogeneous
    of degree 1, so the gradient through m cancels).
    """
    qn = spec.norm_q
    mag = jnp.abs(a)
    m = jnp.max(mag, axis=(-2, -1), keepdims=True)
    nonzero = m > 0
    s = jnp.sum((mag / jnp.where(nonzero, m, 1.0)) ** qn, axis=(-2, -1), keepdims=True)
    norm = m * jnp.where(nonzero, s, 1.0) ** (1.0 / qn)  # s >= 1 where m > 0
    return jnp.maximum(norm, 1e-6) ** (2.0 - qn)


def weights_of(spec: GradientMemorySpec, acc: Params) -> Params:
    """W = N(A): the weights the memory is read with and differentiated at."""
    if spec.normalizer == "none":
        return acc
    if spec.normalizer == "lq":
        return {n: a * lq_scale(spec, a) for n, a in acc.items()}
    return {n: jax.nn.softmax(a, axis=-1) for n, a in acc.items()}


def read_weights(spec: GradientMemorySpec, acc: Params, anchor: Params) -> Params:
    if spec.normalizer == "lq":  # normaliser frozen at the chunk's anchor (module docstring)
        return {n: a * lq_scale(spec, anchor[n]) for n, a in acc.items()}
    return weights_of(spec, acc)


def _tree_where(cond: Array, a: Params, b: Params) -> Params:
    return {n: jnp.where(cond, a[n], b[n]) for n in a}


def _bcast_gate(g: Array) -> Array:
    """Gate [B,H] or [B,H,d] -> broadcastable against a weight [B,H,din,dout]."""
    return g[..., None, None] if g.ndim == 2 else g[..., :, None]


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def init_state(
    spec: GradientMemorySpec,
    params: Params,
    batch: int,
    *,
    momentum: bool,
    dk: int,
    dv: int,
) -> dict:
    """The state a call starts from when none is carried: accumulator = anchor = params
    (broadcast over the batch), momentum zeros, position 0 in the chunk, empty window."""
    acc = {n: jnp.broadcast_to(f32(w), (batch,) + w.shape[-3:]) for n, w in params.items()}
    state: dict[str, Any] = {"A": acc, "anchor": acc, "pos": jnp.zeros((batch,), jnp.int32)}
    if momentum or spec.muon:
        state["Z"] = {n: jnp.zeros_like(a) for n, a in acc.items()}
    if spec.window > 1:
        h = next(iter(acc.values())).shape[1]
        c1 = spec.window - 1
        state["window"] = {
            "k": jnp.zeros((batch, c1, h, dk), jnp.float32),
            "v": jnp.zeros((batch, c1, h, dv), jnp.float32),
            "gamma": jnp.zeros((batch, c1, h), jnp.float32),
            "delta": jnp.ones((batch, c1, h), jnp.float32),
        }
    return state


# --------------------------------------------------------------------------------------------
# One token (the step path, and the body of the scan reference)
# --------------------------------------------------------------------------------------------


def _token(spec, theta0, chunk_size, state, x):
    """x: dict of per-token arrays [B,H,...] (q, k, v, eta, log_a, log_mu, gamma, delta, reset
    [B]). Returns (y [B,H,dv], new state)."""
    reset = x["reset"][:, None, None, None]
    A, anchor = state["A"], state["anchor"]
    t0 = {n: jnp.broadcast_to(w, A[n].shape) for n, w in theta0.items()}
    A = _tree_where(reset, t0, A)
    anchor = _tree_where(reset, t0, anchor)
    at_start = (state["pos"] == 0)[:, None, None, None]
    anchor = _tree_where(at_start, A, anchor)

    keys, vals = x["k"][:, :, None], x["v"][:, :, None]
    gam = x["gamma"][:, :, None]
    dlt = None if x["delta"] is None else x["delta"][:, :, None]
    win = state.get("window")
    if win is not None:
        keep = 1.0 - x["reset"].astype(jnp.float32)[:, None, None]
        keys = jnp.concatenate([jnp.moveaxis(win["k"], 1, 2), keys], 2)
        vals = jnp.concatenate([jnp.moveaxis(win["v"], 1, 2), vals], 2)
        gam = jnp.concatenate([jnp.moveaxis(win["gamma"], 1, 2) * keep, gam], 2)
        if dlt is not None:
            dlt = jnp.concatenate([jnp.moveaxis(win["delta"], 1, 2), dlt], 2)
    ins, deltas = anchor_pass(spec, weights_of(spec, anchor), keys, vals, dlt)
    g = {n: jnp.einsum("bhn,bhnd,bhne->bhde", gam, ins[n], deltas[n]) for n in ins}

    a = 1.0 if x["log_a"] is None else _bcast_gate(jnp.exp(x["log_a"]))
    eta = _bcast_gate(x["eta"])
    new: dict[str, Any] = {}
    if "Z" in state:
        Z = _tree_where(reset, jax.tree.map(jnp.zeros_like, state["Z"]), state["Z"])
        mu = _bcast_gate(jnp.exp(x["log_mu"])) if x["log_mu"] is not None else 1.0
        if spec.muon:
            Z = {n: mu * Z[n] + g[n] for n in g}
            A = {n: a * A[n] - eta * newton_schulz(Z[n], spec.ns_steps) for n in g}
        else:
            Z = {n: mu * Z[n] + eta * g[n] for n in g}
            A = {n: a * A[n] - Z[n] for n in g}
        new["Z"] = Z
    else:
        A = {n: a * A[n] - eta * g[n] for n in g}

    R = read_weights(spec, A, anchor)
    y = spec.arch.apply(x["q"][:, :, None], lambda n, z: _matmul(z, R[n]))[:, :, 0]
    new.update(A=A, anchor=anchor, pos=(state["pos"] + 1) % chunk_size)
    if win is not None:
        c1 = spec.window - 1
        new["window"] = {
            "k": jnp.moveaxis(keys[:, :, -c1:], 2, 1),
            "v": jnp.moveaxis(vals[:, :, -c1:], 2, 1),
            "gamma": jnp.moveaxis(gam[:, :, -c1:], 2, 1),
            "delta": win["delta"] if dlt is None else jnp.moveaxis(dlt[:, :, -c1:], 2, 1),
        }
    return y, new


def _scan(spec, theta0, chunk_size, xs, state):
    def body(st, x):
        y, st = _token(spec, theta0, chunk_size, st, x)
        return st, y

    tm = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)
    state, ys = lax.scan(jax.checkpoint(body), state, tm)
    return jnp.moveaxis(ys, 0, 1), state


# --------------------------------------------------------------------------------------------
# Chunked (parallel) form
# --------------------------------------------------------------------------------------------


def _gather_time(x: Array, idx: Array, valid: Array, fill: float) -> Array:
    """x [B,T,...], idx/valid [B,L] -> [B,L,...] with x[b, idx] where valid else fill."""
    out = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), out, fill)


def _layout(xs, state, docs, c1, C):
    """Place the window buffer and the tokens on the chunk grid of each row.

    Row b's token 0 lands at grid position pos_b (its place in the current chunk), the c-1
    buffered window tokens just before it. Returns arrays of length c1 + L (L = N*C; the first
    c1 positions are the window tail of chunk 0) and the index of every real token."""
    B, T = docs.shape
    L = -(-(T + C - 1) // C) * C if state is not None else -(-T // C) * C
    r = jnp.zeros((B,), jnp.int32) if state is None else state["pos"]
    p = jnp.arange(-c1, L)[None, :]  # grid positions
    src = p - r[:, None]  # index into the real tokens
    real = (src >= 0) & (src < T)
    buf = (src < 0) & (src >= -c1)
    idx = jnp.clip(src, 0, T - 1)

    out = {}
    win = None if state is None else state.get("window")
    for name, fill in (("q", 0.0), ("k", 0.0), ("v", 0.0), ("delta", 1.0)):
        if xs[name] is None:
            out[name] = None
            continue
        val = _gather_time(xs[name], idx, real, fill)
        if win is not None and name in ("k", "v", "delta"):
            bidx = jnp.clip(src + c1, 0, c1 - 1)
            val = jnp.where(
                buf.reshape(buf.shape + (1,) * (val.ndim - 2)),
                _gather_time(win[name], bidx, buf, fill),
                val,
            )
        out[name] = val
    for name in ("eta", "log_a", "log_mu"):  # identity steps on padding
        out[name] = None if xs[name] is None else _gather_time(xs[name], idx, real, 0.0)
    gam = _gather_time(xs["gamma"], idx, real, 0.0)
    if win is not None:
        bidx = jnp.clip(src + c1, 0, c1 - 1)
        gam = jnp.where(buf[..., None], _gather_time(win["gamma"], bidx, buf, 0.0), gam)
    out["gamma"] = gam
    out["docs"] = jnp.take_along_axis(docs, idx, axis=1)
    out["real"] = real
    return out, r, L


def _chunk_windows(x: Array, n: int, C: int, c1: int) -> Array:
    """[B, c1 + n*C, ...] -> [B, n, C + c1, ...]: each chunk with its window tail."""
    idx = jnp.arange(n)[:, None] * C + jnp.arange(C + c1)[None, :]
    return jnp.take(x, idx, axis=1)


def _chunked(spec, theta0, C, xs, docs, state, momentum, has_segments):
    B, T, H, dk = xs["q"].shape
    c1 = spec.window - 1
    lay, r, L = _layout(xs, state, docs, c1, C)
    n = L // C
    f = jnp.float32

    def proper(x):  # [B, c1+L, ...] -> [B, H, n, C, ...]
        x = x[:, c1:].reshape((B, n, C) + x.shape[2:])
        return jnp.moveaxis(x, 3, 1) if x.ndim > 3 else x

    def ext(x):  # [B, c1+L, H, ...] -> [B, H, n, C+c1, ...]
        return jnp.moveaxis(_chunk_windows(x, n, C, c1), 3, 1)

    def gate(name, default):  # -> [B, H, n, C, dg]
        g = lay[name]
        if g is None:
            return jnp.full((B, H, n, C, 1), default, f)
        g = proper(g)
        return g if g.ndim == 5 else g[..., None]

    q = proper(lay["q"])  # [B,H,n,C,dk]
    ke, ve = ext(lay["k"]), ext(lay["v"])  # [B,H,n,C',d]
    de = None if lay["delta"] is None else ext(lay["delta"])  # [B,H,n,C']
    gam_e = ext(lay["gamma"])  # [B,H,n,C']
    docs_l = lay["docs"]
    doc_p = docs_l[:, c1:].reshape(B, n, C)[:, None]  # [B,1,n,C]
    doc_e = _chunk_windows(docs_l, n, C, c1)[:, None]  # [B,1,n,C']
    writer = lay["real"][:, c1:].reshape(B, n, C)[:, None].astype(f)
    prev_doc = jnp.concatenate([docs_l[:, c1 : c1 + 1], doc_p[:, 0, :-1, -1]], 1)[:, None]
    from_start = doc_p == prev_doc[..., None]  # [B,1,n,C]
    first = jnp.concatenate(
        [doc_p[..., :1] != prev_doc[..., None], doc_p[..., 1:] != doc_p[..., :-1]], -1
    )

    la, eta = gate("log_a", 0.0), gate("eta", 0.0)
    tri = jnp.tril(jnp.ones((C, C), bool))
    same = doc_p[..., :, None] == doc_p[..., None, :]
    caus = (tri & same)[..., None]  # [B,1,n,C,C,1]
    Ga = jnp.cumsum(la, 3)
    Amat = jnp.exp(jnp.where(caus, Ga[..., :, None, :] - Ga[..., None, :, :], NEG_INF))
    fs = from_start[..., None].astype(f)
    bb = jnp.exp(Ga) * fs  # [B,H,n,C,dg]
    rb = jnp.einsum("...tsd,...sd->...td", Amat, first[..., None] * jnp.exp(la))
    Amat = Amat * writer[..., None, :, None]  # padding steps retain but never write

    # the Omega band: step s applies gamma_i u_i for the c window tokens i <= s of its doc
    s_ext = jnp.arange(C)[:, None] + c1
    i_ext = jnp.arange(C + c1)[None, :]
    inwin = (i_ext <= s_ext) & (i_ext > s_ext - spec.window)
    band = (
        (inwin & (doc_p[..., :, None] == doc_e[..., None, :])).astype(f)
        * gam_e[..., None, :]
        * writer[..., :, None]
    )  # [B,H,n,C,C']

    if momentum or spec.muon:
        lm = gate("log_mu", 0.0)
        Gm = jnp.cumsum(lm, 3)
        Nm = jnp.exp(jnp.where(caus, Gm[..., :, None, :] - Gm[..., None, :, :], NEG_INF))
        if not spec.muon:
            Nm = Nm * eta[..., None, :, :]
        P = jnp.exp(Gm) * fs
        Nm_ext = jnp.einsum("...sjd,...ji->...sid", Nm, band)  # Z_s coefficients of u_i
    if spec.muon:
        coef = {"Amat": Amat, "eta": eta, "Nm_ext": Nm_ext, "P": P}
    elif momentum:
        Gc = jnp.einsum("...tsd,...sid->...tid", Amat, Nm_ext)
        ff = jnp.einsum("...tsd,...sd->...td", Amat, P)
        coef = {"Gc": Gc, "f": ff, "Nm_end": Nm_ext[..., -1, :, :], "P_end": P[..., -1, :]}
    else:
        Gc = jnp.einsum("...tsd,...sd,...si->...tid", Amat, eta, band)
        coef = {"Gc": Gc}
    coef.update(bb=bb, rb=rb)
    fs_e = (doc_e == prev_doc[..., None]).astype(f)  # ext token in the anchor's document
    materialise = spec.muon or spec.normalizer == "softmax"

    t0 = {nm: jnp.broadcast_to(w, (B,) + w.shape[-3:]) for nm, w in theta0.items()}
    if state is None:
        st0 = init_state(spec, theta0, B, momentum=momentum, dk=dk, dv=ve.shape[-1])
    else:
        st0 = state
    at0 = (r == 0)[:, None, None, None]
    anchor0 = _tree_where(at0, st0["A"], st0["anchor"])
    any_real = jnp.any(writer > 0, axis=-1)[:, 0]  # [B, n]

    def body(carry, x):
        Acc, Z, last = carry
        is_first, real_n = x["is_first"], x["any_real"][:, None, None, None]
        anc = _tree_where(is_first, anchor0, Acc)
        W_anc = weights_of(spec, anc)
        ins, dels = anchor_pass(spec, W_anc, x["k"], x["v"], x["delta"])
        if has_segments:
            ins0, dels0 = anchor_pass(spec, weights_of(spec, t0), x["k"], x["v"], x["delta"])
            sel = x["fs_e"][..., None] > 0
            ins = {nm: jnp.where(sel, ins[nm], ins0[nm]) for nm in ins}
            dels = {nm: jnp.where(sel, dels[nm], dels0[nm]) for nm in dels}
        cf = x["coef"]

        def outer(c, nm):  # sum_i c[..., t, i, d] x_i[d] delta_i -> [B,H,t,din,dout]
            xa = ins[nm]
            if c.shape[-1] == 1:
                return jnp.einsum("bhti,bhid,bhie->bhtde", c[..., 0], xa, dels[nm])
            return jnp.einsum("bhtid,bhid,bhie->bhtde", c, xa, dels[nm])

        if materialise:
            mats = {}
            for nm in ins:
                base = (
                    cf["bb"][..., None] * Acc[nm][:, :, None]
                    + cf["rb"][..., None] * t0[nm][:, :, None]
                )
                if spec.muon:
                    Zs = cf["P"][..., None] * Z[nm][:, :, None] + outer(cf["Nm_ext"], nm)
                    O = newton_schulz(Zs, spec.ns_steps)
                    step = cf["eta"][..., None] * O
                    a_ts = cf["Amat"]
                    if a_ts.shape[-1] == 1:
                        upd = jnp.einsum("bhts,bhsde->bhtde", a_ts[..., 0], step)
                    else:
                        upd = jnp.einsum("bhtsd,bhsde->bhtde", a_ts, step)
                    mats[nm] = (base - upd, Zs[:, :, -1])
                else:
                    m = base - outer(cf["Gc"], nm)
                    if "Z" in st0:
                        m = m - cf["f"][..., None] * Z[nm][:, :, None]
                    mats[nm] = (m, None)
            accs = {nm: m for nm, (m, _) in mats.items()}
            R = read_weights(spec, accs, {nm: a[:, :, None] for nm, a in anc.items()})
            y = spec.arch.apply(x["q"], lambda nm, z: jnp.einsum("bhtd,bhtde->bhte", z, R[nm]))
            A_new = {nm: m[:, :, -1] for nm, m in accs.items()}
        else:
            scale = {}
            if spec.normalizer == "lq":
                for nm in ins:
                    s_anc, s_0 = lq_scale(spec, anc[nm]), lq_scale(spec, t0[nm])  # [B,H,1,1]
                    scale[nm] = jnp.where(x["fs"][..., None] > 0, s_anc, s_0)  # [B,H,C,1]

            def mm(nm, z):
                def coeff_dot(c):  # scores[t,i] = sum_d z_t[d] xa_i[d] c[t,i,d]
                    if c.shape[-1] == 1:
                        return jnp.einsum("bhtd,bhid->bhti", z, ins[nm]) * c[..., 0]
                    return jnp.einsum("bhtd,bhid,bhtid->bhti", z, ins[nm], c)

                out = _matmul(z * cf["bb"], Acc[nm])
                if has_segments:
                    out = out + _matmul(z * cf["rb"], t0[nm])
                if "Z" in st0:
                    out = out - _matmul(z * cf["f"], Z[nm])
                out = out - jnp.einsum("bhti,bhie->bhte", coeff_dot(cf["Gc"]), dels[nm])
                return out * scale[nm] if nm in scale else out

            y = spec.arch.apply(x["q"], mm)
            gc_end = cf["Gc"][:, :, -1:]
            A_new = {}
            for nm in ins:
                a_end = cf["bb"][:, :, -1, :, None] * Acc[nm] - outer(gc_end, nm)[:, :, 0]
                if has_segments:
                    a_end = a_end + cf["rb"][:, :, -1, :, None] * t0[nm]
                if "Z" in st0:
                    a_end = a_end - cf["f"][:, :, -1, :, None] * Z[nm]
                A_new[nm] = a_end
        if spec.muon:
            Z_new = {nm: mats[nm][1] for nm in mats}
        elif "Z" in st0:
            Z_new = {
                nm: cf["P_end"][..., None] * Z[nm] + outer(cf["Nm_end"][:, :, None], nm)[:, :, 0]
                for nm in ins
            }
        else:
            Z_new = Z
        # the anchor a continuation needs: the last token's (reset weights after a reset)
        anc_last = _tree_where(x["fs"][:, :, -1:, None] > 0, anc, t0) if has_segments else anc
        last = _tree_where(real_n, anc_last, last)
        return (A_new, Z_new, last), y

    def chunk_major(a):
        return jnp.moveaxis(a, 2, 0)

    xs_scan = {
        "q": chunk_major(q),
        "k": chunk_major(ke),
        "v": chunk_major(ve),
        "delta": None if de is None else chunk_major(de),
        "fs_e": chunk_major(jnp.broadcast_to(fs_e, (B, H) + fs_e.shape[2:])),
        "fs": chunk_major(jnp.broadcast_to(from_start, (B, H, n, C)).astype(f)),
        "coef": jax.tree.map(chunk_major, coef),
        "is_first": jnp.arange(n) == 0,
        "any_real": jnp.moveaxis(any_real, 1, 0),
    }
    Z0 = st0.get("Z", {nm: jnp.zeros((), f) for nm in st0["A"]})
    # the backward recomputes each chunk from its carried state (no per-token weights kept)
    (A_f, Z_f, last), ys = lax.scan(jax.checkpoint(body), (st0["A"], Z0, anchor0), xs_scan)
    y = jnp.moveaxis(ys, 0, 2)  # [B,H,n,C,dv]
    y = jnp.moveaxis(y, 1, 3).reshape(B, L, H, -1)
    y = jnp.take_along_axis(y, (jnp.arange(T)[None] + r[:, None])[..., None, None], axis=1)

    new = {"A": A_f, "anchor": last, "pos": (r + T) % C}
    if "Z" in st0:
        new["Z"] = Z_f
    if c1 > 0:
        end = r + T  # grid position just after the last real token
        idx = (end[:, None] + jnp.arange(-c1, 0)[None, :]) + c1  # into the c1-prefixed layout
        last_doc = docs[:, -1:]
        seg_ok = jnp.take_along_axis(lay["docs"], idx, axis=1) == last_doc
        keep = lay["real"] | (jnp.arange(-c1, L)[None, :] < r[:, None])
        keep = jnp.take_along_axis(keep, idx, axis=1) & seg_ok
        new["window"] = {
            "k": _gather_time(lay["k"], idx, keep, 0.0),
            "v": _gather_time(lay["v"], idx, keep, 0.0),
            "gamma": _gather_time(lay["gamma"], idx, keep, 0.0),
            "delta": _gather_time(lay["delta"], idx, keep, 1.0)
            if lay["delta"] is not None
            else (state["window"]["delta"] if state is not None else jnp.ones((B, c1, H), f)),
        }
    return y, new


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def _check_tok(op, name, x, lead, dk, allow_channel):
    if x is None:
        return None
    s = shape_of(op, name, x)
    ok = [lead] + ([lead + (dk,)] if allow_channel else [])
    if s not in ok:
        want = " or ".join(fmt_shape(o) for o in ok)
        raise ValueError(f"{op}: {name} has shape {fmt_shape(s)}; expected {want}")
    return f32(x)


def _prepare(op, spec, q, k, v, eta, mu, log_a, gamma, delta, params, step):
    qs = shape_of(op, "q", q)
    nd = 3 if step else 4
    if len(qs) != nd:
        raise ValueError(
            f"{op}: q has shape {fmt_shape(qs)}; expected {'[B,H,dk]' if step else '[B,T,H,dk]'}"
        )
    if shape_of(op, "k", k) != qs:
        raise ValueError(f"{op}: k has shape {fmt_shape(k.shape)} but q has shape {fmt_shape(qs)}")
    vs = shape_of(op, "v", v)
    if len(vs) != nd or vs[:-1] != qs[:-1]:
        raise ValueError(
            f"{op}: v has shape {fmt_shape(vs)}; expected q's leading dims "
            f"{fmt_shape(qs[:-1])} + (dv,)"
        )
    lead, dk, dv = qs[:-1], qs[-1], vs[-1]
    channel = spec.arch.kind == "linear"
    if eta is None:
        raise ValueError(f"{op}: eta (the inner step size) is required")
    shapes = spec.arch.shapes(dk, dv)
    if spec.arch.residual and dk < dv:
        raise ValueError(f"{op}: a residual memory needs dk >= dv, got dk={dk}, dv={dv}")
    if params is None:
        if spec.arch.kind != "linear":
            raise ValueError(f"{op}: an {spec.arch.kind} memory needs its initial weights (params)")
        params = {"W": jnp.zeros((qs[-2], dk, dv), jnp.float32)}
    if set(params) != set(shapes):
        raise ValueError(
            f"{op}: params has weights {sorted(params)}; a {spec.arch.kind} memory needs "
            f"{sorted(shapes)}"
        )
    h = qs[-2]
    for nm, (din, dout) in shapes.items():
        ps = shape_of(op, f"params[{nm!r}]", params[nm])
        if ps[-3:] != (h, din, dout) or len(ps) not in (3, 4):
            raise ValueError(
                f"{op}: params[{nm!r}] has shape {fmt_shape(ps)}; expected [H,d_in,d_out]="
                f"{fmt_shape((h, din, dout))} (optionally with a leading batch dim)"
            )
    out = {
        "q": f32(q),
        "k": f32(k),
        "v": f32(v),
        "eta": _check_tok(op, "eta", eta, lead, dk, channel),
        "log_mu": None
        if mu is None
        else jnp.log(jnp.maximum(_check_tok(op, "mu", mu, lead, dk, channel), 1e-30)),
        "log_a": _check_tok(op, "log_a", log_a, lead, dk, channel),
        "gamma": jnp.ones(lead, jnp.float32)
        if gamma is None
        else _check_tok(op, "gamma", gamma, lead, dk, False),
        "delta": None,
    }
    if spec.loss == "huber":
        if delta is None:
            raise ValueError(
                f"{op}: loss='huber' needs delta (the per-token radius, shape {fmt_shape(lead)})"
            )
        out["delta"] = _check_tok(op, "delta", delta, lead, dk, False)
    return out, {n: f32(w) for n, w in params.items()}, dk, dv


def gradient_memory(
    q: Array,
    k: Array,
    v: Array,
    eta: Array,
    *,
    spec: GradientMemorySpec = GradientMemorySpec(),
    params: Params | None = None,
    mu: Array | None = None,
    log_a: Array | None = None,
    gamma: Array | None = None,
    delta: Array | None = None,
    initial_state: dict | None = None,
    segment_ids: Array | None = None,
    chunk_size: int = 16,
    impl: str = "auto",
    interpret: Any = False,
    block_v: int | None = None,
) -> tuple[Array, dict]:
    """A gradient memory over a sequence (SPEC regime C); see the module docstring.

    Args:
      q, k: [B,T,H,dk]; v: [B,T,H,dv] (feature maps, e.g. ATLAS's polynomial, already applied).
      eta: inner step size, [B,T,H] (or [B,T,H,dk] per channel, linear memory only).
      spec: the static choices (architecture, loss, normaliser, Muon, Omega window).
      params: the reset weights {name: [H,d_in,d_out]} (Titans' learned initial memory); the
        state every document starts from. Default (linear memory only): zeros.
      mu: momentum decay in (0, 1], like eta's shape; None = no momentum (plain descent).
        With spec.muon, None means mu = 1.
      log_a: log retention (<= 0), like eta's shape; None = no decay.
      gamma: Omega-rule weight of each token [B,T,H] (default 1).
      delta: Huber radius per token [B,T,H] (loss="huber").
      initial_state: a state returned by a previous call (or :func:`init_state`).
      segment_ids: int [B,T]; a change of id resets the state to ``params``.
      chunk_size: C, a model hyperparameter (1 = the per-token model).
      impl: "auto" | "xla" (chunked, dual form) | "scan" (token by token, the reference) |
        "pallas_tpu" | "pallas_gpu" (kernels; "auto" takes them on TPU / GPU when they
        support the call).
      interpret: run the Pallas impl in interpret mode (True, or ``pltpu.InterpretParams``).
      block_v: the kernels' dv block (None = the backend's default).

    Returns:
      (y [B,T,H,dv] in v's dtype, final state dict, fp32).
    """
    op = "gradient_memory"
    if not isinstance(spec, GradientMemorySpec):
        raise TypeError(f"{op}: spec must be a GradientMemorySpec, got {type(spec).__name__}")
    x, theta0, dk, dv = _prepare(
        op, spec, q, k, v, eta, mu, log_a, gamma, delta, params, step=False
    )
    B, T = q.shape[:2]
    if T < 1:
        raise ValueError(f"{op}: sequence length T must be >= 1")
    C = check_chunk_size(op, chunk_size)
    check_segment_ids(op, segment_ids, B, T)
    momentum = mu is not None
    if initial_state is not None:
        _check_state(op, spec, initial_state, momentum, B, theta0)
    which = resolve_impl(  # a registered kernel takes the op's own arguments
        op,
        impl,
        (q, k, v, eta),
        dict(
            spec=spec,
            params=params,
            mu=mu,
            log_a=log_a,
            gamma=gamma,
            delta=delta,
            initial_state=initial_state,
            segment_ids=segment_ids,
            chunk_size=chunk_size,
        ),
        interpret=interpret,
        block_v=block_v,
    )
    if callable(which):
        return which()
    resets = segment_resets(segment_ids, B, T)
    if which == "scan":
        st = initial_state
        if st is None:
            st = init_state(spec, theta0, B, momentum=momentum, dk=dk, dv=dv)
        x["reset"] = resets
        y, state = _scan(spec, theta0, C, x, st)
    else:
        docs = jnp.cumsum(resets.astype(jnp.int32), 1)  # document index of every token
        y, state = _chunked(
            spec, theta0, C, x, docs, initial_state, momentum, segment_ids is not None
        )
    return y.astype(v.dtype), state


def _check_state(op, spec, state, momentum, batch, theta0):
    if not isinstance(state, dict) or "A" not in state or "pos" not in state:
        raise ValueError(
            f"{op}: initial_state must be a state dict from a previous call or init_state"
        )
    if ("Z" in state) != (momentum or spec.muon):
        raise ValueError(
            f"{op}: initial_state {'has' if 'Z' in state else 'lacks'} momentum but mu is "
            f"{'None' if not momentum else 'given'}"
        )
    if ("window" in state) != (spec.window > 1):
        raise ValueError(f"{op}: initial_state does not match window={spec.window}")
    for nm, w in theta0.items():
        want = (batch,) + tuple(w.shape[-3:])
        got = tuple(state["A"][nm].shape)
        if got != want:
            raise ValueError(
                f"{op}: initial_state['A'][{nm!r}] has shape {fmt_shape(got)}; "
                f"expected {fmt_shape(want)}"
            )


def gradient_memory_step(
    q: Array,
    k: Array,
    v: Array,
    eta: Array,
    state: dict,
    *,
    spec: GradientMemorySpec = GradientMemorySpec(),
    params: Params | None = None,
    mu: Array | None = None,
    log_a: Array | None = None,
    gamma: Array | None = None,
    delta: Array | None = None,
    chunk_size: int = 16,
) -> tuple[Array, dict]:
    """One token of :func:`gradient_memory` (q, k [B,H,dk], v [B,H,dv], gates [B,H] or
    [B,H,dk]); follows the chunk grid carried in ``state``, so T steps equal one call."""
    op = "gradient_memory_step"
    x, theta0, dk, dv = _prepare(op, spec, q, k, v, eta, mu, log_a, gamma, delta, params, step=True)
    _check_state(op, spec, state, mu is not None, q.shape[0], theta0)
    x["reset"] = jnp.zeros((q.shape[0],), bool)
    y, new = _token(spec, theta0, check_chunk_size(op, chunk_size), state, x)
    return y.astype(v.dtype), new


def linear_memory(
    q: Array,
    k: Array,
    v: Array,
    eta: Array,
    *,
    mu: Array | None = None,
    log_a: Array | None = None,
    loss: str = "l2",
    chunk_size: int = 16,
    initial_state: dict | None = None,
    segment_ids: Array | None = None,
    impl: str = "auto",
    interpret: Any = False,
    block_v: int | None = None,
    **spec_kw: Any,
) -> tuple[Array, dict]:
    """:func:`gradient_memory` with a dk x dv matrix memory M(z) = z W starting from zeros
    (TTT-Linear, Titans LMM with L_M = 1, OmegaNet). ``spec_kw``: the other
    :class:`GradientMemorySpec` fields and ``gamma``/``delta``/``params``."""
    arrays = {n: spec_kw.pop(n) for n in ("gamma", "delta", "params") if n in spec_kw}
    spec = GradientMemorySpec(arch=MemoryArch("linear"), loss=loss, **spec_kw)
    return gradient_memory(
        q,
        k,
        v,
        eta,
        spec=spec,
        mu=mu,
        log_a=log_a,
        initial_state=initial_state,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        impl=impl,
        interpret=interpret,
        block_v=block_v,
        **arrays,
    )


__all__: Any = [
    "GradientMemorySpec",
    "MemoryArch",
    "anchor_pass",
    "gradient_memory",
    "gradient_memory_step",
    "init_state",
    "linear_memory",
    "read_weights",
    "newton_schulz",
    "token_loss",
    "weights_of",
]
