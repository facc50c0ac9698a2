"""Mixture-of-Memories: the packed (sort-and-pack, regime D) and masked (stacked heads) paths
both equal a token-by-token reference that routes and updates memories one token at a time;
a memory not routed to is untouched; the aux loss reaches the router; packed documents stay
separate in the LM; the train objective is NLL + aux, the eval loss pure NLL; a tiny model
trains with falling loss and logs the aux loss and per-memory load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_runs import TINY_DATA

from memzoo.config import load_config
from memzoo.layers.memory_layer import MemoryLayer
from memzoo.memories.mom import MixtureOfMemories, load_balance, route
from memzoo.models.lm import build_model
from memzoo.train.loop import train
from memzoo.train.metrics import read_metrics
from memzoo.train.step import lm_loss, loss_with_aux
from pallas_kernels import delta_rule_step

B, T, D, H, DK, DV = 2, 13, 16, 2, 4, 6


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def make_memory(shared=True, M=4, k=2, chunk=4):
    return MixtureOfMemories(
        d_model=D,
        num_heads=H,
        dk=DK,
        dv=DV,
        num_memories=M,
        top_k=k,
        shared_memory=shared,
        chunk_size=chunk,
        impl="xla",
        rngs=nnx.Rngs(3),
    )


def make_inputs(mem, seed=0):
    n = mem.num_kv
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (B, T, D))
    q = jax.random.normal(ks[1], (B, T, H, DK))
    k = jax.random.normal(ks[2], (B, T, n, H, DK))
    v = jax.random.normal(ks[3], (B, T, n, H, DV))
    return mem.features(x, q, k, v)


def reference(mem, q, k, v, gates, segment_ids=None):
    """One token at a time: route by the router probabilities (numpy top-k), renormalise,
    update only the routed memories (and the shared one) with delta_rule_step, read them."""
    M, kk, n = mem.num_memories, mem.top_k, mem.num_kv
    step = jax.jit(delta_rule_step)
    probs = np.asarray(gates["probs"])
    seg = None if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros((B, T, H, DV))
    for b in range(B):
        states = [jnp.zeros((1, H, DK, DV)) for _ in range(n)]
        for t in range(T):
            if seg is not None and t > 0 and seg[b, t] != seg[b, t - 1]:
                states = [jnp.zeros((1, H, DK, DV)) for _ in range(n)]
            order = np.argsort(-probs[b, t], kind="stable")[:kk]
            w = probs[b, t, order] / probs[b, t, order].sum()
            chosen = list(zip(order.tolist(), w.tolist(), strict=True))
            if mem.shared_memory:
                chosen.append((M, 1.0))
            for m, wm in chosen:
                y, states[m] = step(
                    q[b : b + 1, t],
                    k[b : b + 1, t, m],
                    v[b : b + 1, t, m],
                    gates["eta"][b : b + 1, t, m],
                    gates["log_a"][b : b + 1, t, m],
                    states[m],
                )
                out[b, t] += wm * np.asarray(y[0])
    return out


@pytest.mark.parametrize(("shared", "with_segments"), [(True, True), (False, False)])
def test_packed_and_masked_equal_token_by_token_reference(shared, with_segments):
    mem = make_memory(shared=shared)
    q, k, v, gates = make_inputs(mem, seed=int(shared) + 2 * int(with_segments))
    seg = None
    if with_segments:  # three documents; ids recur (1, 2, 1) to check boundaries, not ids
        seg = jnp.asarray([[1] * 4 + [2] * 5 + [1] * 4, [7] * 9 + [8] * 4], jnp.int32)
    ref = reference(mem, q, k, v, gates, seg)
    # jitted closures (the execution paths use no parameters, only static settings)
    packed = jax.jit(lambda *a: mem.parallel_packed(*a[:4], segment_ids=a[4]))(q, k, v, gates, seg)
    masked, _ = jax.jit(lambda *a: mem.parallel_masked(*a[:4], segment_ids=a[4]))(
        q, k, v, gates, seg
    )
    assert rel(packed, ref) < 1e-5
    assert rel(masked, ref) < 1e-5
    assert rel(packed, masked) < 1e-5


def test_unrouted_memory_is_neither_written_nor_decayed():
    mem = make_memory()
    q, k, v, gates = make_inputs(mem, seed=5)
    s0 = jax.random.normal(jax.random.key(9), (B, mem.num_kv * H, DK, DV))
    _, s1 = mem.step(q[:, 0], k[:, 0], v[:, 0], {n: g[:, 0] for n, g in gates.items()}, s0)
    routed = np.asarray(gates["routed"][:, 0])  # [B, n]
    s0 = np.asarray(s0).reshape(B, mem.num_kv, H, DK, DV)
    s1 = np.asarray(s1).reshape(B, mem.num_kv, H, DK, DV)
    for b in range(B):
        for m in range(mem.num_kv):
            same = np.array_equal(s0[b, m], s1[b, m])
            assert same == (routed[b, m] == 0), (b, m)
    assert routed[:, :4].sum(-1).tolist() == [2, 2] and routed[:, 4].tolist() == [1, 1]


def test_route_and_load_balance():
    probs = jnp.asarray([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.1, 0.4]])
    idx, w, dense = route(probs, 2)
    np.testing.assert_allclose(np.asarray(dense), [[0, 0.625, 0.375, 0], [0.5, 0, 0, 0.5]])
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
    aux, f = load_balance(probs, idx, 4)
    np.testing.assert_allclose(np.asarray(f), [0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(float(aux), 4 * np.sum(0.25 * np.asarray(probs).mean(0)))


def test_aux_loss_gradient_reaches_router():
    layer = MemoryLayer("mom", d_model=D, num_heads=H, impl="scan", rngs=nnx.Rngs(0))
    gd, st = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (B, T, D))

    def aux_only(st):
        _, inter = nnx.capture(nnx.merge(gd, st), nnx.Intermediate)(x)
        (aux,) = inter["memory"]["aux_loss"].get_value()
        return aux

    aux, grads = jax.jit(jax.value_and_grad(aux_only))(st)
    assert float(aux) > 0
    g_router = grads["memory"]["router"]["kernel"].get_value()
    assert float(jnp.sum(jnp.abs(g_router))) > 0
    # outside nnx.capture nothing is sown (the module is not mutated)
    layer(x)
    assert not jax.tree.leaves(nnx.state(layer, nnx.Intermediate))


def tiny(*overrides):
    base = ["model=mom", "model.vocab_size=61", "model.d_model=32", "model.num_heads=2"]
    return load_config(None, base + ["model.n_layers=1", "model.chunk_size=8", *overrides]).model


def test_lm_packed_documents_stay_separate():
    # (prefill + decode == full forward for mom runs in tests/memzoo/models/test_lm.py)
    model = build_model(tiny(), seed=1)
    gd, st = nnx.split(model)
    f = jax.jit(lambda st, t, s: nnx.merge(gd, st)(t, segment_ids=s)[0])
    ka, kb, kc = jax.random.split(jax.random.key(0), 3)
    a, a2 = (jax.random.randint(key, (2, 8), 0, 61) for key in (ka, kc))
    b = jax.random.randint(kb, (2, 11), 0, 61)
    seg = jnp.asarray([[1] * 8 + [2] * 11] * 2, jnp.int32)
    one = jnp.ones((2, 19), jnp.int32)
    packed = f(st, jnp.concatenate([a, b], 1), seg)
    # the second document does not see the first (same shape: one compile)
    other = f(st, jnp.concatenate([a2, b], 1), seg)
    assert rel(packed[:, 8:], other[:, 8:]) < 1e-5
    # ... and equals the document alone (as the prefix of a single-document sequence)
    b_alone = f(st, jnp.concatenate([b, a], 1), one)[:, :11]
    assert rel(packed[:, 8:], b_alone) < 1e-4
    a_alone = f(st, jnp.concatenate([a, b], 1), one)[:, :8]
    assert rel(packed[:, :8], a_alone) < 1e-5


def test_train_step_adds_aux_loss_and_eval_stays_nll():
    model = build_model(tiny(), seed=2)
    gd, st = nnx.split(model)
    toks = jax.random.randint(jax.random.key(3), (2, 17), 0, 61)
    batch = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "segment_ids": jnp.ones((2, 16), jnp.int32),
        "loss_mask": jnp.ones((2, 16), jnp.int32),
    }
    nll, n = jax.jit(lambda st, b: lm_loss(nnx.merge(gd, st), b))(st, batch)
    total, (n2, extras) = jax.jit(lambda st, b: loss_with_aux(nnx.merge(gd, st), b))(st, batch)
    assert float(n) == float(n2) == 32
    assert extras["mom_load"].shape == (1, 4)
    np.testing.assert_allclose(np.asarray(extras["mom_load"]).sum(-1), 1.0, rtol=1e-6)
    aux = float(extras["aux_loss"])
    assert 0 < aux < 1e-2
    np.testing.assert_allclose(float(total), float(nll) + aux * 32, rtol=1e-6)


def test_tiny_mom_trains_and_logs_aux_loss(tmp_path):
    cfg = load_config(
        None,
        [
            "model=mom",
            "model.d_model=32",
            "model.n_layers=2",
            "model.num_heads=2",
            "model.chunk_size=16",
            *TINY_DATA,
            "train.log_every=1",
            "optim.warmup_steps=2",
            "steps=10",
            f"output_dir={tmp_path}",
        ],
    )
    summary = train(cfg)
    losses = summary["losses"]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    train_recs = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert all("aux_loss" in r and r["aux_loss"] > 0 for r in train_recs)
    assert all(np.allclose(np.sum(r["mom_load"], -1), 1.0) for r in train_recs)
    assert np.isfinite(summary["heldout_loss"])
