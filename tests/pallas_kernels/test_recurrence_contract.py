"""One contract suite for every recurrence op variant (SPEC section 1, "Contract").

Variants: gla with log_a None / [B,T,H] / [B,T,H,dk]; delta_rule with log_a None / [B,T,H];
hgrn. Every check runs for every variant.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import (
    delta_rule,
    delta_rule_step,
    gla,
    gla_step,
    hgrn,
    hgrn_step,
    register_kernel,
)

B, H, DK, DV = 2, 2, 8, 8


@dataclass(frozen=True)
class Variant:
    name: str
    op: Any
    step: Any
    decay: str | None  # None, "scalar" or "channel"

    @property
    def family(self) -> str:
        return self.op.__name__


VARIANTS = [
    Variant("gla_none", gla, gla_step, None),
    Variant("gla_scalar", gla, gla_step, "scalar"),
    Variant("gla_channel", gla, gla_step, "channel"),
    Variant("delta_none", delta_rule, delta_rule_step, None),
    Variant("delta_scalar", delta_rule, delta_rule_step, "scalar"),
    Variant("hgrn", hgrn, hgrn_step, "channel"),
]
VARIANT_IDS = [v.name for v in VARIANTS]
by_name = {v.name: v for v in VARIANTS}


def _l2n(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(var: Variant, t: int, seed: int = 0, dtype=jnp.float32) -> tuple:
    """Positional array args of the op (same order as its step function)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, t, H, DK))
    k = jax.random.normal(ks[1], (B, t, H, DK))
    v = jax.random.normal(ks[2], (B, t, H, DV))
    x = jax.random.normal(ks[3], (B, t, H, DK))
    # head 0: mild decays; head 1: strong decays (stress numerical stability).
    strength = jnp.array([1.0, 40.0])
    if var.decay == "scalar":
        log_a = -jax.nn.softplus(x[..., 0]) * strength / 4.0
    elif var.decay == "channel":
        log_a = jax.nn.log_sigmoid(x) / 16.0 * strength[:, None]
        if var.family == "hgrn":
            log_a = jax.nn.log_sigmoid(x + 1.0) * strength[:, None] / 8.0
    else:
        log_a = None
    cast = lambda a: None if a is None else a.astype(dtype)
    if var.family == "gla":
        return tuple(map(cast, (q, k, v, log_a)))
    if var.family == "delta_rule":
        eta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, t, H)))
        return tuple(map(cast, (_l2n(q), _l2n(k), v, eta, log_a)))
    return tuple(map(cast, (q, v, log_a)))


def state_shape(var: Variant) -> tuple[int, ...]:
    return (B, H, DK) if var.family == "hgrn" else (B, H, DK, DV)


def make_state(var: Variant, seed: int = 7) -> jax.Array:
    return 0.5 * jax.random.normal(jax.random.PRNGKey(seed), state_shape(var))


@functools.cache
def runner(name: str, impl: str, chunk_size: int = 64):
    """Jitted (args, initial_state, segment_ids) -> (y, final_state); cached across tests."""
    op = by_name[name].op

    def f(args, s0, seg):
        return op(*args, initial_state=s0, segment_ids=seg, chunk_size=chunk_size, impl=impl)

    return jax.jit(f)


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --------------------------------------------------------------------------------------------
# scan == step-by-step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANT_IDS)
def test_scan_matches_python_step_loop(name):
    var = by_name[name]
    t = 13
    args = make_inputs(var, t)
    s0 = make_state(var)
    seg = np.array([[0] * 5 + [1] * 8, [4] * 3 + [2] * 6 + [4] * 4])
    y_scan, s_scan = runner(name, "scan")(args, s0, jnp.asarray(seg))

    step = jax.jit(var.step)
    s = s0
    ys = []
    for i in range(t):
        reset = np.zeros((B,), bool) if i == 0 else seg[:, i] != seg[:, i - 1]
        s = jnp.where(jnp.asarray(reset).reshape((B,) + (1,) * (s.ndim - 1)), 0.0, s)
        y, s = step(*[None if a is None else a[:, i] for a in args], s)
        ys.append(y)
    y_loop = jnp.stack(ys, axis=1)
    assert y_scan.shape == y_loop.shape
    assert rel(y_scan, y_loop) < 1e-5
    assert rel(s_scan, s) < 1e-5


# --------------------------------------------------------------------------------------------
# chunked (xla) == scan
# --------------------------------------------------------------------------------------------

XLA_CASES = [  # (T, chunk_size, with initial_state); C > T and C not a multiple of 16 included
    (1, 16, True),
    (63, 16, False),
    (63, 64, True),
    (64, 32, False),
    (200, 64, True),
    (200, 16, False),
]


@pytest.mark.parametrize("t,chunk,with_init", XLA_CASES)
@pytest.mark.parametrize("name", VARIANT_IDS)
def test_xla_matches_scan(name, t, chunk, with_init):
    var = by_name[name]
    args = make_inputs(var, t, seed=t)
    s0 = make_state(var) if with_init else None
    y_ref, s_ref = runner(name, "scan")(args, s0, None)
    y, s = runner(name, "xla", chunk)(args, s0, None)
    assert y.shape == (B, t, H, DV)
    assert y.shape == y_ref.shape and s.shape == s_ref.shape == state_shape(var)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(s)))
    assert rel(y, y_ref) < 1e-4
    assert rel(s, s_ref) < 1e-4


def test_xla_default_chunk_and_auto_impl():
    var = by_name["gla_channel"]
    args = make_inputs(var, 70)
    y_ref, s_ref = runner("gla_channel", "scan")(args, None, None)
    y, s = jax.jit(lambda a: gla(*a))(args)  # impl="auto" -> "xla" on CPU, chunk_size=64
    assert rel(y, y_ref) < 1e-4 and rel(s, s_ref) < 1e-4


def test_extreme_decay_is_finite():
    """exp(-G) factorisations overflow here (G ~ -3000 within a chunk); ours must not."""
    t = 64
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (jax.random.normal(kk, (B, t, H, DK)) for kk in ks[:3])
    log_a = -50.0 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, t, H, DK)))

    @functools.partial(jax.jit, static_argnames="impl")
    def f(q, k, v, la, impl):
        return gla(q, k, v, la, impl=impl, chunk_size=64)[0]

    loss = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a, "xla")), argnums=(0, 1, 2, 3)))
    for la in (log_a, log_a[..., 0]):
        assert rel(f(q, k, v, la, "xla"), f(q, k, v, la, "scan")) < 1e-4
        grads = loss(q, k, v, la)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    qn, kn, eta = _l2n(q), _l2n(k), jnp.ones((B, t, H))
    args = (qn, kn, v, eta, log_a[..., 0])
    y_ref, s_ref = runner("delta_scalar", "scan")(args, None, None)
    y, s = runner("delta_scalar", "xla", 64)(args, None, None)
    assert rel(y, y_ref) < 1e-4 and rel(s, s_ref) < 1e-4


# --------------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANT_IDS)
def test_bf16_inputs(name):
    var = by_name[name]
    t = 64
    args16 = make_inputs(var, t, seed=1, dtype=jnp.bfloat16)
    args32 = tuple(None if a is None else a.astype(jnp.float32) for a in args16)
    s0 = make_state(var)
    y_ref, s_ref = runner(name, "scan")(args32, s0, None)
    y, s = runner(name, "xla", 32)(args16, s0, None)
    assert y.dtype == jnp.bfloat16
    assert s.dtype == jnp.float32
    assert rel(y.astype(jnp.float32), y_ref) < 1e-2
    assert rel(s, s_ref) < 1e-2


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@functools.cache
def grad_fn(name: str, impl: str, chunk_size: int):
    op = by_name[name].op

    def loss(args, s0, seg, py, ps):
        y, s = op(*args, initial_state=s0, segment_ids=seg, chunk_size=chunk_size, impl=impl)
        return jnp.sum(y * py) + jnp.sum(s * ps)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("name", VARIANT_IDS)
def test_gradients_match_scan(name):
    var = by_name[name]
    t = 40
    args = make_inputs(var, t, seed=2)
    s0 = make_state(var)
    seg = jnp.asarray([[0] * 11 + [1] * 29, [3] * 40])
    y, s = runner(name, "scan")(args, s0, seg)
    kp = jax.random.split(jax.random.PRNGKey(11), 2)
    py = jax.random.normal(kp[0], y.shape)
    ps = jax.random.normal(kp[1], s.shape)
    g_ref = grad_fn(name, "scan", 16)(args, s0, seg, py, ps)
    g_xla = grad_fn(name, "xla", 16)(args, s0, seg, py, ps)
    flat_ref = jax.tree_util.tree_leaves(g_ref)
    flat_xla = jax.tree_util.tree_leaves(g_xla)
    n_expected = sum(a is not None for a in args) + 1
    assert len(flat_ref) == len(flat_xla) == n_expected
    for a, b in zip(flat_xla, flat_ref, strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        assert np.linalg.norm(np.asarray(b)) > 0
        assert rel(a, b) < 1e-4


# --------------------------------------------------------------------------------------------
# split sequence, packed sequences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["scan", "xla"])
@pytest.mark.parametrize("name", VARIANT_IDS)
def test_split_sequence_carries_state(name, impl):
    var = by_name[name]
    t, cut = 50, 23
    args = make_inputs(var, t, seed=4)
    s0 = make_state(var)
    y_all, s_all = runner(name, impl, 16)(args, s0, None)
    first = tuple(None if a is None else a[:, :cut] for a in args)
    second = tuple(None if a is None else a[:, cut:] for a in args)
    y1, s1 = runner(name, impl, 16)(first, s0, None)
    y2, s2 = runner(name, impl, 16)(second, s1, None)
    assert rel(jnp.concatenate([y1, y2], axis=1), y_all) < 1e-5
    assert rel(s2, s_all) < 1e-5


# batch row 0: monotone ids; row 1: non-monotone ids with id 5 reused (must still reset)
PACKED_IDS = [[0] * 7 + [1] * 20 + [2] * 13, [5] * 7 + [2] * 20 + [5] * 13]


@pytest.mark.parametrize("impl", ["scan", "xla"])
@pytest.mark.parametrize("name", VARIANT_IDS)
def test_packed_equals_separate(name, impl):
    var = by_name[name]
    t = len(PACKED_IDS[0])
    args = make_inputs(var, t, seed=5)
    s0 = make_state(var)
    seg = jnp.asarray(PACKED_IDS, dtype=jnp.int32)
    y_packed, s_packed = runner(name, impl, 16)(args, s0, seg)

    bounds = [0, 7, 27, 40]
    ys = []
    for d in range(3):
        lo, hi = bounds[d], bounds[d + 1]
        doc = tuple(None if a is None else a[:, lo:hi] for a in args)
        y_d, s_d = runner(name, impl, 16)(doc, s0 if d == 0 else None, None)
        ys.append(y_d)
    assert rel(y_packed, jnp.concatenate(ys, axis=1)) < 1e-5
    assert rel(s_packed, s_d) < 1e-5


# --------------------------------------------------------------------------------------------
# errors and dispatch
# --------------------------------------------------------------------------------------------


def _ones(*shape):
    return jnp.ones(shape, jnp.float32)


def test_gla_shape_errors():
    q = _ones(2, 5, 4, 8)
    with pytest.raises(ValueError, match=r"gla: log_a has shape \(2,5,3\).*\(2,5,4,8\)"):
        gla(q, q, q, _ones(2, 5, 3))
    with pytest.raises(ValueError, match=r"gla: k has shape"):
        gla(q, _ones(2, 6, 4, 8), q)
    with pytest.raises(ValueError, match=r"gla: v has shape \(2,5,3,8\)"):
        gla(q, q, _ones(2, 5, 3, 8))
    with pytest.raises(ValueError, match=r"gla: q has shape \(2,5,4\)"):
        gla(_ones(2, 5, 4), q, q)
    with pytest.raises(ValueError, match=r"gla: chunk_size must be an integer >= 1, got 0"):
        gla(q, q, q, chunk_size=0)
    with pytest.raises(ValueError, match=r"gla: segment_ids has shape \(2,4\)"):
        gla(q, q, q, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"gla: initial_state has shape \(2,4,8\)"):
        gla(q, q, q, initial_state=_ones(2, 4, 8))
    with pytest.raises(ValueError, match=r"gla: sequence length T must be >= 1"):
        gla(q[:, :0], q[:, :0], q[:, :0])
    with pytest.raises(ValueError, match=r"gla_step: log_a has shape"):
        gla_step(q[:, 0], q[:, 0], q[:, 0], _ones(2, 3), None)


def test_delta_and_hgrn_shape_errors():
    q = _ones(2, 5, 4, 8)
    eta = _ones(2, 5, 4)
    with pytest.raises(ValueError, match=r"delta_rule: eta has shape \(2,5\)"):
        delta_rule(q, q, q, _ones(2, 5))
    with pytest.raises(ValueError, match=r"delta_rule: log_a has shape \(2,5,4,8\)"):
        delta_rule(q, q, q, eta, q)
    with pytest.raises(ValueError, match=r"delta_rule: segment_ids must be an integer"):
        delta_rule(q, q, q, eta, segment_ids=_ones(2, 5))
    with pytest.raises(ValueError, match=r"delta_rule_step: eta has shape"):
        delta_rule_step(q[:, 0], q[:, 0], q[:, 0], eta, None, None)
    with pytest.raises(ValueError, match=r"hgrn: log_a has shape \(2,5,4\)"):
        hgrn(q, q, eta)
    with pytest.raises(ValueError, match=r"hgrn: chunk_size"):
        hgrn(q, q, q, chunk_size=-3)
    with pytest.raises(ValueError, match=r"hgrn_step: state has shape"):
        hgrn_step(q[:, 0], q[:, 0], q[:, 0], _ones(2, 4, 7))


@pytest.mark.parametrize("name", ["hgrn"])
def test_impl_errors(name):
    var = by_name[name]
    args = make_inputs(var, 4)
    with pytest.raises(ValueError, match=r"unknown impl 'cuda'.*scan.*xla"):
        var.op(*args, impl="cuda")
    with pytest.raises(NotImplementedError, match=rf"{var.family}: .*'tpu'"):
        var.op(*args, impl="pallas_tpu")
    with pytest.raises(NotImplementedError, match=rf"{var.family}: .*'gpu'"):
        var.op(*args, impl="pallas_gpu")


def test_register_kernel_dispatch(monkeypatch):
    calls = []

    def fake(q, k, v, log_a, *, initial_state, segment_ids, chunk_size, scale):
        calls.append(chunk_size)
        return gla(
            q, k, v, log_a, initial_state=initial_state, segment_ids=segment_ids, impl="scan"
        )

    monkeypatch.setattr(pk.ops._common, "_REGISTRY", {})
    register_kernel("gla", "tpu", fake)
    args = make_inputs(by_name["gla_scalar"], 5)
    y, _ = gla(*args, impl="pallas_tpu", chunk_size=8)
    assert calls == [8]
    y_ref, _ = gla(*args, impl="scan")
    assert rel(y, y_ref) < 1e-6
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    gla(*args, impl="auto", chunk_size=4)
    assert calls == [8, 4]
    with pytest.raises(ValueError, match="unknown backend"):
        register_kernel("gla", "cpu", fake)
    with pytest.raises(ValueError, match="unknown op"):
        register_kernel("mamba", "tpu", fake)


@pytest.mark.parametrize("log_a", [False, True])
def test_delta_rule_repeated_keys_match_scan(log_a):
    """Keys that repeat inside a chunk make I + A ill-conditioned for a naive inverse: the
    chunked WY form must still equal the recurrence (two distinct unit keys, eta = 0.99)."""
    B, T, H, d = 1, 128, 2, 16
    ks = jax.random.split(jax.random.key(3), 4)
    base = jax.random.normal(ks[0], (2, H, d))
    base = base / jnp.linalg.norm(base, axis=-1, keepdims=True)
    k = base[jax.random.randint(ks[1], (B, T), 0, 2)]  # [B,T,H,d]
    q = jax.random.normal(ks[2], (B, T, H, d))
    v = jax.random.normal(ks[3], (B, T, H, d))
    eta = jnp.full((B, T, H), 0.99)
    la = jnp.full((B, T, H), -0.01) if log_a else None
    y_ref, s_ref = delta_rule(q, k, v, eta, la, impl="scan")
    y, s = delta_rule(q, k, v, eta, la, impl="xla", chunk_size=64)
    assert rel(y, y_ref) < 1e-4 and rel(s, s_ref) < 1e-4
