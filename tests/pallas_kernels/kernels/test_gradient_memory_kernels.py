"""Pallas kernels for ``gradient_memory`` with a linear memory (regime C): interpret-mode
numerics against impl="xla" (outputs, the final state dict, gradients of every input including
the reset weights and every leaf of the initial state), the hand-written chunk backward against
autodiff of the chunk forward, lowering for TPU (Mosaic) and GPU (Triton) from this host, real
TPU compiles (``tpu_compile``) and the supports / error paths.

Interpret mode is slow (the cost is compilation), so the default suite runs one combined case
per backend (momentum, decay, packed documents, a carried state that starts mid-chunk, odd T);
every loss x gate combination, bf16, and dv blocks are marked ``slow``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import packed_ids, rel

import pallas_kernels as pk
from pallas_kernels.aot import compile_for_tpu, export_for
from pallas_kernels.kernels import _gradient_memory_math as gm
from pallas_kernels.kernels import gradient_memory_gpu, gradient_memory_tpu
from pallas_kernels.ops.gradient_memory import GradientMemorySpec, MemoryArch

B, H, T, D = 2, 2, 37, 16
CHUNK = 16
PREFIX = 5  # the carried state sits 5 tokens into a chunk
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
LOSSES = ("l2", "dot", "lp", "huber")


def make_inputs(loss="l2", t=T, d=D, dv=None, dtype=jnp.float32, seed=0, b=B, h=H):
    dv = d if dv is None else dv
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)

    def unit(key, n):
        x = jax.random.normal(key, (b, t, h, n))
        return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

    z = jax.random.normal(ks[3], (b, t, h))
    return {
        "q": unit(ks[0], d),
        "k": unit(ks[1], d),
        "v": jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype),
        # lp (p = 3) grows fast: a smaller step keeps the memory bounded
        "eta": (0.1 if loss == "lp" else 0.5) * jax.nn.sigmoid(z),
        "mu": jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)) + 1.0),
        "log_a": jax.nn.log_sigmoid(jax.random.normal(ks[5], (b, t, h)) + 3.0),
        "delta": 0.3 + jax.nn.softplus(jax.random.normal(ks[6], (b, t, h))),
        "gamma": jax.nn.sigmoid(z + 2.0),  # the Omega weight of each token (window 1)
        "params": {"W": 0.1 * jax.random.normal(ks[7], (h, d, dv))},
    }


def _call(impl, loss, x, state, seg, chunk, momentum, decay, block_v=None):
    kw = {"interpret": True} if impl.startswith("pallas") else {}
    return pk.gradient_memory(
        x["q"], x["k"], x["v"], x["eta"], spec=GradientMemorySpec(loss=loss),
        params=x["params"], mu=x["mu"] if momentum else None,
        log_a=x["log_a"] if decay else None, gamma=x["gamma"],
        delta=x["delta"] if loss == "huber" else None,
        initial_state=state, segment_ids=seg, chunk_size=chunk, impl=impl, block_v=block_v, **kw,
    )  # fmt: skip


def _weights(shape, phase):
    n = int(np.prod(shape))
    return jnp.cos(jnp.arange(n, dtype=jnp.float32) * 0.37 + phase).reshape(shape)


def _runner(impl, loss, seg, chunk, momentum, decay, block_v=None):
    def objective(x, state):
        y, st = _call(impl, loss, x, state, seg, chunk, momentum, decay, block_v)
        out = jnp.sum(y.astype(jnp.float32) * _weights(y.shape, 0.0))
        for i, leaf in enumerate(jax.tree.leaves({n: s for n, s in st.items() if n != "pos"})):
            out = out + jnp.sum(leaf * _weights(leaf.shape, 1.0 + i))
        return out, (y, st)

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True, allow_int=True))


def _floats(tree):
    return [
        (jax.tree_util.keystr(p), x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]


def check_against_xla(
    impl,
    loss,
    *,
    momentum=True,
    decay=True,
    seg=True,
    carried=True,
    dtype=jnp.float32,
    t=T,
    dv=None,
    block_v=None,
    chunk=CHUNK,
):
    x = make_inputs(loss, t=t + PREFIX, dv=dv, dtype=dtype)
    head = {n: (a if n == "params" else a[:, :PREFIX]) for n, a in x.items()}
    rest = {n: (a if n == "params" else a[:, PREFIX:]) for n, a in x.items()}
    state = None
    if carried:  # a state from a previous call, 5 tokens into a chunk (anchor != W)
        _, state = _call("xla", loss, head, None, None, chunk, momentum, decay)
    ids = packed_ids(B, t, (7, 22)) if seg else None
    (_, (yk, sk)), gk = _runner(impl, loss, ids, chunk, momentum, decay, block_v)(rest, state)
    (_, (yx, sx)), gx = _runner("xla", loss, ids, chunk, momentum, decay)(rest, state)
    tol = TOL[dtype]
    assert yk.dtype == yx.dtype == dtype and yk.shape == yx.shape
    assert rel(yk, yx) < tol, ("y", rel(yk, yx))
    assert sorted(sk) == sorted(sx) and bool(jnp.all(sk["pos"] == sx["pos"]))
    for name in sx:
        if name != "pos":
            assert sk[name]["W"].dtype == jnp.float32
            assert rel(sk[name], sx[name]) < tol, (name, rel(sk[name], sx[name]))
    fk, fx = _floats(gk), _floats(gx)
    assert [p for p, _ in fk] == [p for p, _ in fx]
    errs = {"y": rel(yk, yx), "state": rel(
        {n: s for n, s in sk.items() if n != "pos"}, {n: s for n, s in sx.items() if n != "pos"}
    )}  # fmt: skip
    for (path, a), (_, b) in zip(fk, fx, strict=True):
        assert a.dtype == b.dtype, path
        assert bool(jnp.all(jnp.isfinite(a))), path
        errs[path] = rel(a, b)
        assert errs[path] < 2 * tol, (path, errs[path])
        # every input that reaches the loss has a non-zero gradient (no vacuous comparison)
        unused = ("delta" in path and loss != "huber") or ("params" in path and carried and not seg)
        unused = unused or ("mu" in path and not momentum) or ("log_a" in path and not decay)
        unused = unused or ("anchor" in path and loss == "dot")  # dot never reads the anchor
        assert unused or float(jnp.linalg.norm(b.astype(jnp.float32))) > 0, path
    return errs


# --------------------------------------------------------------------------------------------
# Interpret-mode numerics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl,loss", [("pallas_tpu", "l2"), ("pallas_gpu", "huber")], ids=["tpu-l2", "gpu-huber"]
)
def test_matches_xla(impl, loss):
    """Momentum + decay, packed documents, a carried mid-chunk state, odd T."""
    check_against_xla(impl, loss)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("momentum,decay", [(True, True), (False, True), (False, False)])
def test_matches_xla_full(impl, loss, momentum, decay):
    check_against_xla(impl, loss, momentum=momentum, decay=decay, seg=loss != "dot")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_fresh_state_bf16(impl):
    check_against_xla(impl, "l2", seg=False, carried=False, dtype=jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("impl,dv,block_v", [("pallas_gpu", 32, 16), ("pallas_tpu", 256, 128)])
def test_value_blocks(impl, dv, block_v):
    check_against_xla(impl, "lp", dv=dv, block_v=block_v, t=20)


@pytest.mark.slow
def test_tpu_chunk_not_a_power_of_two():
    check_against_xla("pallas_tpu", "l2", chunk=12, t=30)


# --------------------------------------------------------------------------------------------
# The chunk math alone: hand-written backward == autodiff of the forward (pure jnp)
# --------------------------------------------------------------------------------------------


def _core_inputs(loss, momentum, seg, seed=3):
    n, C, dk, dv = 3, 8, 8, 8
    cfg = gm.Config(loss, 3.0, 1e-6, momentum, seg, C, n, dk, dv, dv)
    ks = jax.random.split(jax.random.PRNGKey(seed), 12)
    shp = (1, 2, n, C)
    sc = jax.random.uniform(ks[0], shp + (gm.NS,), minval=0.2, maxval=1.0)
    sc = sc.at[..., gm.FS].set((jax.random.uniform(ks[1], shp) > 0.3).astype(jnp.float32))
    sc = sc.at[..., gm.LAST].set(jnp.zeros(shp).at[:, :, 1].set(1.0))
    st = [0.3 * jax.random.normal(kk, (1, 2, dk, dv)) for kk in ks[2:6]]
    args = (
        jax.random.normal(ks[6], shp + (dk,)),
        jax.random.normal(ks[7], shp + (dk,)),
        jax.random.normal(ks[8], shp + (dv,)),
        sc,
        0.3 * jax.random.normal(ks[9], shp + (C,)),
        st[0],
        st[1],
        st[2] if momentum else None,
        st[3] if seg else None,
    )
    return cfg, args


@pytest.mark.parametrize("loss", LOSSES)
def test_chunk_backward_matches_autodiff(loss):
    """reference_bwd (the kernels' chunk_backward in a reverse scan) == jax.vjp of
    reference_fwd for every core input, with momentum and documents."""
    cfg, args = _core_inputs(loss, True, True)

    @jax.jit
    def both(args, cts):
        def f(*a):
            return gm.reference_fwd(cfg, *a, save=False)[:4]

        _, vjp = jax.vjp(f, *args)
        auto = vjp(cts)
        _, _, _, _, Ss, Zs = gm.reference_fwd(cfg, *args, save=True)
        q, k, v, sc, gc, A0, anc0, Z0, T0 = args
        mine = gm.reference_bwd(cfg, q, k, v, sc, gc, Ss, Zs, anc0, T0, *cts_order(cts))
        return auto, mine

    def cts_order(cts):  # (dy, dA, dao, dZ) -> (dy, dA, dZ, dao)
        dy, dA, dao, dZ = cts
        return dy, dA, dZ, dao

    outs = jax.eval_shape(lambda a: gm.reference_fwd(cfg, *a, save=False)[:4], args)
    cts = tuple(_weights(o.shape, i) for i, o in enumerate(outs))
    auto, mine = both(args, cts)
    # mine: (dq, dk, dv, dsc, dgc, dA0, danc0, dZ0, dT0), the order of the core's inputs
    for i, (a, m) in enumerate(zip(auto, mine, strict=True)):
        if i == 3:  # the flag slots (FS, LAST) are not differentiated by the kernels
            keep = [s for s in range(gm.NS) if s not in (gm.FS, gm.LAST)]
            a, m = a[..., keep], m[..., keep]
        if not (loss == "dot" and i == 6):  # the dot loss never reads the anchor
            assert float(jnp.linalg.norm(a)) > 0, i
        assert rel(m, a) < 1e-5, (i, rel(m, a))


# --------------------------------------------------------------------------------------------
# Lowering from this host (Mosaic TPU / Triton) and real TPU compiles
# --------------------------------------------------------------------------------------------


def _fns(impl, loss="l2"):
    def fwd(q, k, v, eta, mu, log_a, delta, seg):
        return pk.linear_memory(
            q, k, v, eta, mu=mu, log_a=log_a, loss=loss, chunk_size=64, segment_ids=seg,
            impl=impl, **({"delta": delta} if loss == "huber" else {}),
        )  # fmt: skip

    def bwd(q, k, v, eta, mu, log_a, delta, seg):
        def obj(x):
            y, st = fwd(*x, seg)
            return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(st["A"]["W"] ** 2)

        return jax.grad(obj)((q, k, v, eta, mu, log_a, delta))

    return fwd, bwd


def _specs(d, dtype, b=2, t=150, h=2):  # t=150: 3 chunks of 64, the last one partial
    def s(*shape, dt=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dt)

    x = s(b, t, h, d, dt=dtype)
    return (x, x, x, s(b, t, h), s(b, t, h), s(b, t, h), s(b, t, h), s(b, t, dt=jnp.int32))


def _export_check(platform, d, dtype, loss):
    impl = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    marker = "tpu_custom_call" if platform == "tpu" else "triton"
    for fn, calls in zip(_fns(impl, loss), (1, 3), strict=True):
        text = export_for(fn, *_specs(d, dtype), platform=platform).mlir_module()
        assert text.count(marker) >= calls  # fwd: 1 kernel; bwd: fwd + states + reverse sweep


@pytest.mark.parametrize(
    "platform,d,dtype",
    [
        ("tpu", 64, jnp.bfloat16),
        ("cuda", 128, jnp.float32),
        pytest.param("cuda", 64, jnp.bfloat16, marks=pytest.mark.slow),
        pytest.param("tpu", 128, jnp.float32, marks=pytest.mark.slow),
    ],
)
def test_export(platform, d, dtype):
    _export_check(platform, d, dtype, "l2")


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("d,dtype", [(64, jnp.float32), (128, jnp.bfloat16)])
@pytest.mark.parametrize("loss", ["dot", "lp", "huber"])
def test_export_full(platform, d, dtype, loss):
    _export_check(platform, d, dtype, loss)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_tpu_compile(topology, d):
    # other processes on this host may hold libtpu's lockfile; AOT compiles need no device
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    fwd, bwd = _fns("pallas_tpu")
    specs = _specs(d, jnp.bfloat16, b=4, t=512)  # one batch row per chip
    for name, fn in (("forward", fwd), ("backward", bwd)):
        compiled = compile_for_tpu(fn, *specs, topology=topology)
        mem = compiled.memory_analysis()
        assert mem is not None
        vmem = gradient_memory_tpu.vmem_bytes(d, d, seg=True, backward=name == "backward")
        print(
            f"\nTPU_COMPILE gradient_memory linear {topology} d={d} {name}: "
            f"temp={mem.temp_size_in_bytes} argument={mem.argument_size_in_bytes} "
            f"output={mem.output_size_in_bytes} code={mem.generated_code_size_in_bytes} "
            f"vmem_analytic={vmem}"
        )


# --------------------------------------------------------------------------------------------
# Supports, fallbacks and clear errors
# --------------------------------------------------------------------------------------------


def _supports_kw(spec, x, **over):
    kw = dict(
        spec=spec,
        params=None,
        mu=x["mu"],
        log_a=x["log_a"],
        gamma=None,
        delta=None,
        initial_state=None,
        segment_ids=None,
        chunk_size=16,
    )
    kw.update(over)
    return kw


def test_supports_reasons():
    x = make_inputs(t=8)
    args = (x["q"], x["k"], x["v"], x["eta"])
    cases = {  # (the 2-layer mlp memory has its own kernels: test_gradient_memory_mlp_kernels)
        "arch 'gated_mlp'": GradientMemorySpec(arch=MemoryArch("gated_mlp")),
        "depth 3": GradientMemorySpec(arch=MemoryArch("mlp", depth=3)),
        "normalizer 'lq'": GradientMemorySpec(normalizer="lq"),
        "Muon": GradientMemorySpec(muon=True),
        "window 3": GradientMemorySpec(window=3),
    }
    for mod in (gradient_memory_tpu, gradient_memory_gpu):
        assert mod.supports(*args, **_supports_kw(GradientMemorySpec(), x)) is None
        for want, spec in cases.items():
            assert want in mod.supports(*args, **_supports_kw(spec, x)), want
        channel = jnp.ones((B, 8, H, D))
        why = mod.supports(*args, **_supports_kw(GradientMemorySpec(), x, log_a=channel))
        assert "log_a" in why and "per-head" in why
    x48 = make_inputs(t=8, d=48)
    args48 = (x48["q"], x48["k"], x48["v"], x48["eta"])
    assert gradient_memory_tpu.supports(*args48, **_supports_kw(GradientMemorySpec(), x48)) is None
    why = gradient_memory_gpu.supports(*args48, **_supports_kw(GradientMemorySpec(), x48))
    assert "dk=48" in why
    why = gradient_memory_gpu.supports(*args, **_supports_kw(GradientMemorySpec(), x, chunk_size=8))
    assert "chunk_size=8" in why


def test_unsupported_calls_raise_and_auto_falls_back():
    x = make_inputs(t=8)
    with pytest.raises(NotImplementedError, match=r"pallas_tpu.*Muon"):
        pk.gradient_memory(
            x["q"], x["k"], x["v"], x["eta"], spec=GradientMemorySpec(muon=True), impl="pallas_tpu"
        )
    with pytest.raises(NotImplementedError, match=r"pallas_gpu.*chunk_size=4"):
        pk.linear_memory(x["q"], x["k"], x["v"], x["eta"], chunk_size=4, impl="pallas_gpu")
    with pytest.raises(ValueError, match=r"block_v=8"):
        pk.linear_memory(x["q"], x["k"], x["v"], x["eta"], impl="pallas_tpu", block_v=8)
    with pytest.raises(ValueError, match=r"block_v=8"):
        pk.linear_memory(x["q"], x["k"], x["v"], x["eta"], impl="pallas_gpu", block_v=8)
    # "auto" on this CPU host takes XLA
    y_auto, _ = pk.linear_memory(x["q"], x["k"], x["v"], x["eta"])
    y_xla, _ = pk.linear_memory(x["q"], x["k"], x["v"], x["eta"], impl="xla")
    assert rel(y_auto, y_xla) == 0.0


def test_registered():
    from pallas_kernels.ops._common import registered_kernel

    assert registered_kernel("gradient_memory", "tpu") is gradient_memory_tpu.gradient_memory_tpu
    assert registered_kernel("gradient_memory", "gpu") is gradient_memory_gpu.gradient_memory_gpu
