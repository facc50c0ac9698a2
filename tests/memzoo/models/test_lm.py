"""The LM: prefill + token-by-token decode equals one full forward, for a pure model of every
registered memory, a hybrid with attention and a pure Transformer; generation; errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiers import tier_marks

from memzoo.config import ConfigError, load_config
from memzoo.generate import generate, sample_token
from memzoo.memories import memory_names
from memzoo.memories.gradient import PRESETS
from memzoo.models.lm import build_model, count_params, set_rope_scale

V = 61


def tiny(*overrides):
    base = [
        "model.vocab_size=61",
        "model.d_model=32",
        "model.num_heads=2",
        "model.attn_heads=2",
        "model.n_layers=2",
        "model.chunk_size=8",
    ]
    return load_config(None, base + list(overrides)).model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


CASES = [(f"model.memory={m}", "model.pattern=M") for m in memory_names()] + [
    ("model.memory=gated_deltanet", "model.pattern=MA"),
    ("model.memory=gla", "model.pattern=AM", "model.attn_kv_heads=1", "model.attn_window=5"),
    ("model.pattern=A",),
]


def _case(overrides):  # non-core gradient presets in the full tier (tests/support/tiers.py)
    memory = next((o.split("=")[1] for o in overrides if o.startswith("model.memory=")), "")
    name = "-".join(x.split("=")[1] for x in overrides)
    return pytest.param(overrides, id=name, marks=tier_marks(memory, heavy=PRESETS))


@pytest.mark.parametrize("overrides", [_case(c) for c in CASES])
def test_prefill_then_decode_equals_full_forward(overrides):
    model = build_model(tiny(*overrides), seed=1)
    gd, st = nnx.split(model)
    run = jax.jit(lambda st, t, c: nnx.merge(gd, st)(t, cache=c))
    full = jax.jit(lambda st, t: nnx.merge(gd, st)(t)[0])
    toks = jax.random.randint(jax.random.key(0), (2, 23), 0, V)
    ref = full(st, toks)
    logits, cache = run(st, toks[:, :10], model.init_cache(2, 23))
    outs = [logits]
    for t in range(10, 23):
        logits, cache = run(st, toks[:, t : t + 1], cache)
        outs.append(logits)
    assert rel(jnp.concatenate(outs, 1), ref) < 1e-4


def test_packed_documents_do_not_interact():
    model = build_model(tiny("model.pattern=MA", "model.memory=gated_deltanet"), seed=2)
    gd, st = nnx.split(model)
    f = jax.jit(lambda st, t, s: nnx.merge(gd, st)(t, segment_ids=s)[0])
    a = jax.random.randint(jax.random.key(1), (1, 11), 0, V)
    b = jax.random.randint(jax.random.key(2), (1, 14), 0, V)
    seg = jnp.asarray([[1] * 11 + [2] * 14], jnp.int32)
    packed = f(st, jnp.concatenate([a, b], 1), seg)
    alone = jnp.concatenate(
        [f(st, a, jnp.ones((1, 11), jnp.int32)), f(st, b, jnp.ones((1, 14), jnp.int32))], 1
    )
    assert rel(packed, alone) < 1e-4


def test_greedy_generation_matches_argmax_of_full_forward():
    model = build_model(tiny("model.pattern=MA", "model.memory=gated_deltanet"), seed=3)
    prompt = jnp.asarray([[1, 2, 3, 4, 5], [7, 7, 7, 7, 7]], jnp.int32)
    out = generate(model, prompt, 6)
    assert out.shape == (2, 11)
    assert np.array_equal(np.asarray(out[:, :5]), np.asarray(prompt))
    logits, _ = model(out)
    # each generated token is the argmax given everything before it
    np.testing.assert_array_equal(
        np.asarray(jnp.argmax(logits[:, 4:-1], -1)), np.asarray(out[:, 5:])
    )


def test_sampling_respects_top_k_and_seed():
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4]] * 500))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    toks = sample_token(logits, keys, temperature=1.0, top_k=2)
    assert set(np.asarray(toks).tolist()) <= {2, 3}
    assert len(set(np.asarray(toks).tolist())) == 2
    model = build_model(tiny(), seed=4)
    p = jnp.asarray([[3, 1, 4]], jnp.int32)
    a = generate(model, p, 8, temperature=1.0, top_k=5, seed=7)
    b = generate(model, p, 8, temperature=1.0, top_k=5, seed=7)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_compute_keeps_fp32_params():
    model = build_model(tiny("model.pattern=MA"), seed=5, precision="bf16")
    params = nnx.state(model, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits, _ = model(jnp.zeros((1, 9), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert count_params(model) > 0


def test_untied_head_has_more_params():
    tied = count_params(build_model(tiny(), seed=0))
    untied = count_params(build_model(tiny("model.tie_embeddings=false"), seed=0))
    assert untied - tied == V * 32


@pytest.mark.parametrize("pattern", ["MA", pytest.param("titans_mag", marks=pytest.mark.slow)])
def test_rope_scale_from_config_and_set_on_a_built_model(pattern):
    kind = ["model.pattern=MA"] if pattern == "MA" else [f"model.memory={pattern}"]
    prompt = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]], jnp.int32)
    model = build_model(tiny(*kind), seed=2)
    scaled = build_model(tiny(*kind, "model.rope_scale=0.25"), seed=2)
    plain, want = np.asarray(model(prompt)[0]), np.asarray(scaled(prompt)[0])
    assert rel(plain, want) > 1e-4
    assert set_rope_scale(model, 0.25) >= 1
    np.testing.assert_allclose(np.asarray(model(prompt)[0]), want, rtol=1e-6, atol=1e-6)
    set_rope_scale(model, 1.0)
    if pattern == "MA":  # the scale is in the graph: jitted generation recompiles for it
        before = np.asarray(generate(model, prompt, 8))
        assert set_rope_scale(model, 0.25) == 1
        np.testing.assert_array_equal(
            np.asarray(generate(model, prompt, 8)), np.asarray(generate(scaled, prompt, 8))
        )
        set_rope_scale(model, 1.0)
        np.testing.assert_array_equal(np.asarray(generate(model, prompt, 8)), before)
    with pytest.raises(ValueError, match="rope scale must be > 0"):
        set_rope_scale(model, 0.0)
    with pytest.raises(ConfigError, match="model.rope_scale must be > 0"):
        tiny("model.rope_scale=-1")


def test_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown memory 'titanz'"):
        tiny("model.memory=titanz")
    with pytest.raises(ConfigError, match="model.num_heads=3 does not divide model.d_model=32"):
        tiny("model.num_heads=3")
    with pytest.raises(ValueError, match="vocab_size must be set"):
        build_model(load_config(None, []).model)
    model = build_model(tiny(), seed=0)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, time\]"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="prompt must be int"):
        generate(model, jnp.zeros((1, 0), jnp.int32), 3)


@pytest.mark.slow  # 1-2 min per memory on 2 cores; CI runs it in `make test-full`
@pytest.mark.parametrize("memory", ["gated_deltanet", "titans_mac"])
def test_remat_gives_the_same_loss_and_gradients(memory):
    over = [f"model={memory}", "model.d_model=32", "model.n_layers=2", "model.vocab_size=264"]
    toks = jnp.arange(2 * 40).reshape(2, 40) % 200

    def loss(m):
        logits, _ = m(toks)
        return jnp.mean(logits**2)

    def merged_loss(graphdef, state):
        return loss(nnx.merge(graphdef, state))

    res = []
    for remat in (False, True):
        cfg = load_config("configs/train/quickstart.yaml", [*over, f"model.remat={remat}"])
        model = build_model(cfg.model)
        jaxpr = str(
            jax.make_jaxpr(functools.partial(merged_loss, nnx.graphdef(model)))(nnx.state(model))
        )
        n_remat = jaxpr.count("checkpoint[") + jaxpr.count("remat")
        val, grads = nnx.value_and_grad(loss)(model)
        res.append((val, jax.tree.leaves(nnx.state(grads)), n_remat))
    assert res[1][2] >= res[0][2] + 2  # one more checkpoint per block
    assert float(res[0][0]) == pytest.approx(float(res[1][0]), rel=1e-6)
    for a, b in zip(res[0][1], res[1][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
