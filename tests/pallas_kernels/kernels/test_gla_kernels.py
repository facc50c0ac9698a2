"""Pallas kernels for ``gla`` (regime A): interpret-mode numerics against impl="xla", lowering
for TPU (Mosaic) and GPU (Triton) from this host, real TPU compiles (``tpu_compile``) and the
supports / error paths.

Interpret mode is slow (the cost is compilation), so the default suite runs one case per
backend and decay mode; the full matrix (both dtypes, with / without segments and initial
state, every decay mode on both backends) is marked ``slow``.
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
from pallas_kernels.kernels import gla_gpu, gla_tpu

B, H, T, D = 2, 2, 37, 16
CHUNK = 16
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}
MODES = ("none", "scalar", "channel")


def make_inputs(mode, t=T, d=D, dtype=jnp.float32, seed=0, strength=2.0, b=B, h=H):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, h, d), dtype)
    v = jax.random.normal(ks[2], (b, t, h, d), dtype)
    log_a = None
    if mode == "scalar":
        log_a = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + strength)
    elif mode == "channel":
        log_a = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, d)) + strength)
    s0 = jax.random.normal(ks[4], (b, h, d, d))
    return q, k, v, log_a, s0


def _runner(impl, segment_ids, chunk=CHUNK, with_s0=True):
    kw = {"interpret": True} if impl.startswith("pallas") else {}

    def loss(q, k, v, log_a, s0):
        y, s = pk.gla(
            q, k, v, log_a, initial_state=s0 if with_s0 else None, segment_ids=segment_ids,
            chunk_size=chunk, impl=impl, **kw,
        )  # fmt: skip
        yf = y.astype(jnp.float32)
        # fixed, non-uniform cotangents so every output element matters
        w = jnp.cos(jnp.arange(yf.size, dtype=jnp.float32).reshape(yf.shape))
        return jnp.sum(yf * w) + jnp.sum(jnp.sin(s)), (y, s)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def check_against_xla(impl, mode, dtype=jnp.float32, seg=True, with_s0=True, t=T):
    q, k, v, log_a, s0 = make_inputs(mode, t=t, dtype=dtype)
    sid = packed_ids(B, t, (5, 20)) if seg else None
    (_, (y, s)), grads = _runner(impl, sid, with_s0=with_s0)(q, k, v, log_a, s0)
    (_, (y_ref, s_ref)), grads_ref = _runner("xla", sid, with_s0=with_s0)(q, k, v, log_a, s0)
    tol = TOL[dtype]
    errs = {"y": rel(y, y_ref), "state": rel(s, s_ref)}
    names = ("dq", "dk", "dv", "dlog_a", "ds0")
    for name, g, g_ref in zip(names, grads, grads_ref):
        if g_ref is None or (name == "dlog_a" and log_a is None):
            continue
        if name == "ds0" and not with_s0:
            continue
        errs[name] = rel(g, g_ref)
    print(f"\n{impl} {mode} {jnp.dtype(dtype).name} seg={seg} s0={with_s0} T={t}: {errs}")
    assert y.dtype == v.dtype and s.dtype == jnp.float32
    assert y.shape == (B, t, H, D) and s.shape == (B, H, D, D)
    for name, e in errs.items():
        assert np.isfinite(e) and e < tol, (name, e, tol)
    return errs


# --------------------------------------------------------------------------------------------
# Interpret-mode numerics
# --------------------------------------------------------------------------------------------

DEFAULT_CASES = [  # the rest of the matrix is test_matches_xla_full (slow tier)
    ("pallas_tpu", "channel", jnp.float32, True, True),
    ("pallas_gpu", "channel", jnp.float32, True, True),
    ("pallas_gpu", "scalar", jnp.bfloat16, True, True),
]


@pytest.mark.parametrize("impl,mode,dtype,seg,with_s0", DEFAULT_CASES)
def test_matches_xla(impl, mode, dtype, seg, with_s0):
    check_against_xla(impl, mode, dtype, seg=seg, with_s0=with_s0)


@pytest.mark.slow
@pytest.mark.parametrize("seg", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_matches_xla_full(impl, mode, dtype, seg):
    check_against_xla(impl, mode, dtype, seg=seg, with_s0=seg)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_short_sequence_and_block_v(impl):
    """T shorter than one chunk (the kernels shrink the chunk) and two dv blocks."""
    q, k, v, log_a, s0 = make_inputs("channel", t=5, d=32)
    kw = dict(initial_state=s0, chunk_size=64)
    bv = 16 if impl == "pallas_gpu" else 32
    y, s = pk.gla(q, k, v, log_a, impl=impl, interpret=True, block_v=bv, **kw)
    y_ref, s_ref = pk.gla(q, k, v, log_a, impl="scan", **kw)
    assert rel(y, y_ref) < 1e-4 and rel(s, s_ref) < 1e-4


def test_strong_channel_decay_stays_finite():
    """log a down to -60 per step: every exponent the kernels evaluate is <= 0."""
    q, k, v, log_a, s0 = make_inputs("channel", strength=-6.0, seed=3)
    log_a = log_a * 10.0
    assert float(jnp.min(log_a)) < -50
    sid = packed_ids(B, T, (9,))
    (_, (y, s)), grads = _runner("pallas_gpu", sid)(q, k, v, log_a, s0)
    (_, (y_ref, s_ref)), grads_ref = _runner("scan", sid)(q, k, v, log_a, s0)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (y, s, *grads))
    assert rel(y, y_ref) < 1e-4 and rel(s, s_ref) < 1e-4
    assert rel(grads, grads_ref) < 1e-4


# --------------------------------------------------------------------------------------------
# Lowering (export from this CPU host)
# --------------------------------------------------------------------------------------------


def _specs(mode, d, dtype, b=1, t=256, h=2):
    S = jax.ShapeDtypeStruct
    specs = [S((b, t, h, d), dtype)] * 3
    if mode == "scalar":
        specs.append(S((b, t, h), jnp.float32))
    elif mode == "channel":
        specs.append(S((b, t, h, d), jnp.float32))
    specs += [S((b, h, d, d), jnp.float32), S((b, t), jnp.int32)]
    return specs


def _fns(impl, mode, chunk=64):
    """(forward, backward) taking (q, k, v, [log_a], s0, segment_ids)."""

    def unpack(args):
        if mode == "none":
            q, k, v, s0, sid = args
            return q, k, v, None, s0, sid
        return args

    def fwd(*args):
        q, k, v, la, s0, sid = unpack(args)
        return pk.gla(q, k, v, la, initial_state=s0, segment_ids=sid, chunk_size=chunk, impl=impl)

    def bwd(*args):
        q, k, v, la, s0, sid = unpack(args)

        def loss(q, k, v, la, s0):
            y, s = pk.gla(
                q, k, v, la, initial_state=s0, segment_ids=sid, chunk_size=chunk, impl=impl
            )
            return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(s)

        if la is None:
            return jax.grad(loss, argnums=(0, 1, 2, 4))(q, k, v, la, s0)
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, la, s0)

    return fwd, bwd


def _export(platform, mode, d, dtype):
    impl = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    fwd, bwd = _fns(impl, mode)
    specs = _specs(mode, d, dtype)
    marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    for fn, n_kernels in ((fwd, 1), (bwd, 4)):
        text = export_for(fn, *specs, platform=platform).mlir_module()
        # forward: the forward kernel; backward: forward + states + reverse + grads kernels
        assert text.count(marker) >= n_kernels, (platform, mode, d, text.count(marker))


@pytest.mark.parametrize(
    "platform,mode,d,dtype",
    [("tpu", "channel", 64, jnp.bfloat16), ("cuda", "channel", 128, jnp.float32)],
)
def test_export(platform, mode, d, dtype):
    _export(platform, mode, d, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_full(platform, mode, d, dtype):
    _export(platform, mode, d, dtype)


# --------------------------------------------------------------------------------------------
# Real TPU compiles (libtpu; skipped without it)
# --------------------------------------------------------------------------------------------

COMPILE_CASES = [("channel", 64), ("channel", 128), ("channel", 256), ("scalar", 128)]
COMPILE_CASES += [("none", 128)]


@pytest.mark.slow
@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("mode,d", COMPILE_CASES)
def test_tpu_compile(topology, mode, d):
    # other processes on this host may hold libtpu's lockfile; AOT compiles need no device
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    fwd, bwd = _fns("pallas_tpu", mode)
    specs = _specs(mode, d, jnp.bfloat16, b=4)  # one batch row per chip
    for name, fn in (("forward", fwd), ("backward", bwd)):
        compiled = compile_for_tpu(fn, *specs, topology=topology)
        mem = compiled.memory_analysis()
        assert mem is not None
        print(
            f"\nTPU_COMPILE gla {mode} {topology} d={d} {name}: "
            f"temp={mem.temp_size_in_bytes} argument={mem.argument_size_in_bytes} "
            f"output={mem.output_size_in_bytes} code={mem.generated_code_size_in_bytes} "
            f"vmem_analytic={gla_tpu.vmem_bytes(d, d, mode=mode)}"
        )


# --------------------------------------------------------------------------------------------
# Supports and clear errors
# --------------------------------------------------------------------------------------------


def test_unsupported_shapes_raise():
    q, k, v, log_a, _ = make_inputs("channel", t=8, d=48, b=1, h=1)
    with pytest.raises(NotImplementedError, match=r"gla: impl='pallas_gpu'.*dk=48"):
        pk.gla(q, k, v, log_a, impl="pallas_gpu")
    with pytest.raises(NotImplementedError, match=r"gla: impl='pallas_tpu'.*chunk_size=24"):
        pk.gla(q, k, v, log_a, chunk_size=24, impl="pallas_tpu")
    q, k, v, log_a, _ = make_inputs("channel", t=8, d=16, b=1, h=1)
    with pytest.raises(NotImplementedError, match=r"pallas_tpu.*block_v=8"):
        pk.gla(q, k, v, log_a, impl="pallas_tpu", block_v=8)
    with pytest.raises(NotImplementedError, match=r"pallas_gpu.*block_v=8"):
        pk.gla(q, k, v, log_a, impl="pallas_gpu", block_v=8)
    x_f16 = jnp.zeros((1, 8, 1, 16), jnp.float16)
    with pytest.raises(NotImplementedError, match=r"pallas_tpu.*q dtype float16"):
        pk.gla(x_f16, x_f16, x_f16, impl="pallas_tpu")


def test_supports_reasons():
    kw = dict(initial_state=None, segment_ids=None, scale=None)
    x16 = jax.ShapeDtypeStruct((1, 8, 1, 16), jnp.float32)
    x48 = jax.ShapeDtypeStruct((1, 8, 1, 48), jnp.float32)
    x12 = jax.ShapeDtypeStruct((1, 8, 1, 12), jnp.float32)
    assert gla_tpu.supports(x16, x16, x16, None, chunk_size=64, **kw) is None
    assert gla_gpu.supports(x16, x16, x16, None, chunk_size=64, **kw) is None
    assert gla_tpu.supports(x48, x48, x48, None, chunk_size=64, **kw) is None
    assert gla_gpu.supports(x48, x48, x48, None, chunk_size=64, **kw) == (
        "dk=48 is not a power of two >= 16"
    )
    assert (
        gla_tpu.supports(x12, x12, x12, None, chunk_size=64, **kw) == "dk=12 is not a multiple of 8"
    )
    assert gla_gpu.supports(x16, x16, x16, None, chunk_size=48, **kw) == (
        "chunk_size=48 is not a power of two >= 16"
    )
    assert gla_tpu.supports(x16, x16, x16, None, chunk_size=40, **kw) == (
        "chunk_size=40 is not a multiple of 16"
    )


def test_registered():
    assert pk.registered_kernel("gla", "tpu") is gla_tpu.gla_tpu
    assert pk.registered_kernel("gla", "gpu") is gla_gpu.gla_gpu
