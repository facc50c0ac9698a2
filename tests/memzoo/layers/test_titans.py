"""Titans MAC / MAG / MAL mixers: prefill + token-by-token decode equals the full forward, a
sequence split in two with the cache carried equals the whole (MAC: also the segment-parallel
path with a concrete position), causality, packed documents equal each alone, and a tiny LM
with all three kinds has a finite loss and finite, nonzero gradients in every parameter.

The layer tests use a linear memory and the scan path of the op, which compile fastest: the
memory itself is covered by the memory contract suite, here only the composition is tested.
Segment 8 and chunk 4 make 13 / 21 tokens cross several segments and chunks."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.config import ModelConfig, load_config
from memzoo.layers.titans import TITANS_KINDS, TitansMAC, TitansMAG, TitansMAL, build_titans
from memzoo.models.lm import build_model

SMALL = dict(
    d_model=32,
    num_heads=2,
    attn_heads=2,
    n_layers=1,
    chunk_size=4,
    titans_segment=8,
    titans_persistent=2,
    attn_window=5,
    gm_arch="linear",
    gm_residual=False,
    gm_layer_norm=False,
    impl="scan",
)
# Cheaper XLA compiles on CPU (the tests compile ~20 small programs; fp32 results unchanged).
FAST = (
    {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    if jax.default_backend() == "cpu"
    else None
)
jit = functools.partial(jax.jit, compiler_options=FAST)
LENGTH = {"titans_mac": 21, "titans_mag": 13, "titans_mal": 13}  # MAC: 2 full segments + 5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.cache
def setup(kind):
    """The mixer and jitted calls, shared by the tests (each shape compiles once)."""
    mod = build_titans(
        kind,
        ModelConfig(**SMALL),
        0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )
    gd, st = nnx.split(mod)
    T = LENGTH[kind]
    x = jax.random.normal(jax.random.key(1), (2, T, 32))
    full = jit(lambda st, x: nnx.merge(gd, st)(x)[0])
    return SimpleNamespace(
        mod=mod,
        st=st,
        T=T,
        x=x,
        full=full,
        ref=full(st, x),
        # with a cache: the position traced (MAC runs token by token)
        run=jit(lambda st, x, c: nnx.merge(gd, st)(x, cache=c)),
        # the position a python int (MAC runs segment-parallel)
        run_at=jit(
            lambda st, x, c, pos: nnx.merge(gd, st)(x, cache=dict(c, pos=pos)),
            static_argnums=3,
        ),
        packed=jit(lambda st, x, s: nnx.merge(gd, st)(x, segment_ids=s)[0]),
    )


@pytest.mark.parametrize("kind", TITANS_KINDS)
def test_prefill_then_decode_equals_full_forward(kind):
    s = setup(kind)
    cls = {"titans_mac": TitansMAC, "titans_mag": TitansMAG, "titans_mal": TitansMAL}[kind]
    assert isinstance(s.mod, cls)
    assert s.ref.shape == (2, s.T, 32) and np.isfinite(np.asarray(s.ref)).all()
    assert float(jnp.abs(s.ref).max()) > 0
    y, cache = s.run(s.st, s.x[:, :5], s.mod.init_cache(2, s.T))
    outs = [y]
    for t in range(5, s.T):
        y, cache = s.run(s.st, s.x[:, t : t + 1], cache)
        outs.append(y)
    assert rel(jnp.concatenate(outs, 1), s.ref) < 1e-4
    assert int(cache["pos"] if kind == "titans_mac" else cache["attn"]["pos"]) == s.T


@pytest.mark.parametrize("kind", TITANS_KINDS)
def test_split_with_cache_equals_whole(kind):
    s = setup(kind)
    c0 = s.mod.init_cache(2, s.T)
    if kind == "titans_mac":
        # concrete positions: a partial segment (3..7), then 5 + one full segment + a tail of 5
        y1, c = s.run_at(s.st, s.x[:, :3], c0, 0)
        y2, c = s.run_at(s.st, s.x[:, 3:], c, 3)
        assert int(c["pos"]) == s.T
    else:
        y1, c = s.run(s.st, s.x[:, :5], c0)
        y2, c = s.run(s.st, s.x[:, 5:], c)
    assert rel(jnp.concatenate([y1, y2], 1), s.ref) < 1e-4


@pytest.mark.parametrize("kind", TITANS_KINDS)
def test_causal(kind):
    s = setup(kind)
    for t in (2, 9):  # inside the first segment, and in the second
        x2 = s.x.at[:, t + 1].add(1.0)
        y2 = s.full(s.st, x2)
        np.testing.assert_array_equal(np.asarray(y2[:, : t + 1]), np.asarray(s.ref[:, : t + 1]))
        assert float(jnp.abs(y2[:, t + 1] - s.ref[:, t + 1]).max()) > 0


@pytest.mark.parametrize("kind", TITANS_KINDS)
def test_packed_documents_equal_each_alone(kind):
    """Documents of 8 (MAG/MAL) or 16 (MAC) then 5 tokens, the first on the segment and chunk
    grids: packed == each alone (the first alone is a prefix of the full forward)."""
    s = setup(kind)
    n1 = s.T - 5
    seg = jnp.asarray([[7] * n1 + [3] * 5, [1] * n1 + [2] * 5], jnp.int32)
    packed = s.packed(s.st, s.x, seg)
    second, _ = s.run(s.st, s.x[:, n1:], s.mod.init_cache(2, s.T))
    assert rel(packed[:, :n1], s.ref[:, :n1]) < 1e-5
    assert rel(packed[:, n1:], second) < 1e-4
    # one document throughout equals no segment ids
    assert rel(s.packed(s.st, s.x, jnp.ones((2, s.T), jnp.int32)), s.ref) < 1e-5


def test_mac_documents_off_the_grid_do_not_interact():
    s = setup("titans_mac")
    seg = jnp.asarray([[0] * 5 + [1] * (s.T - 5)] * 2, jnp.int32)
    a = s.packed(s.st, s.x, seg)
    b = s.packed(s.st, s.x.at[:, :5].multiply(-2.0), seg)
    np.testing.assert_array_equal(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))
    assert float(jnp.abs(a[:, :5] - b[:, :5]).max()) > 0


def test_lm_with_all_three_kinds_has_finite_nonzero_gradients():
    over = [f"model.{k}={v}" for k, v in SMALL.items() if k != "n_layers"]
    cfg = load_config(
        None,
        over
        + ["model.vocab_size=61", "model.n_layers=3", "model.pattern=" + ",".join(TITANS_KINDS)],
    ).model
    model = build_model(cfg, seed=0)
    assert [type(b.mixer) for b in model.blocks] == [TitansMAC, TitansMAG, TitansMAL]
    gd, st = nnx.split(model)
    toks = jax.random.randint(jax.random.key(0), (2, 13), 0, 61)

    def loss(st):
        logits, _ = nnx.merge(gd, st)(toks[:, :-1])
        lse = jax.nn.logsumexp(logits, -1)
        return jnp.mean(lse - jnp.take_along_axis(logits, toks[:, 1:, None], -1)[..., 0])

    value, grads = jit(jax.value_and_grad(loss))(st)
    assert np.isfinite(float(value)) and abs(float(value) - np.log(61)) < 0.5
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        assert np.isfinite(np.asarray(g)).all(), name
        assert float(jnp.abs(g).max()) > 0, f"zero gradient: {name}"


@pytest.mark.parametrize("kind", TITANS_KINDS)
def test_model_configs_resolve(kind):
    cfg = load_config(None, [f"model={kind}", "model.vocab_size=61"]).model
    assert cfg.memory == kind and cfg.pattern == "M"
    assert cfg.titans_segment == 64 and cfg.titans_persistent == 4
    big = load_config(None, [f"model={kind}:170m", "model.vocab_size=61"]).model
    assert big.titans_segment == 512 and big.titans_persistent == 16


def test_mac_detach_keeps_the_forward_and_stops_the_gradient_across_segments():
    """model.titans_detach: the same output; the loss on the second segment has no gradient
    into the first segment's tokens through the carried memory state (the short conv is off
    here: its K-1 tokens of history are the one other path across a segment boundary), while
    the memory's initial weights still get one."""
    s = setup("titans_mac")

    def build(detach):
        cfg = ModelConfig(**SMALL, titans_detach=detach, use_short_conv=False)
        mod = build_titans(
            "titans_mac", cfg, 0, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
        )
        gd, st = nnx.split(mod)
        out = jit(lambda st, x: nnx.merge(gd, st)(x)[0])(st, s.x)

        def seg2(st, x):  # a loss on the second segment's outputs only
            return jnp.sum(nnx.merge(gd, st)(x)[0][:, 8:16] ** 2)

        return mod, out, jit(jax.grad(seg2, argnums=(0, 1)))(st, s.x)

    det, out, (g_st, g_x) = build(True)
    plain, ref, (_, g_x0) = build(False)
    assert det.detach and not plain.detach and not s.mod.detach
    assert rel(out, ref) < 1e-6
    assert float(jnp.abs(g_x0[:, :8]).max()) > 0  # the carried state's path, without detach
    assert float(jnp.abs(g_x[:, :8]).max()) == 0.0
    assert float(jnp.abs(g_x[:, 8:16]).max()) > 0
    grads = {"/".join(map(str, p)): v.get_value() for p, v in g_st.flat_state()}
    init = [k for k in grads if k.startswith("mem/memory/")]
    assert init and len(init) == len(nnx.state(det.mem.memory, nnx.Param).flat_state())
    assert all(float(jnp.abs(grads[k]).max()) > 0 for k in init), init
