"""The ppl task on a tiny trained run (seq_len 32): results.json / table.md / PNG, the
extrapolation flags, typed settings, and `memzoo eval ppl RUN lengths=...` printing the table."""

import json

import numpy as np
import pytest

from memzoo.cli import main
from memzoo.evals import EvalError, load_task, parse_settings
from memzoo.evals.runner import run_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_runner_writes_results_table_and_plot(tiny_run):
    res = run_eval("ppl", tiny_run, ["lengths=16,32,64", "batches=1", "batch_size=2"])
    out = tiny_run / "evals" / "ppl"
    rec = json.loads((out / "results.json").read_text())
    assert rec["task"] == "ppl" and rec["step"] == 3 and rec["run_dir"] == str(tiny_run)
    assert rec["settings"] == {"lengths": "16,32,64", "batches": 1, "batch_size": 2}
    assert [c["length"] for c in rec["cells"]] == [16, 32, 64]
    assert [c["extrapolation"] for c in rec["cells"]] == [False, False, True]  # trained at 32
    for c in rec["cells"]:
        assert c["loss"] > 0 and c["bpb"] > 0 and c["tokens"] > 0
        assert c["ppl"] == pytest.approx(np.exp(c["loss"]))
    table = (out / "table.md").read_text()
    assert table.startswith("| length | train_len ratio | loss | ppl | bpb |")
    assert len(table.strip().splitlines()) == 5 and "64 (extrapolation)" in table
    png = out / "ppl_vs_length.png"
    assert res["plots"] == [str(png)]
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_cli_eval_task_prints_table(tiny_run, capsys):
    args = ["eval", "ppl", str(tiny_run), "lengths=32,64", "batches=1", "batch_size=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| length | train_len ratio | loss | ppl | bpb |" in out
    assert "| 32 | 1.00 |" in out and "| 64 (extrapolation) | 2.00 |" in out


def test_settings_are_typed():
    ppl = load_task("ppl")
    s = parse_settings(ppl, ["lengths=128", "batches=2"])
    assert s.lengths == "128" and s.batches == 2
    assert [c["length"] for c in ppl.cells(parse_settings(ppl, ["lengths=8, 16"]))] == [8, 16]
    with pytest.raises(EvalError, match="expects integers"):
        ppl.cells(parse_settings(ppl, ["lengths=a,b"]))
