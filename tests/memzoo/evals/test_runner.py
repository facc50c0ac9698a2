"""The eval runner on a tiny trained run: checkpoint-directory paths, the context helpers,
the plot helpers, and one-line errors (unknown task, unknown setting, missing run / step, a
config edited to no longer match the weights)."""

import json
import shutil

import numpy as np
import pytest
import yaml

from memzoo.cli import main
from memzoo.evals import EvalContext, EvalError, heatmap, line_plot, load_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("memzoo: error: ")
    return err[0]


def test_cli_checkpoint_dir_and_options_after_settings(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "3"
    copy = tmp_path / "ppl_step3.json"
    args = ["eval", "ppl", str(ckpt), "lengths=32", "--step", "3", "batches=1", "--json", copy]
    assert main([str(a) for a in args]) == 0
    assert "@ step 3" in capsys.readouterr().out
    rec = json.loads((tiny_run / "evals" / "ppl" / "results.json").read_text())
    assert rec["step"] == 3 and [c["length"] for c in rec["cells"]] == [32]
    assert json.loads(copy.read_text()) == rec


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    assert main(["eval", "pll", str(tiny_run)]) == 1
    line = one_error_line(capsys)
    assert "unknown eval task 'pll'" in line and "did you mean 'ppl'" in line

    assert main(["eval", "ppl", str(tiny_run), "lenghts=32"]) == 1
    line = one_error_line(capsys)
    assert "unknown ppl setting 'lenghts'" in line and "did you mean 'lengths'" in line

    assert main(["eval", "ppl", str(tiny_run), "batches=many"]) == 1
    assert "ppl setting 'batches' expects an integer" in one_error_line(capsys)

    assert main(["eval", "ppl", str(tmp_path / "no_such_run")]) == 1
    line = one_error_line(capsys)
    assert "no_such_run" in line and "not a memzoo run directory" in line

    assert main(["eval", "ppl", str(tiny_run), "--step", "99"]) == 1
    line = one_error_line(capsys)
    assert "no checkpoint for step 99" in line and "available: [3]" in line

    assert main(["eval", "ppl", str(tiny_run / "checkpoints" / "3"), "--step", "2"]) == 1
    assert "checkpoint of step 3" in one_error_line(capsys)

    assert main(["eval", "ppl"]) == 1
    assert "needs a RUN_DIR" in one_error_line(capsys)


def test_edited_model_config_is_a_one_line_mismatch_error(tiny_run, tmp_path, capsys):
    run = tmp_path / "edited"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["d_model"] = 48
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", "ppl", str(run), "lengths=32"]) == 1
    line = one_error_line(capsys)
    assert f"the model in {run}/config.yaml does not match the saved weights" in line


def test_missing_task_module_is_named(monkeypatch):
    import memzoo.evals.runner as runner

    monkeypatch.setattr(runner, "TASKS", (*runner.TASKS, "nosuchtask"))
    with pytest.raises(EvalError, match="memzoo/evals/nosuchtask.py is missing"):
        load_task("nosuchtask")


def test_context_helpers(tiny_run):
    from memzoo.evals.runner import load_run

    model, cfg, run_dir = load_run(tiny_run)
    from memzoo.data import build_tokenizer

    ctx = EvalContext(model, cfg, build_tokenizer(cfg.data), run_dir, model.restored_step)
    ids = ctx.encode("def f():")
    assert ids == list(b"def f():")
    logits = ctx.logits(np.asarray([ids, ids], np.int32))
    assert logits.shape == (2, len(ids), cfg.model.vocab_size) and logits.dtype == np.float32
    gen = ctx.generate([ids, ids, ids], 3, batch_size=2)
    assert len(gen) == 3 and all(len(g) == 3 for g in gen) and gen[0] == gen[2]
    # greedy decoding continues with the argmax of the full forward's last logits
    assert gen[0][0] == int(np.argmax(logits[0, -1]))


def test_plot_helpers_write_pngs(tmp_path):
    p = heatmap(
        [[0.0, 0.5], [1.0, np.nan]], [0, 50], [64, 128], "t", tmp_path / "h.png", vmin=0, vmax=1
    )
    q = line_plot([1, 2, 4], {"a": [3, 2, 1]}, "x", "y", "t", tmp_path / "l.png", vline=2)
    for path in (p, q):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 500
