"""Forward+backward throughput of the recurrence ops: chunked ("xla") vs the scan reference.

    python experiments/bench_ops.py                  # defaults: B=2 T=2048 H=4 d=64
    python experiments/bench_ops.py --T 8192 --impls xla

Prints tokens/s per op and implementation and the xla/scan speed ratio, all from one run
(these machines are shared and noisy: compare ratios, not absolute figures across runs).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from pallas_kernels import delta_rule, gla, hgrn


def make_inputs(B, T, H, d, key):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, H, d))
    k = jax.random.normal(ks[1], (B, T, H, d))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, d))
    eta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    la_h = -jax.nn.softplus(jax.random.normal(ks[4], (B, T, H)))
    la_c = jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, T, H, d)) + 3.0) / 16
    return q, k, v, eta, la_h, la_c


OPS = {
    "linear_attention": lambda q, k, v, eta, la_h, la_c, **kw: gla(q, k, v, None, **kw),
    "retnet/scalar-decay": lambda q, k, v, eta, la_h, la_c, **kw: gla(q, k, v, la_h, **kw),
    "gla/per-channel": lambda q, k, v, eta, la_h, la_c, **kw: gla(q, k, v, la_c, **kw),
    "deltanet": lambda q, k, v, eta, la_h, la_c, **kw: delta_rule(q, k, v, eta, None, **kw),
    "gated_deltanet": lambda q, k, v, eta, la_h, la_c, **kw: delta_rule(q, k, v, eta, la_h, **kw),
    "hgrn": lambda q, k, v, eta, la_h, la_c, **kw: hgrn(q, v, la_c, **kw),
}


def bench(fn, args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", default="xla,scan")
    a = p.parse_args()
    inputs = make_inputs(a.B, a.T, a.H, a.d, jax.random.key(0))
    impls = a.impls.split(",")
    print(f"backend={jax.default_backend()} B={a.B} T={a.T} H={a.H} d={a.d} C={a.chunk}")
    print(f"{'op':22s} " + " ".join(f"{i + ' tok/s':>14s}" for i in impls) + "   xla/scan")
    for name, op in OPS.items():
        rates = {}
        for impl in impls:

            def loss(q, k, v, eta, la_h, la_c, impl=impl, op=op):
                y, s = op(q, k, v, eta, la_h, la_c, chunk_size=a.chunk, impl=impl)
                return jnp.sum(y * y) + jnp.sum(s * s)

            fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
            rates[impl] = a.B * a.T / bench(fb, inputs, a.repeats)
        ratio = rates["xla"] / rates["scan"] if {"xla", "scan"} <= rates.keys() else float("nan")
        cols = " ".join(f"{rates[i]:14,.0f}" for i in impls)
        print(f"{name:22s} {cols}   {ratio:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
