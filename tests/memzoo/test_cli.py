"""The command line: config errors are one line with exit 2 (no traceback), `models` lists every
model file, `eval` of a missing run fails in one line, and a tiny `train` run can be evaluated
(held-out bpb and a sample) and continued with `generate`.

Subprocesses run ``python -m memzoo.cli`` on CPU and share a JAX compilation cache, so the eval
process loads the eval step the train process compiled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_runs import QUICKSTART, REPO, TINY_DATA, TINY_HYBRID

from memzoo.cli import main
from memzoo.config import config_from_dict

TINY = [*TINY_HYBRID, *TINY_DATA, "optim.warmup_steps=1", "steps=3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def run_cli(*args, cwd, cache_dir=None, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "memzoo.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, cache_dir):
    """`memzoo train` of a 3-step tiny run; returns its run directory."""
    out = tmp_path_factory.mktemp("cli_runs")
    proc = run_cli("train", QUICKSTART, *TINY, f"output_dir={out}", cwd=out, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = out / "quickstart"
    assert Path(summary["run_dir"]) == run_dir
    assert summary["final_step"] == 3
    assert summary["heldout_bpb"] > 0
    return run_dir


# ----------------------------------------------------------------------------- errors


def test_config_unknown_key_exits_2_in_one_line(tmp_path):
    proc = run_cli("config", QUICKSTART, "model.d_modle=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "memzoo: error: unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"
    ]
    assert proc.stdout == ""


def test_eval_missing_run_fails_in_one_line(tmp_path):
    proc = run_cli("eval", tmp_path / "no_such_run", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("memzoo: error: ")
    assert "no_such_run" in lines[0] and "not a memzoo run directory" in lines[0]


def test_config_prints_resolved_config(capsys):
    assert main(["config", str(QUICKSTART), "steps=7", "model=gla"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = config_from_dict(printed)
    assert cfg.steps == 7 and cfg.model.memory == "gla" and cfg.run_name == "quickstart"


def test_models_lists_every_model_file(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    expected = sorted(p.stem for p in (REPO / "configs" / "models").glob("*.yaml"))
    assert names == expected
    for line in out.splitlines():
        name = line.split()[0]
        sizes = yaml.safe_load((REPO / "configs" / "models" / f"{name}.yaml").read_text())["sizes"]
        assert "sizes: " + ", ".join(sizes) in line


# ----------------------------------------------------------------------------- trained run


def test_eval_prints_bpb_and_sample(cli_run, cache_dir, tmp_path):
    out_json = tmp_path / "eval.json"
    proc = run_cli(
        "eval",
        cli_run,
        "--batches",
        1,
        "--max-new-tokens",
        8,
        "--json",
        out_json,
        cwd=tmp_path,
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"{cli_run} @ step 3: heldout_loss " in proc.stdout
    assert "heldout_bpb " in proc.stdout
    assert "sample:\n" in proc.stdout
    result = json.loads(out_json.read_text())
    assert result["step"] == 3 and result["heldout_bpb"] > 0 and result["heldout_tokens"] > 0
    # the sample continues the run's configured prompt
    prompt = yaml.safe_load((cli_run / "config.yaml").read_text())["sample"]["prompt"]
    assert result["sample"].startswith(prompt)
    assert len(result["sample"]) > len(prompt)
    assert proc.stdout.rstrip("\n").endswith(result["sample"].rstrip("\n"))


def test_generate_and_eval_errors_on_trained_run(cli_run, capsys):
    # a missing step: one-line error, exit 1
    assert main(["eval", str(cli_run), "--step", "99", "--max-new-tokens", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memzoo: error: no checkpoint for step 99")
    assert "available: [3]" in err[0]

    assert main(["generate", str(cli_run), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ")


def test_train_refuses_a_different_model_in_an_existing_run(cli_run, capsys):
    args = ["train", str(QUICKSTART), *TINY, f"output_dir={cli_run.parent}", "model.d_model=64"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("memzoo: error: run 'quickstart' already exists")
    assert "model.d_model" in err[-1]
