"""Markdown table of the pod compile reports written by ``experiments/compile_pods.sh``.

    python experiments/pod_compile_table.py [REPORT_DIR]   # default experiments/results/pod_compile

One row per ``memzoo compile --json`` report, ordered by size, family and topology; pairs with no
report yet are listed as not compiled (their log says why when a compile failed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SIZES = ("170m", "340m", "760m", "1.3b")
FAMILIES = ("titans_mac", "hybrid_gdn", "mom")
TOPOLOGIES = ("v5e:16x16", "v5p:4x4x4")
GIB = 1024**3


def row(r: dict) -> str:
    """One table row; a report of a step that does not fit has no roofline, and one where the
    TPU compiler itself ran out of memory has no memory analysis either (its error instead)."""
    fits = "yes" if r.get("fits") else "**no**"
    where = f"{r['topology']} ({r['devices']} chips)"
    m = r.get("memory_per_device")
    if m:
        mem = (
            f"{m['total'] / GIB:.2f} of {r['chip']['hbm_gib']} GiB "
            f"({100 * r['hbm_fraction']:.1f}%); temps {m['temps'] / GIB:.2f}, "
            f"code {m['code'] / GIB:.2f}"
        )
    else:
        mem = "TPU compiler: " + r.get("compiler_error", "no memory analysis")[:120].replace(
            "|", "/"
        )
    roof, fl = r.get("roofline"), r.get("flops")
    if roof and fl:
        flops = (
            f"{fl['xla_total'] / 1e12:,.0f} / {fl['traced_matmul_total'] / 1e12:,.0f} "
            f"/ {fl['model_per_step'] / 1e12:,.0f}"
        )
        step, mfu = f"{1e3 * roof['step_s']:.1f} ms ({roof['bound']})", f"{100 * r['mfu']:.1f}%"
    else:
        flops = step = mfu = "–"
    compile_s = (r.get("seconds") or {}).get("compile")
    took = f"{compile_s:.0f} s" if compile_s is not None else "–"
    return (
        f"| {r['config']} | {where} | {fits} | {mem} | {flops} | {step} | {mfu} "
        f"| {r['params'] / 1e6:,.0f}M | {took} |"
    )


def table(report_dir: Path) -> str:
    lines = [
        "| config | topology | fits | memory per device (total of HBM; temps, code GiB) "
        "| TFLOP/step: XLA / traced matmuls / model | roofline step | MFU | params "
        "| compile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    missing = []
    for size in SIZES:
        for family in FAMILIES:
            for topo in TOPOLOGIES:
                name = f"{family}_{size}_{topo.replace(':', '_')}"
                path = report_dir / f"{name}.json"
                if path.exists():
                    lines.append(row(json.loads(path.read_text())))
                else:
                    missing.append(f"{family} {size} on {topo}")
    if missing:
        lines += ["", "Not compiled yet: " + "; ".join(missing) + "."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    report_dir = Path(argv[0] if argv else "experiments/results/pod_compile")
    if not report_dir.is_dir():
        print(f"error: no report directory {report_dir}", file=sys.stderr)
        return 2
    print(table(report_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
