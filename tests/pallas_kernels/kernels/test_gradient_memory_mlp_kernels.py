"""Pallas kernels for ``gradient_memory`` with the two-layer MLP memory (TTT-MLP, Titans LMM with
L_M = 2; regime C): interpret-mode numerics against impl="xla" (outputs, the final state dict,
gradients of q, k, v, eta, mu, log_a, the reset weights and every leaf of the initial state),
lowering for TPU (Mosaic) and GPU (Triton) from this host, real TPU compiles (``tpu_compile``)
and the supports / error paths.

The default suite runs one combined case per backend (the ``titans_lmm`` preset's memory:
residual + layer norm, GELU, momentum and decay; packed documents; a carried state that starts
mid-chunk; odd T); other losses, activations, flags, bf16 and the ``ttt_mlp`` setting (plain
descent, no decay) are marked ``slow``.
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
from pallas_kernels.kernels import gradient_memory_gpu, gradient_memory_tpu
from pallas_kernels.ops.gradient_memory import GradientMemorySpec, MemoryArch

B, H, T, D = 2, 2, 37, 16
CHUNK = 16
PREFIX = 5  # the carried state sits 5 tokens into a chunk
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-3}  # both paths compute in fp32 from the inputs
TITANS = MemoryArch(
    "mlp", depth=2, expansion=4.0, activation="gelu", residual=True, layer_norm=True
)


def make_inputs(arch, loss="l2", t=T, d=D, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)

    def unit(key, n):
        x = jax.random.normal(key, (B, t, H, n))
        return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

    return {
        "q": unit(ks[0], d),
        "k": unit(ks[1], d),
        "v": jax.random.normal(ks[2], (B, t, H, d)).astype(dtype),
        "eta": (0.05 if loss == "lp" else 0.3)
        * jax.nn.sigmoid(jax.random.normal(ks[3], (B, t, H))),
        "mu": jax.nn.sigmoid(jax.random.normal(ks[4], (B, t, H)) + 1.0),
        "log_a": jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, t, H)) + 3.0),
        "delta": 0.3 + jax.nn.softplus(jax.random.normal(ks[6], (B, t, H))),
        "params": arch.init(ks[7], H, d, d),
    }


def _call(impl, arch, loss, x, state, seg, momentum, decay):
    kw = {"interpret": True} if impl.startswith("pallas") else {}
    return pk.gradient_memory(
        x["q"], x["k"], x["v"], x["eta"], spec=GradientMemorySpec(arch=arch, loss=loss),
        params=x["params"], mu=x["mu"] if momentum else None,
        log_a=x["log_a"] if decay else None, delta=x["delta"] if loss == "huber" else None,
        initial_state=state, segment_ids=seg, chunk_size=CHUNK, impl=impl, **kw,
    )  # fmt: skip


def _weights(shape, phase):
    n = int(np.prod(shape))
    return jnp.cos(jnp.arange(n, dtype=jnp.float32) * 0.37 + phase).reshape(shape)


def _runner(impl, arch, loss, seg, momentum, decay):
    def objective(x, state):
        y, st = _call(impl, arch, loss, x, state, seg, momentum, decay)
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
    impl, arch=TITANS, loss="l2", *, momentum=True, decay=True, seg=True, carried=True,
    dtype=jnp.float32,
):  # fmt: skip
    x = make_inputs(arch, loss, t=T + PREFIX, dtype=dtype)
    head = {n: (a if n == "params" else a[:, :PREFIX]) for n, a in x.items()}
    rest = {n: (a if n == "params" else a[:, PREFIX:]) for n, a in x.items()}
    state = None
    if carried:  # a state from a previous call, 5 tokens into a chunk (anchor != weights)
        _, state = _call("xla", arch, loss, head, None, None, momentum, decay)
    ids = packed_ids(B, T, (7, 22)) if seg else None
    (_, (yk, sk)), gk = _runner(impl, arch, loss, ids, momentum, decay)(rest, state)
    (_, (yx, sx)), gx = _runner("xla", arch, loss, ids, momentum, decay)(rest, state)
    tol = TOL[dtype]
    assert yk.dtype == yx.dtype == dtype and yk.shape == yx.shape
    assert sorted(sk) == sorted(sx) and bool(jnp.all(sk["pos"] == sx["pos"]))
    errs = {"y": rel(yk, yx)}
    for name in sx:
        if name != "pos":
            assert sorted(sk[name]) == ["W0", "W1"]
            assert all(w.dtype == jnp.float32 for w in sk[name].values())
            errs[name] = rel(sk[name], sx[name])
    fk, fx = _floats(gk), _floats(gx)
    assert [p for p, _ in fk] == [p for p, _ in fx]
    for (path, a), (_, b) in zip(fk, fx, strict=True):
        assert a.dtype == b.dtype, path
        assert bool(jnp.all(jnp.isfinite(a))), path
        errs[path] = rel(a, b)
        # every input that reaches the loss has a non-zero gradient (no vacuous comparison)
        unused = ("delta" in path and loss != "huber") or ("mu" in path and not momentum)
        unused = unused or ("log_a" in path and not decay)
        unused = unused or ("params" in path and carried and not seg)
        unused = unused or ("anchor" in path and loss == "dot")  # dot never reads the anchor
        assert unused or float(jnp.linalg.norm(b.astype(jnp.float32))) > 0, path
    bad = {
        p: e
        for p, e in errs.items()
        if not e < (tol if p in ("y", "A", "Z", "anchor") else 2 * tol)
    }
    assert not bad, bad
    return errs


# --------------------------------------------------------------------------------------------
# Interpret-mode numerics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_matches_xla(impl):
    """titans_lmm's memory: momentum + decay, packed documents, a carried mid-chunk state."""
    errs = check_against_xla(impl)
    print(f"\nMLP_ERRS {impl}: " + " ".join(f"{p}={e:.1e}" for p, e in errs.items()))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_ttt_mlp_setting(impl):
    """ttt_mlp: plain descent, no decay."""
    check_against_xla(impl, momentum=False, decay=False)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("loss", ["dot", "lp", "huber"])
def test_losses(impl, loss):
    check_against_xla(impl, loss=loss, seg=loss != "dot")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize(
    "arch",
    [
        MemoryArch("mlp", depth=2, activation="silu", residual=False, layer_norm=False),
        MemoryArch("mlp", depth=2, activation="relu", residual=True, layer_norm=False),
        MemoryArch("mlp", depth=2, expansion=2.0, activation="gelu", layer_norm=True),
    ],
    ids=["silu-plain", "relu-residual", "gelu-ln-x2"],
)
def test_arch_flags(impl, arch):
    check_against_xla(impl, arch)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_fresh_state_bf16(impl):
    check_against_xla(impl, seg=False, carried=False, dtype=jnp.bfloat16)


# --------------------------------------------------------------------------------------------
# Lowering from this host (Mosaic TPU / Triton) and real TPU compiles
# --------------------------------------------------------------------------------------------


def _fns(impl, d, loss="l2"):
    arch = TITANS
    params = {n: jax.ShapeDtypeStruct((2,) + s, jnp.float32) for n, s in arch.shapes(d, d).items()}

    def fwd(q, k, v, eta, mu, log_a, seg, params):
        return pk.gradient_memory(
            q, k, v, eta, spec=GradientMemorySpec(arch=arch, loss=loss), params=params, mu=mu,
            log_a=log_a, chunk_size=64, segment_ids=seg, impl=impl,
        )  # fmt: skip

    def bwd(q, k, v, eta, mu, log_a, seg, params):
        def obj(x):
            y, st = fwd(*x[:6], seg, x[6])
            return jnp.sum(y.astype(jnp.float32) ** 2) + sum(
                jnp.sum(w**2) for w in st["A"].values()
            )

        return jax.grad(obj)((q, k, v, eta, mu, log_a, params))

    return fwd, bwd, params


def _specs(d, dtype, params, b=2, t=150, h=2):  # t=150: 3 chunks of 64, the last one partial
    def s(*shape, dt=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dt)

    x = s(b, t, h, d, dt=dtype)
    return (x, x, x, s(b, t, h), s(b, t, h), s(b, t, h), s(b, t, dt=jnp.int32), params)


def _export_check(platform, d, dtype):
    impl = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    marker = "tpu_custom_call" if platform == "tpu" else "triton"
    fwd, bwd, params = _fns(impl, d)
    for fn, calls in ((fwd, 1), (bwd, 3)):
        text = export_for(fn, *_specs(d, dtype, params), platform=platform).mlir_module()
        assert text.count(marker) >= calls  # fwd: 1 kernel; bwd: fwd + states + reverse sweep
        assert "gradient_memory_mlp" in text


@pytest.mark.parametrize(
    "platform,d,dtype", [("tpu", 64, jnp.bfloat16), ("cuda", 128, jnp.float32)]
)
def test_export(platform, d, dtype):
    _export_check(platform, d, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(
    "platform,d,dtype",
    [("tpu", 128, jnp.float32), ("tpu", 64, jnp.float32), ("cuda", 64, jnp.bfloat16)],
)
def test_export_full(platform, d, dtype):
    _export_check(platform, d, dtype)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_tpu_compile(topology, d):
    # other processes on this host may hold libtpu's lockfile; AOT compiles need no device
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    fwd, bwd, params = _fns("pallas_tpu", d)
    specs = _specs(d, jnp.bfloat16, params, b=4, t=512)  # one batch row per chip
    for name, fn in (("forward", fwd), ("backward", bwd)):
        axes = [0] * 7 + [None]  # the reset weights are replicated
        compiled = compile_for_tpu(fn, *specs, topology=topology, batch_axes=axes)
        mem = compiled.memory_analysis()
        assert mem is not None
        vmem = gradient_memory_tpu.vmem_bytes(
            d, d, seg=True, backward=name == "backward", arch="mlp"
        )
        print(
            f"\nTPU_COMPILE gradient_memory mlp {topology} d={d} {name}: "
            f"temp={mem.temp_size_in_bytes} argument={mem.argument_size_in_bytes} "
            f"output={mem.output_size_in_bytes} code={mem.generated_code_size_in_bytes} "
            f"vmem_analytic={vmem}"
        )


# --------------------------------------------------------------------------------------------
# Supports and clear errors
# --------------------------------------------------------------------------------------------


def _supports_kw(spec, x, **over):
    kw = dict(
        spec=spec, params=x["params"], mu=x["mu"], log_a=x["log_a"], gamma=None, delta=None,
        initial_state=None, segment_ids=None, chunk_size=16,
    )  # fmt: skip
    kw.update(over)
    return kw


def test_supports_reasons():
    x = make_inputs(TITANS, t=8)
    args = (x["q"], x["k"], x["v"], x["eta"])
    cases = {
        "depth 3": MemoryArch("mlp", depth=3),
        "gated_mlp": MemoryArch("gated_mlp"),
    }
    for mod in (gradient_memory_tpu, gradient_memory_gpu):
        assert mod.supports(*args, **_supports_kw(GradientMemorySpec(arch=TITANS), x)) is None
        for want, arch in cases.items():
            why = mod.supports(*args, **_supports_kw(GradientMemorySpec(arch=arch), x))
            assert why is not None and want in why, (want, why)
        for want, spec in {
            "normalizer 'lq'": GradientMemorySpec(arch=TITANS, normalizer="lq"),
            "Muon": GradientMemorySpec(arch=TITANS, muon=True),
            "window 3": GradientMemorySpec(arch=TITANS, window=3),
        }.items():
            assert want in mod.supports(*args, **_supports_kw(spec, x)), want
    # Triton block dims: the hidden width must be a power of two too
    odd = MemoryArch("mlp", depth=2, expansion=3.0)
    why = gradient_memory_gpu.supports(*args, **_supports_kw(GradientMemorySpec(arch=odd), x))
    assert "hidden width" in why
    assert (
        gradient_memory_tpu.supports(*args, **_supports_kw(GradientMemorySpec(arch=odd), x)) is None
    )


def test_block_v_is_refused():
    x = make_inputs(TITANS, t=8, d=32)
    for impl in ("pallas_tpu", "pallas_gpu"):
        with pytest.raises(ValueError, match=r"mlp memory runs the whole value dim"):
            pk.gradient_memory(
                x["q"], x["k"], x["v"], x["eta"], spec=GradientMemorySpec(arch=TITANS),
                params=x["params"], impl=impl, block_v=16, interpret=True,
            )  # fmt: skip


def test_vmem_bytes():
    """The analytic footprint of the mlp kernels: grows with the head dim, the backward needs
    more than the forward, and every compiled configuration (head dims up to 256) fits under
    the scoped-VMEM limit the kernels ask for."""
    tpu = gradient_memory_tpu
    prev = 0
    for d in (64, 128, 256):
        fwd = tpu.vmem_bytes(d, d, seg=True, arch="mlp")
        bwd = tpu.vmem_bytes(d, d, seg=True, backward=True, arch="mlp")
        assert prev < fwd < bwd < tpu.MLP_VMEM_CAP, (d, fwd, bwd)
        assert fwd > tpu.vmem_bytes(d, d, seg=True)  # more than the linear memory's
        assert bwd == tpu.mlp_vmem_bytes(d, d, seg=True, backward=True)
        prev = fwd
