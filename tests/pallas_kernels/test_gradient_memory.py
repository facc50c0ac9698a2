"""The regime-C op (gradient memories): every combination of memory x bias x retention x
algorithm that a preset uses goes through the same checks.

* chunked ("xla") == the token-by-token surrogate ("scan"), T not a multiple of the chunk, with
  a carried state that starts mid-chunk and with packed documents;
* chunk_size = 1 == an independent per-token model written with jax.grad of the inner loss;
* gradients of every input, of the reset weights and of the initial state agree (xla vs scan);
* split-and-carry and step-by-step decoding == the whole sequence; packed == alone on the grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiers import core_first

from pallas_kernels.ops.gradient_memory import (
    GradientMemorySpec,
    MemoryArch,
    gradient_memory,
    gradient_memory_step,
    init_state,
    linear_memory,
    lq_scale,
    token_loss,
)

B, H, DK, DV = 2, 2, 8, 8
MLP = MemoryArch("mlp", depth=2, expansion=2.0, residual=True, layer_norm=True)
GATED = MemoryArch("gated_mlp", expansion=2.0, residual=True)

# name -> (spec, gates the combination uses)
COMBOS = {
    "ttt_linear": (GradientMemorySpec(), ("eta",)),
    "linear_momentum_decay": (GradientMemorySpec(), ("eta", "mu", "log_a")),
    "linear_per_channel": (GradientMemorySpec(), ("eta_c", "mu_c", "log_a_c")),
    "linear_dot": (GradientMemorySpec(loss="dot"), ("eta", "log_a")),
    "ttt_mlp": (GradientMemorySpec(arch=MLP), ("eta",)),
    "titans_mlp": (GradientMemorySpec(arch=MLP), ("eta", "mu", "log_a")),
    "moneta": (GradientMemorySpec(arch=MLP, loss="lp", normalizer="lq"), ("eta", "log_a")),
    "yaad": (GradientMemorySpec(arch=MLP, loss="huber"), ("eta", "log_a", "delta")),
    "memora": (GradientMemorySpec(arch=MLP, normalizer="softmax"), ("eta", "log_a")),
    "omeganet": (GradientMemorySpec(window=3), ("eta", "log_a", "gamma")),
    "atlas": (GradientMemorySpec(arch=MLP, muon=True, window=3), ("eta", "mu", "log_a", "gamma")),
    "atlas_pp": (GradientMemorySpec(arch=GATED, muon=True, window=2), ("eta", "mu", "gamma")),
}
NAMES = list(COMBOS)
# the MLP-memory combinations beyond Titans and ATLAS compile slowly: their per-token,
# gradient and carry checks run in the full tier (tests/support/tiers.py); the chunked form of
# every combination is checked in the default tier
HEAVY = ("ttt_mlp", "moneta", "yaad", "memora", "atlas_pp")
TIERED = core_first(NAMES, HEAVY)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(rel(x, y) for x, y in zip(la, lb, strict=True))


def make(name, T, seed=0):
    spec, uses = COMBOS[name]
    ks = jax.random.split(jax.random.key(seed), 12)

    def unit(k, d):
        x = jax.random.normal(k, (B, T, H, d))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    arrays = {
        "q": unit(ks[0], DK),
        "k": unit(ks[1], DK),
        "v": jax.random.normal(ks[2], (B, T, H, DV)),
    }
    gates = {}
    for u in uses:
        shape = (B, T, H, DK) if u.endswith("_c") else (B, T, H)
        z = jax.random.normal(ks[3 + len(gates)], shape)
        base = u.removesuffix("_c")
        gates[base] = {
            "eta": 0.5 * jax.nn.sigmoid(z),
            "mu": jax.nn.sigmoid(z + 1.0),
            "log_a": jax.nn.log_sigmoid(z + 3.0),
            "gamma": jax.nn.sigmoid(z),
            "delta": 0.3 + jax.nn.softplus(z),
        }[base]
    params = None if spec.arch.kind == "linear" else spec.arch.init(ks[10], H, DK, DV)
    if params is not None and spec.normalizer == "softmax":
        params = {n: 0.1 * w for n, w in params.items()}
    return spec, arrays, gates, params


_jit_op = jax.jit(gradient_memory, static_argnames=("spec", "chunk_size", "impl"))
_jit_step = jax.jit(gradient_memory_step, static_argnames=("spec", "chunk_size"))


def run(spec, arrays, gates, params, jit=True, **kw):
    return (_jit_op if jit else gradient_memory)(
        arrays["q"],
        arrays["k"],
        arrays["v"],
        gates["eta"],
        spec=spec,
        params=params,
        mu=gates.get("mu"),
        log_a=gates.get("log_a"),
        gamma=gates.get("gamma"),
        delta=gates.get("delta"),
        **kw,
    )


def sliced(d, a, b):
    return {n: x[:, a:b] for n, x in d.items()}


SEG = jnp.array([[0] * 6 + [1] * 9 + [2] * 6, [5] * 21], jnp.int32)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_scan_surrogate(name):
    spec, arrays, gates, params = make(name, 26)
    # a carried state that sits mid-chunk (5 tokens into a chunk of 8)
    _, st = run(spec, sliced(arrays, 0, 5), sliced(gates, 0, 5), params, chunk_size=8, impl="scan")
    rest_a, rest_g = sliced(arrays, 5, 26), sliced(gates, 5, 26)
    kw = dict(chunk_size=8, initial_state=st, segment_ids=SEG)
    ys, ss = run(spec, rest_a, rest_g, params, impl="scan", **kw)
    yx, sx = run(spec, rest_a, rest_g, params, impl="xla", **kw)
    assert rel(yx, ys) < 1e-4 and tree_rel(sx, ss) < 1e-4, name
    # from a fresh state without documents, T not a multiple of C (and C > T once)
    c = 32 if name == "titans_mlp" else 4
    ys, ss = run(spec, rest_a, rest_g, params, impl="scan", chunk_size=c)
    yx, sx = run(spec, rest_a, rest_g, params, impl="xla", chunk_size=c)
    # Memora's multiplicative (softmax) update amplifies fp32 rounding in the state: 1.6e-5 to
    # 1.0e-4 here depending on the XLA CPU runtime flags, against <= 2.3e-5 for the others.
    state_tol = 3e-4 if name == "memora" else 1e-4
    assert rel(yx, ys) < 1e-4 and tree_rel(sx, ss) < state_tol, (name, c)


def _normalised(spec, a):
    if spec.normalizer == "lq":
        qn = spec.norm_q
        norm = jnp.sum(jnp.abs(a) ** qn, axis=(-2, -1), keepdims=True) ** (1 / qn)
        return a / norm ** (qn - 2)
    if spec.normalizer == "softmax":
        return jax.nn.softmax(a, axis=-1)
    return a


def per_token_reference(spec, arrays, gates, params):
    """The per-token model, SPEC G0, with the gradient from jax.grad of the window loss."""
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    T = q.shape[1]
    if params is None:
        params = {"W": jnp.zeros((H, DK, DV))}
    A = {n: jnp.broadcast_to(w, (B,) + w.shape) for n, w in params.items()}
    Z = {n: jnp.zeros_like(a) for n, a in A.items()}
    gamma = gates.get("gamma", jnp.ones((B, T, H)))
    delta = gates.get("delta")

    def memory(W, z):  # z [B,H,dk] -> [B,H,dv]
        return spec.arch.apply(z[:, :, None], lambda n, x: jnp.einsum("bhnd,bhde->bhne", x, W[n]))[
            :, :, 0
        ]

    def g4(x):  # gate [B,H] or [B,H,dk] -> against [B,H,din,dout]
        return x[..., None, None] if x.ndim == 2 else x[..., None]

    ys = []
    for t in range(T):
        W = {n: _normalised(spec, a) for n, a in A.items()}

        def window_loss(W, t=t):
            total = 0.0
            for i in range(max(0, t - spec.window + 1), t + 1):
                d = None if delta is None else delta[:, i]
                li = token_loss(spec, memory(W, k[:, i]), v[:, i], d)
                total = total + jnp.sum(gamma[:, i] * li)
            return total

        g = jax.grad(window_loss)(W)
        a = jnp.exp(g4(gates["log_a"][:, t])) if "log_a" in gates else 1.0
        eta = g4(gates["eta"][:, t])
        mu = g4(gates["mu"][:, t]) if "mu" in gates else None
        prev = A
        if spec.muon:
            from pallas_kernels.ops.gradient_memory import newton_schulz

            Z = {n: (1.0 if mu is None else mu) * Z[n] + g[n] for n in g}
            A = {n: a * A[n] - eta * newton_schulz(Z[n], spec.ns_steps) for n in g}
        elif mu is not None:
            Z = {n: mu * Z[n] + eta * g[n] for n in g}
            A = {n: a * A[n] - Z[n] for n in g}
        else:
            A = {n: a * A[n] - eta * g[n] for n in g}
        if spec.normalizer == "lq":  # the read scale is the anchor's (module docstring)
            qn = spec.norm_q
            scale = {
                n: jnp.sum(jnp.abs(prev[n]) ** qn, axis=(-2, -1), keepdims=True) ** ((2 - qn) / qn)
                for n in A
            }
            R = {n: A[n] * scale[n] for n in A}
        else:
            R = {n: _normalised(spec, A[n]) for n in A}
        ys.append(memory(R, q[:, t]))
    return jnp.stack(ys, 1), A


@pytest.mark.parametrize("name", TIERED)
def test_chunk_one_equals_per_token_autodiff_model(name):
    spec, arrays, gates, params = make(name, 9, seed=1)
    y_ref, a_ref = per_token_reference(spec, arrays, gates, params)
    for impl in ("xla", "scan"):
        y, st = run(spec, arrays, gates, params, chunk_size=1, impl=impl)
        assert rel(y, y_ref) < 1e-4, (name, impl)
        assert tree_rel(st["A"], a_ref) < 1e-4, (name, impl)


@pytest.mark.parametrize("name", TIERED)
def test_gradients_of_every_input_agree(name):
    spec, arrays, gates, params = make(name, 11, seed=2)
    _, st = run(spec, sliced(arrays, 0, 3), sliced(gates, 0, 3), params, chunk_size=4, impl="scan")
    rest_a, rest_g = sliced(arrays, 3, 11), sliced(gates, 3, 11)
    w = jax.random.normal(jax.random.key(9), (B, 8, H, DV))
    # row 0 starts a new document mid-chunk, so the reset weights reach the loss too
    seg = jnp.array([[0] * 3 + [1] * 5, [0] * 8], jnp.int32)

    def loss(inputs, impl):
        a, g, p, s = inputs
        y, s_out = run(
            spec, a, g, p, jit=False, chunk_size=4, impl=impl, initial_state=s, segment_ids=seg
        )
        return jnp.sum(y * w) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(s_out["A"]))

    if params is None:
        params = {"W": 0.1 * jax.random.normal(jax.random.key(3), (H, DK, DV))}
    st_in = {n: x for n, x in st.items()}
    inputs = (rest_a, rest_g, params, st_in)
    gx = jax.jit(jax.grad(lambda i: loss(i, "xla"), allow_int=True))(inputs)
    gs = jax.jit(jax.grad(lambda i: loss(i, "scan"), allow_int=True))(inputs)
    fx = [x for x in jax.tree.leaves(gx) if jnp.issubdtype(x.dtype, jnp.floating)]
    fs = [x for x in jax.tree.leaves(gs) if jnp.issubdtype(x.dtype, jnp.floating)]
    paths = [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_leaves_with_path(gx)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    for path, a, b in zip(paths, fx, fs, strict=True):
        assert bool(jnp.all(jnp.isfinite(a))), (name, path)
        if float(jnp.linalg.norm(b)) == 0.0:
            assert float(jnp.linalg.norm(a)) < 1e-6, (name, path)
            continue
        assert rel(a, b) < 2e-4, (name, path, rel(a, b))
    # every array input really reaches the loss
    for group in (gx[0], gx[1], gx[2], gx[3]["A"]):
        for path, x in jax.tree_util.tree_leaves_with_path(group):
            assert float(jnp.linalg.norm(x)) > 0, (name, jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", core_first(["titans_mlp", "omeganet", "atlas", "moneta"], HEAVY))
def test_split_carry_and_steps_equal_whole(name):
    spec, arrays, gates, params = make(name, 19, seed=4)
    kw = dict(chunk_size=4, impl="xla")
    y, s = run(spec, arrays, gates, params, **kw)
    y1, s1 = run(spec, sliced(arrays, 0, 7), sliced(gates, 0, 7), params, **kw)
    y2, s2 = run(spec, sliced(arrays, 7, 19), sliced(gates, 7, 19), params, initial_state=s1, **kw)
    assert rel(jnp.concatenate([y1, y2], 1), y) < 1e-4
    assert tree_rel(s2, s) < 1e-4
    st = init_state(
        spec, params or {"W": jnp.zeros((H, DK, DV))}, B, momentum="mu" in gates, dk=DK, dv=DV
    )
    outs = []
    for t in range(19):
        one = {n: x[:, t] for n, x in arrays.items()}
        g1 = {n: x[:, t] for n, x in gates.items()}
        yt, st = _jit_step(
            one["q"],
            one["k"],
            one["v"],
            g1["eta"],
            st,
            spec=spec,
            params=params,
            mu=g1.get("mu"),
            log_a=g1.get("log_a"),
            gamma=g1.get("gamma"),
            delta=g1.get("delta"),
            chunk_size=4,
        )
        outs.append(yt)
    assert rel(jnp.stack(outs, 1), y) < 1e-4
    assert tree_rel(st, s) < 1e-4


@pytest.mark.parametrize("name", ["titans_mlp", "omeganet"])
def test_packed_documents_on_the_chunk_grid_equal_each_alone(name):
    spec, arrays, gates, params = make(name, 20, seed=5)
    seg = jnp.concatenate([jnp.zeros((B, 8)), jnp.ones((B, 12))], 1).astype(jnp.int32)
    packed, _ = run(spec, arrays, gates, params, chunk_size=4, segment_ids=seg, impl="xla")
    ya, _ = run(spec, sliced(arrays, 0, 8), sliced(gates, 0, 8), params, chunk_size=4)
    yb, _ = run(spec, sliced(arrays, 8, 20), sliced(gates, 8, 20), params, chunk_size=4)
    assert rel(packed, jnp.concatenate([ya, yb], 1)) < 1e-4


def test_bf16_inputs_give_finite_outputs_close_to_fp32():
    spec, arrays, gates, params = make("titans_mlp", 21)
    y32, _ = run(spec, arrays, gates, params, chunk_size=8)
    a16 = {n: x.astype(jnp.bfloat16) for n, x in arrays.items()}
    y16, s16 = run(spec, a16, gates, params, chunk_size=8)
    assert y16.dtype == jnp.bfloat16 and s16["A"]["W0"].dtype == jnp.float32
    assert rel(y16.astype(jnp.float32), y32) < 2e-2


@pytest.mark.parametrize("scale", [1e-3, 1e10])
def test_lq_scale_value_and_gradient_match_float64_at_any_magnitude(scale):
    """||A||_q^(2-q) and its gradient against the float64 formula, including an accumulator
    whose sum |A|^4 overflows fp32 (1e10)."""
    spec = GradientMemorySpec(normalizer="lq")
    qn = spec.norm_q
    a = scale * np.random.default_rng(0).standard_normal((3, 16, 8))
    val, grad = jax.value_and_grad(lambda x: jnp.sum(lq_scale(spec, x)))(jnp.float32(a))
    norm = np.sum(np.abs(a) ** qn, axis=(1, 2), keepdims=True) ** (1 / qn)
    want = np.sum(norm ** (2 - qn))
    want_grad = (2 - qn) * norm ** (2 - 2 * qn) * np.sign(a) * np.abs(a) ** (qn - 1)
    assert abs(float(val) - want) / want < 1e-5
    assert np.linalg.norm(grad - want_grad) / np.linalg.norm(want_grad) < 1e-5


def test_lq_scale_gradient_is_finite_for_vanishing_accumulators():
    """A head whose accumulator decays to ~3e-10 (Moneta, mqar_zoo d 64 / T 128, step 148):
    sum |A|^4 rounds to 0 in fp32, and a naive norm's gradient is 0 * inf = NaN there. Below
    the 1e-6 floor the scale is constant, so its gradient is exactly 0."""
    spec = GradientMemorySpec(normalizer="lq")
    a = np.random.default_rng(1).standard_normal((3, 16, 8)).astype(np.float32)
    a[0] *= 3e-10
    a[1] = 0.0
    val, grad = jax.value_and_grad(lambda x: jnp.sum(lq_scale(spec, x)[:2]))(jnp.asarray(a))
    assert float(val) == pytest.approx(2e12, rel=1e-6)
    assert np.all(np.asarray(grad) == 0.0)


def test_linear_memory_wrapper_matches_generic_op():
    spec, arrays, gates, _ = make("linear_momentum_decay", 13)
    y1, _ = linear_memory(
        arrays["q"],
        arrays["k"],
        arrays["v"],
        gates["eta"],
        mu=gates["mu"],
        log_a=gates["log_a"],
        chunk_size=4,
    )
    y2, _ = run(spec, arrays, gates, None, chunk_size=4)
    assert rel(y1, y2) < 1e-6


def test_errors_are_clear():
    spec, arrays, gates, params = make("titans_mlp", 5)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    with pytest.raises(ValueError, match="needs its initial weights"):
        gradient_memory(q, k, v, gates["eta"], spec=spec)
    with pytest.raises(ValueError, match="eta has shape"):
        gradient_memory(q, k, v, gates["eta"][..., None], spec=spec, params=params)
    with pytest.raises(ValueError, match="per.*|eta has shape"):
        gradient_memory(q, k, v, jnp.ones((B, 5, H, DK)), spec=spec, params=params)
    with pytest.raises(ValueError, match="needs delta"):
        gradient_memory(q, k, v, gates["eta"], spec=GradientMemorySpec(loss="huber"))
    with pytest.raises(ValueError, match="unknown loss"):
        GradientMemorySpec(loss="l3")
    with pytest.raises(ValueError, match=r"params\['W0'\] has shape"):
        bad = dict(params, W0=params["W0"][:, :4])
        gradient_memory(q, k, v, gates["eta"], spec=spec, params=bad)
    _, st = gradient_memory(q, k, v, gates["eta"], spec=spec, params=params)
    with pytest.raises(ValueError, match="lacks momentum"):
        gradient_memory(
            q, k, v, gates["eta"], spec=spec, params=params, mu=gates["mu"], initial_state=st
        )
    with pytest.raises(ValueError, match="chunk_size"):
        gradient_memory(q, k, v, gates["eta"], spec=spec, params=params, chunk_size=0)
    with pytest.raises(ValueError, match="unknown impl"):
        gradient_memory(q, k, v, gates["eta"], spec=spec, params=params, impl="cuda")
