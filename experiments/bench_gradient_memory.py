"""Forward+backward cost of the gradient-memory presets: chunked ("xla") vs the scan reference.

    python experiments/bench_gradient_memory.py                     # all presets, T=2048,8192
    python experiments/bench_gradient_memory.py --presets titans_lmm,atlas --lengths 2048
    python experiments/bench_gradient_memory.py --quick             # smoke run (the tests)

For each preset of ``memzoo.memories.gradient.PRESETS`` the memory (spec, reset weights,
gates) is built by ``GradientMemory`` itself and the op inputs come from its ``features`` on
random x, q, k, v: l2-normalised q, k (through the degree-2 polynomial map for the poly
presets), eta = eta_max * sigmoid(.), and mu / log_a / gamma / delta where the preset has them.
Batch 1, 4 heads, chunk 16 by default. The timed function is the jitted gradient of
sum(y^2) with respect to q, k, v and the reset weights, for impl="xla" and impl="scan".

Reported per (preset, T, impl): compile time (lower + compile), the median of ``--repeats``
timed runs after one warm-up run, tokens/s, and the peak memory XLA plans for the executable
(``compiled.memory_analysis()``: temp + argument + output bytes; n/a where the backend does
not report it). The poly presets (omeganet, atlas, atlas_pp) use ``--poly-head-dim`` (16) for
q/k, since their memory key dim is poly_dim(dk) = dk + dk(dk+1)/2 (2144 at dk = 64). The value
dim equals the head dim, as in the model (``expand_v`` 1).

A run whose planned peak exceeds ``--max-peak-gib`` is compiled (to read its plan) but not run;
``--scan-budget S`` skips scan at a length when the previous length's scan time, scaled
linearly in T, predicts more than S seconds for warm-up + repeats. These machines are shared
and noisy: compare ratios, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.memories.gradient import PRESETS, GradientMemory, poly_dim
from pallas_kernels.ops.gradient_memory import gradient_memory

QUICK_PRESETS = ("ttt_linear", "titans_lmm")
GATE_NAMES = ("mu", "log_a", "gamma", "delta")


def build(name: str, *, T: int, H: int, d: int, chunk: int, batch: int, seed: int = 0):
    """(memory, q, k, v, gates) for a preset: inputs as GradientMemory.features makes them."""
    mem = GradientMemory(
        PRESETS[name],
        d_model=H * d,
        num_heads=H,
        dk=d,
        dv=d,
        chunk_size=chunk,
        rngs=nnx.Rngs(seed),
    )
    ks = jax.random.split(jax.random.key(seed + 1), 4)
    x = jax.random.normal(ks[0], (batch, T, H * d))
    q = jax.random.normal(ks[1], (batch, T, H, d))
    k = jax.random.normal(ks[2], (batch, T, H, d))
    v = jax.random.normal(ks[3], (batch, T, H, d))
    q, k, v, gates = mem.features(x, q, k, v)
    return mem, q, k, v, gates


def make_fwd_bwd(mem: GradientMemory, gates: dict[str, Any], impl: str):
    """grad of sum(y^2) wrt (q, k, v, params); gates are inputs but not differentiated."""

    def loss(q, k, v, params, gates):
        y, _ = gradient_memory(
            q,
            k,
            v,
            gates["eta"],
            spec=mem.spec,
            params=params,
            **{g: gates.get(g) for g in GATE_NAMES},
            chunk_size=mem.chunk_size,
            impl=impl,
        )
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    return jax.grad(loss, argnums=(0, 1, 2, 3))


def peak_bytes(compiled) -> int | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # backends without a memory analysis
        return None
    if ma is None:
        return None
    try:
        return int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)
    except AttributeError:
        return None


def measure(fn, args, repeats: int, max_peak: float | None) -> dict[str, Any]:
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    out: dict[str, Any] = {"compile_s": time.perf_counter() - t, "peak": peak_bytes(compiled)}
    if max_peak is not None and out["peak"] is not None and out["peak"] > max_peak:
        out["skipped"] = f"planned peak {out['peak'] / 2**30:.1f} GiB > --max-peak-gib"
        return out
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    out["run_s"] = statistics.median(times)
    return out


def fmt_mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores, {cpu}"
    )


HEADER = (
    "| preset | T | dk (mem) | dv | impl | compile s | fwd+bwd ms | tokens/s | peak MiB "
    "| xla/scan |"
)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    p.add_argument("--lengths", default="2048,8192", help="comma-separated sequence lengths T")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="q/k/v head dim (non-poly presets)")
    p.add_argument("--poly-head-dim", type=int, default=16, help="q/k/v head dim, poly presets")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", default="xla,scan")
    p.add_argument("--skip-scan-above", type=int, default=8192, help="no scan for T above this")
    p.add_argument(
        "--scan-budget",
        type=float,
        default=None,
        help="skip scan at a length predicted (linearly from the previous length) "
        "to take more than this many seconds for warm-up + repeats",
    )
    p.add_argument(
        "--max-peak-gib",
        type=float,
        default=12.0,
        help="do not run an executable whose planned peak memory exceeds this",
    )
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: T=64, presets {','.join(QUICK_PRESETS)}, 1 repeat",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.presets, a.lengths, a.repeats = ",".join(QUICK_PRESETS), "64", 1
    presets = [s for s in a.presets.split(",") if s]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        p.error(f"unknown preset(s) {unknown}; valid: {list(PRESETS)}")
    lengths = [int(s) for s in a.lengths.split(",") if s]
    impls = [s for s in a.impls.split(",") if s]
    max_peak = None if a.max_peak_gib <= 0 else a.max_peak_gib * 2**30

    poly = [n for n in presets if PRESETS[n].feature_map == "poly"]
    lines = [
        f"backend: {machine()}; load average at start {os.getloadavg()[0]:.2f}",
        f"B={a.batch} H={a.heads} head_dim={a.head_dim} C={a.chunk} repeats={a.repeats} "
        f"(median) impls={','.join(impls)} skip_scan_above={a.skip_scan_above}"
        + (f" scan_budget={a.scan_budget:g}s" if a.scan_budget else ""),
    ]
    if poly:
        lines.append(
            f"poly presets ({', '.join(poly)}) use head_dim={a.poly_head_dim}: memory key dim "
            f"poly_dim({a.poly_head_dim}) = {poly_dim(a.poly_head_dim)} "
            f"(poly_dim({a.head_dim}) would be {poly_dim(a.head_dim)})"
        )
    lines += [
        "fwd+bwd = jit(grad(sum(y^2)) wrt q, k, v, params); peak = XLA's plan "
        "(temp + arguments + outputs)",
        "",
        HEADER,
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for line in lines:
        print(line, flush=True)

    rows: list[dict[str, Any]] = []
    for name in presets:
        d = a.poly_head_dim if name in poly else a.head_dim
        prev_scan: tuple[int, float] | None = None  # (T, per-run seconds) of the last scan run
        for T in lengths:
            mem, q, k, v, gates = build(name, T=T, H=a.heads, d=d, chunk=a.chunk, batch=a.batch)
            args = (q, k, v, mem._params(), gates)
            res: dict[str, dict[str, Any]] = {}
            for impl in impls:
                row = {"preset": name, "T": T, "dk": mem.dk, "dv": mem.dv, "impl": impl}
                skip = None
                if impl == "scan" and a.skip_scan_above < T:
                    skip = f"T > --skip-scan-above {a.skip_scan_above}"
                elif impl == "scan" and a.scan_budget and prev_scan is not None:
                    est = prev_scan[1] * T / prev_scan[0] * (a.repeats + 1)
                    if est > a.scan_budget:
                        skip = f"predicted {est:,.0f} s > --scan-budget {a.scan_budget:g} s"
                if skip is None:
                    row.update(measure(make_fwd_bwd(mem, gates, impl), args, a.repeats, max_peak))
                else:
                    row["skipped"] = skip
                if "run_s" in row:
                    row["tokens_per_s"] = a.batch * T / row["run_s"]
                    if impl == "scan":
                        prev_scan = (T, row["run_s"])
                res[impl] = row
                rows.append(row)
            ratio = None
            if "tokens_per_s" in res.get("xla", {}) and "tokens_per_s" in res.get("scan", {}):
                ratio = res["xla"]["tokens_per_s"] / res["scan"]["tokens_per_s"]
            for impl in impls:
                r = res[impl]
                r["ratio"] = ratio
                comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
                if "run_s" in r:
                    ms, tps = f"{r['run_s'] * 1e3:,.1f}", f"{r['tokens_per_s']:,.0f}"
                else:
                    ms, tps = "-", f"skipped ({r['skipped']})"
                rat = f"{ratio:.2f}x" if ratio is not None and impl == "xla" else ""
                line = (
                    f"| {name} | {T} | {r['dk']} | {r['dv']} | {impl} | {comp} | {ms} | {tps} "
                    f"| {fmt_mib(r.get('peak'))} | {rat} |"
                )
                print(line, flush=True)
                lines.append(line)
    lines += ["", f"load average at end {os.getloadavg()[0]:.2f}"]
    if a.out:
        cmd = " ".join(
            ["python", os.path.relpath(__file__)] + list(sys.argv[1:] if argv is None else argv)
        )
        stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        with open(a.out, "w") as f:
            f.write(f"# Gradient-memory fwd+bwd benchmark\n\n`{cmd}`\n\n")
            f.write(f"finished {stamp}, jax {jax.__version__}\n\n")
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
