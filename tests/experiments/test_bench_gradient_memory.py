"""Smoke test of experiments/bench_gradient_memory.py (its --quick run)."""

from __future__ import annotations

from experiment_scripts import load_script


def test_quick_run_prints_a_row_per_preset_and_impl(capsys, tmp_path):
    bench = load_script("bench_gradient_memory")
    out = tmp_path / "table.md"
    rows = bench.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    presets = bench.QUICK_PRESETS
    assert {(r["preset"], r["impl"]) for r in rows} == {
        (p, i) for p in presets for i in ("xla", "scan")
    }
    for r in rows:
        assert r["T"] == 64 and r["tokens_per_s"] > 0 and r["compile_s"] > 0
    for p in presets:
        table_rows = [ln for ln in printed.splitlines() if ln.startswith(f"| {p} | 64 |")]
        assert len(table_rows) == 2
        for ln in table_rows:
            tokens_per_s = float(ln.split("|")[8].strip().replace(",", ""))
            assert tokens_per_s > 0
        xla_row = next(ln for ln in table_rows if "| xla |" in ln)
        assert xla_row.rstrip(" |").endswith("x")  # the xla/scan ratio
    written = out.read_text()
    assert "--quick" in written and all(f"| {p} | 64 |" in written for p in presets)
