"""On-chip memory footprint of every Pallas kernel at its default blocks, for the table in
pallas_kernels/README.md: TPU VMEM per kernel pass (blocks double-buffered and tile-padded,
plus scratch; Mosaic's own temporaries come on top) and the GPU per-program working set, at
head dims 64/128/256 (and beyond, to show where each stops fitting).

    python experiments/kernel_footprint.py                 # bf16, chunk 64
    python experiments/kernel_footprint.py --chunk 128 --itemsize 4

The figures are analytic (the kernels' own ``vmem_bytes`` / ``smem_bytes``); libtpu's
``memory_analysis()`` does not report VMEM. Limits: TPU scoped VMEM defaults of 16 MiB (v5e)
and 32 MiB (v6e; 128 MiB physical on both); GPU shared memory 228 KiB per SM (H100).
"""

from __future__ import annotations

import argparse

from pallas_kernels.kernels import delta_rule_gpu, delta_rule_tpu, gla_tpu, gradient_memory_tpu

MIB = 2**20
V5E_SCOPED, V6E_SCOPED = 16 * MIB, 32 * MIB


def tpu_rows(d: int, chunk: int, itemsize: int) -> dict[str, dict[str, int]]:
    """{kernel: {pass: bytes}} at head dim d (dk = dv = d), default blocks, segment ids on."""
    out: dict[str, dict[str, int]] = {}
    for mode in ("none", "scalar", "channel"):
        out[f"gla ({mode})"] = gla_tpu.vmem_bytes(d, d, chunk, itemsize, mode=mode, seg=True)
    dr = delta_rule_tpu.vmem_bytes(d, d, chunk, itemsize)
    out["delta_rule"] = {
        "forward": dr["fwd_blocks"],
        "backward": dr["bwd_blocks"],
        "+temporaries": dr["temporaries_estimate"],
    }
    for arch in ("linear", "mlp"):
        kw = dict(chunk=chunk, itemsize=itemsize, momentum=True, seg=True, arch=arch)
        try:
            out[f"gradient_memory ({arch})"] = {
                "forward": gradient_memory_tpu.vmem_bytes(d, d, **kw),
                "backward": gradient_memory_tpu.vmem_bytes(d, d, backward=True, **kw),
            }
        except (TypeError, ValueError, NotImplementedError):  # arch without a kernel
            continue
    return out


def fits(nbytes: int) -> str:
    if nbytes <= V5E_SCOPED:
        return ""
    if nbytes <= V6E_SCOPED:
        return " (> v5e scoped)"
    return " (> v6e scoped)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--itemsize", type=int, default=2, help="input bytes: 2 = bf16, 4 = fp32")
    p.add_argument("--dims", default="64,128,256")
    a = p.parse_args(argv)
    dims = [int(x) for x in a.dims.split(",")]
    tables = {d: tpu_rows(d, a.chunk, a.itemsize) for d in dims}
    print(f"TPU VMEM in MiB (chunk {a.chunk}, {'bf16' if a.itemsize == 2 else 'fp32'} inputs)\n")
    print("| kernel | pass | " + " | ".join(f"d={d}" for d in dims) + " |")
    print("|---|---|" + "---:|" * len(dims))
    for kernel, passes in tables[dims[0]].items():
        for name in passes:
            cells = []
            for d in dims:
                b = tables[d].get(kernel, {}).get(name)
                cells.append("-" if b is None else f"{b / MIB:.2f}{fits(b)}")
            print(f"| {kernel} | {name} | " + " | ".join(cells) + " |")
    print("\nLargest power-of-two head dim whose every pass fits 16 MiB (v5e scoped VMEM):\n")
    for kernel in tables[dims[0]]:
        best = None
        for d in (64, 128, 256, 512, 1024, 2048):
            rows = tpu_rows(d, a.chunk, a.itemsize).get(kernel)
            if rows is None or max(rows.values()) > V5E_SCOPED:
                break
            best = d
        print(f"- {kernel}: {best}")
    print(f"\nGPU delta_rule per program, KiB (chunk {a.chunk}): resident / all tiles live\n")
    print("| d | forward | backward |\n|---:|---:|---:|")
    for d in dims:
        s = delta_rule_gpu.smem_bytes(d, d, a.chunk, a.itemsize)
        print(
            f"| {d} | {s['min_fwd'] / 1024:.0f} / {s['fwd'] / 1024:.0f} | "
            f"{s['min_bwd'] / 1024:.0f} / {s['bwd'] / 1024:.0f} |"
        )


if __name__ == "__main__":
    main()
