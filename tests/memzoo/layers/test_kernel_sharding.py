"""Pallas kernels under a device mesh: ``memzoo.layers.partitioning.kernel_op`` runs them inside
``shard_map`` (batch over data x fsdp, heads over tensor), and the result equals the unsharded
XLA path, forward and gradients. Runs in a subprocess with 4 host devices (the device count must
be set before JAX starts); the kernels run in Pallas interpret mode on this CPU."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from memzoo.layers.partitioning import activation_sharding, kernel_op
    from pallas_kernels import delta_rule, gla, gradient_memory, GradientMemorySpec

    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=auto)
    rules = {"batch": ["data", "fsdp"], "heads": "tensor"}
    B, T, H, d = 4, 40, 4, 16
    ks = jax.random.split(jax.random.key(0), 8)
    q = jax.random.normal(ks[0], (B, T, H, d))
    k = jax.random.normal(ks[1], (B, T, H, d))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, d))
    eta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    la = -jax.nn.softplus(jax.random.normal(ks[4], (B, T, H))) / 4
    s0 = jax.random.normal(ks[5], (B, H, d, d)) * 0.1
    seg = jnp.asarray(np.repeat(np.array([[0] * 23 + [1] * 17]), B, 0))
    cases = {
        "gla": (gla, (q, k, v, la), dict(initial_state=s0, segment_ids=seg, chunk_size=16)),
        "delta_rule": (
            delta_rule, (q, k, v, eta, la), dict(initial_state=s0, segment_ids=seg, chunk_size=16)
        ),
        "gradient_memory": (
            gradient_memory,
            (q, k, v, eta * 0.1),
            dict(spec=GradientMemorySpec(), mu=eta, log_a=la, segment_ids=seg, chunk_size=16,
                 params={"W": jnp.zeros((H, d, d))}),
        ),
    }
    out = {}
    for name, (op, args, kw) in cases.items():
        def loss(args, impl, sharded):
            extra = dict(impl=impl, interpret=True) if impl != "xla" else dict(impl=impl)
            if sharded:
                with activation_sharding(mesh, rules):
                    y, s = kernel_op(op, args, {**kw, **extra})
            else:
                y, s = op(*args, **kw, **extra)
            return jnp.sum(y ** 2) + sum(jnp.sum(x ** 2) for x in jax.tree.leaves(s)), (y, s)
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", None, "tensor")))
        sargs = tuple(put(a) for a in args)
        (l1, (y1, _)), g1 = jax.jit(jax.value_and_grad(
            lambda a: loss(a, "pallas_gpu", True), has_aux=True))(sargs)
        (l0, (y0, _)), g0 = jax.value_and_grad(lambda a: loss(a, "xla", False), has_aux=True)(args)
        rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        hlo = jax.jit(lambda a: loss(a, "pallas_gpu", True)[0]).lower(sargs).as_text()
        out[name] = {
            "loss": rel(l1, l0),
            "y": rel(y1, y0),
            "grads": max(rel(a, b) for a, b in zip(g1, g0)),
            "y_sharding": str(y1.sharding.spec),
            "shard_map": "shard_map" in hlo or "manual" in hlo,
        }
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow  # ~1 min on 2 cores; CI runs it in `make test-full`
def test_kernels_run_in_shard_map_and_match_unsharded_xla():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    assert set(res) == {"gla", "delta_rule", "gradient_memory"}
    for name, r in res.items():
        assert r["shard_map"] and r["y_sharding"] == "P('data', None, 'tensor')", (name, r)
        assert r["loss"] < 1e-5 and r["y"] < 1e-4 and r["grads"] < 1e-4, (name, r)
