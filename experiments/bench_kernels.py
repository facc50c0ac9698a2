"""Kernel benchmark: forward and forward+backward time and achieved TFLOP/s of every recurrence
op and implementation available on this backend, beside ``jax.nn.dot_product_attention``, at
the shapes flash-linear-attention publishes.

    python experiments/bench_kernels.py                      # every shape, op, impl here
    python experiments/bench_kernels.py --shapes 8x1024x8x64 --ops gla_scalar,attention
    python experiments/bench_kernels.py --t-scale 0.125      # shorter sequences (CPU)
    python experiments/bench_kernels.py --json out.json

Implementations: "xla" (the chunked form) everywhere; "pallas_tpu" on TPU, "pallas_gpu" on
GPU (plus "scan" with --with-scan). Inputs are bf16 (``--dtype``); the ops accumulate in fp32.

FLOP model (the forward of one head, per token; forward+backward counts 3x): chunked linear
attention (gla, delta_rule) 2*C*dk + 2*C*dv intra-chunk plus 4*dk*dv for the state read and
update, with 2*C*dk + 2*dk*dv more for the WY terms of the delta rule; the linear gradient
memory 3x the delta rule (anchor error, momentum and the dual-form read); causal attention
2*T*d (half of 4*T*d). These are the conventional counts, not measured ones: compare impls of
one op in one run (the machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import delta_rule, gla, linear_memory

FLA_SHAPES = ((1, 8192, 96, 128), (2, 16384, 16, 128), (8, 1024, 8, 64), (8, 2048, 32, 256))


def _inputs(B, T, H, D, dtype, key):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, D), dtype)
    eta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))).astype(dtype)
    la_h = (-jax.nn.softplus(jax.random.normal(ks[4], (B, T, H))) / 8).astype(dtype)
    la_c = (jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, T, H, D)) + 3.0) / 16).astype(dtype)
    return {"q": q, "k": k, "v": v, "eta": eta, "la_h": la_h, "la_c": la_c}


def _attention(x, impl, chunk):
    del impl, chunk
    return jax.nn.dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)


OPS: dict[str, tuple[Callable, Callable[[int, int, int], float]]] = {
    # name: (fn(inputs, impl, chunk) -> y, forward FLOPs per token per head (T, C, D))
    "gla_none": (
        lambda x, impl, c: gla(x["q"], x["k"], x["v"], None, impl=impl, chunk_size=c)[0],
        lambda T, C, D: 4 * C * D + 4 * D * D,
    ),
    "gla_scalar": (
        lambda x, impl, c: gla(x["q"], x["k"], x["v"], x["la_h"], impl=impl, chunk_size=c)[0],
        lambda T, C, D: 4 * C * D + 4 * D * D,
    ),
    "gla_channel": (
        lambda x, impl, c: gla(x["q"], x["k"], x["v"], x["la_c"], impl=impl, chunk_size=c)[0],
        lambda T, C, D: 4 * C * D + 4 * D * D,
    ),
    "deltanet": (
        lambda x, impl, c: delta_rule(
            x["q"], x["k"], x["v"], x["eta"], None, impl=impl, chunk_size=c
        )[0],
        lambda T, C, D: 6 * C * D + 6 * D * D,
    ),
    "gated_deltanet": (
        lambda x, impl, c: delta_rule(
            x["q"], x["k"], x["v"], x["eta"], x["la_h"], impl=impl, chunk_size=c
        )[0],
        lambda T, C, D: 6 * C * D + 6 * D * D,
    ),
    "titans_linear": (
        lambda x, impl, c: linear_memory(
            x["q"],
            x["k"],
            x["v"],
            x["eta"] * 0.1,
            mu=jnp.full_like(x["eta"], 0.9),
            log_a=x["la_h"],
            impl=impl,
            chunk_size=c,
        )[0],
        lambda T, C, D: 18 * C * D + 18 * D * D,
    ),
    "attention": (_attention, lambda T, C, D: 2 * T * D),
}


def _time(fn, args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def bench_cell(op: str, impl: str, shape, chunk: int, dtype, repeats: int) -> dict:
    B, T, H, D = shape
    fn, flops_tok = OPS[op]
    x = _inputs(B, T, H, D, dtype, jax.random.key(0))
    fwd = jax.jit(lambda x: fn(x, impl, chunk))

    def loss(x):
        return jnp.sum(fn(x, impl, chunk).astype(jnp.float32) ** 2)

    diff = {n: a for n, a in x.items() if n in ("q", "k", "v")}
    rest = {n: a for n, a in x.items() if n not in diff}
    fwd_bwd = jax.jit(jax.grad(lambda d, r: loss({**d, **r})))
    flops = flops_tok(T, chunk, D) * B * T * H
    row = {"op": op, "impl": impl, "B": B, "T": T, "H": H, "D": D, "chunk": chunk}
    for name, f, args, mult in (("fwd", fwd, (x,), 1), ("fwd_bwd", fwd_bwd, (diff, rest), 3)):
        try:
            s = _time(f, args, repeats)
            row[f"{name}_ms"] = s * 1e3
            row[f"{name}_tflops"] = mult * flops / s / 1e12
        except Exception as e:  # OOM or an unsupported call: record it and go on
            row[f"{name}_error"] = " ".join(str(e).split())[:160]
    return row


def available_impls(with_scan: bool) -> list[str]:
    backend = jax.default_backend()
    impls = ["xla"]
    if backend in ("tpu", "gpu"):
        impls.append(f"pallas_{backend}")
    if with_scan:
        impls.append("scan")
    return impls


def _fmt(row: dict, key: str) -> str:
    if f"{key}_error" in row:
        return "error"
    return f"{row[f'{key}_ms']:9.2f} {row[f'{key}_tflops']:7.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in FLA_SHAPES))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--impls", default=None, help="default: those available on this backend")
    p.add_argument("--with-scan", action="store_true")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--t-scale", type=float, default=1.0, help="multiply every T (CPU runs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    shapes = []
    for s in a.shapes.split(","):
        try:
            B, T, H, D = (int(v) for v in s.lower().split("x"))
        except ValueError:
            p.error(f"--shapes: {s!r} is not BxTxHxD")
        shapes.append((B, max(a.chunk, int(T * a.t_scale)), H, D))
    ops = a.ops.split(",")
    for op in ops:
        if op not in OPS:
            p.error(f"--ops: unknown op {op!r}; choose from {', '.join(OPS)}")
    impls = a.impls.split(",") if a.impls else available_impls(a.with_scan)
    dtype = jnp.dtype(a.dtype)
    print(f"# backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {a.dtype}")
    print(
        f"{'op':16} {'impl':11} {'B,T,H,D':22} {'fwd ms':>9} {'TFLOP/s':>7} "
        f"{'f+b ms':>9} {'TFLOP/s':>7}"
    )
    rows = []
    for shape in shapes:
        for op in ops:
            for impl in impls if op != "attention" else ["xla"]:
                row = bench_cell(op, impl, shape, a.chunk, dtype, a.repeats)
                rows.append(row)
                print(
                    f"{op:16} {impl:11} {','.join(map(str, shape)):22} "
                    f"{_fmt(row, 'fwd')} {_fmt(row, 'fwd_bwd')}",
                    flush=True,
                )
                for key in ("fwd_error", "fwd_bwd_error"):
                    if key in row:
                        print(f"    {key}: {row[key]}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"backend": jax.default_backend(), "dtype": a.dtype, "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
