"""Sweeps: expansion and naming, bad sweep files, the shipped sweeps, skip / resume / failure,
a tiny 2-run sweep end to end, and the report's plots."""

import csv
import json
import time
from pathlib import Path

import pytest
import yaml
from tiny_runs import REPO

from memzoo.sweep import runner as sweep_runner
from memzoo.sweep.report import (
    _stopped,
    build_report,
    flatten_eval,
    loss_curve_panels,
    niah_panels,
    series_styles,
)
from memzoo.sweep.spec import SweepError, expand, format_number, load_sweep, parse_sweep

MQAR_TINY = str(REPO / "configs" / "train" / "mqar_tiny.yaml")
SHIPPED = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))

# A tiny attention model on MQAR: a run is a few seconds on 2 CPU cores.
TINY = [
    "steps=4",
    "batch_size=4",
    "seq_len=32",
    "data.mqar_passes=1",
    "model.n_layers=1",
    "model.attn_heads=2",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "train.eval_batches=1",
    "train.progress=false",
]
TINY_MQAR_EVAL = {
    "task": "mqar",
    "overrides": ["seq_lens={seq_len}", "num_pairs=4", "samples=8", "batch_size=8"],
}


def _sweep(**kw):
    data = {"name": "t", "base": MQAR_TINY, **kw}
    return parse_sweep(data)


# ----------------------------------------------------------------------------- expansion


def test_grid_expansion_names_are_deterministic_unique_and_say_the_settings(tmp_path):
    sweep = _sweep(
        evals=[
            {"task": "mqar", "overrides": ["seq_lens={seq_len}"]},
            {"task": "niah", "when": {"data.source": ["stdlib", "text"]}},
        ],
        overrides=["model.n_layers=2"],
        grid={
            "model": ["gla", "transformer"],
            "model.d_model": [64, 128],
            "length": [
                {"seq_len": 64, "data.mqar_num_pairs": 4},
                {"seq_len": 128, "data.mqar_num_pairs": 8},
            ],
        },
    )
    runs = expand(sweep, tmp_path)
    names = [r.name for r in runs]
    assert len(names) == 8 and len(set(names)) == 8
    assert names[:3] == ["gla_d64_T64_kv4", "gla_d64_T128_kv8", "gla_d128_T64_kv4"]
    assert names == [r.name for r in expand(sweep, tmp_path)]  # deterministic
    r = runs[1]
    assert r.settings == {
        "model": "gla",
        "model.d_model": 64,
        "seq_len": 128,
        "data.mqar_num_pairs": 8,
    }
    assert r.cfg.model.memory == "gla" and r.cfg.model.n_layers == 2 and r.cfg.seq_len == 128
    assert r.cfg.run_dir == tmp_path / "t" / "runs" / "gla_d64_T128_kv8"
    assert r.overrides[0] == "model.n_layers=2" and "model=gla" in r.overrides
    assert sweep.setting_keys() == ["model", "model.d_model", "seq_len", "data.mqar_num_pairs"]
    mqar, niah = sweep.evals
    assert mqar.applies(r.cfg) and not niah.applies(r.cfg)  # `when`: MQAR runs get no NIAH
    assert mqar.resolved_overrides(r.cfg) == ["seq_lens=128"]
    assert sweep.select.metric == "mqar.accuracy" and sweep.select.mode == "max"


def test_lr_sweep_suffix_patterns_runs_times_grid_and_collisions(tmp_path):
    sweep = _sweep(
        runs=[
            {"model.pattern": "MMMA", "model.n_layers": 4},
            {"model.pattern": "A", "model.n_layers": 2, "_name": "attn"},
        ],
        grid={"model.d_model": [32]},
        lr_sweep=["1e-3", 3e-3, 0.01],
    )
    runs = expand(sweep, tmp_path)
    assert [r.name for r in runs] == [
        "p3M1A_L4_d32_lr1e-3",
        "p3M1A_L4_d32_lr3e-3",
        "p3M1A_L4_d32_lr1e-2",
        "attn_d32_lr1e-3",
        "attn_d32_lr3e-3",
        "attn_d32_lr1e-2",
    ]
    assert {r.cell for r in runs} == {"p3M1A_L4_d32", "attn_d32"}
    assert runs[1].cfg.optim.lr == pytest.approx(3e-3) and runs[1].lr == pytest.approx(3e-3)
    assert runs[1].settings["optim.lr"] == pytest.approx(3e-3)
    assert sweep.select.metric == "heldout_loss" and sweep.select.mode == "min"
    assert [format_number(x) for x in (3e-4, 0.5, 128, 2.5e-3, 1.0)] == [
        "3e-4",
        "0.5",
        "128",
        "2.5e-3",
        "1",
    ]
    # different settings with equal name parts get a hash; equal settings are an error
    twins = _sweep(runs=[{"model.gm_eta_max": 0.5}, {"model.gm_eta_max": "0.5"}])
    names = [r.name for r in expand(twins, tmp_path, validate=False)]
    assert len(set(names)) == 2 and all(n.startswith("eta_max-0.5-") for n in names)
    with pytest.raises(SweepError, match="same settings"):
        expand(_sweep(runs=[{"seq_len": 64}, {"seq_len": 64}]), tmp_path, validate=False)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"gird": {"seq_len": [64]}}, "unknown key 'gird' (did you mean 'grid'?)"),
        ({"grid": {}}, "grid must be a non-empty mapping"),
        ({"grid": {"seq_len": []}}, "grid.seq_len is an empty list"),
        ({"overrides": ["steps=3"]}, "no runs"),
        ({"runs": [{"run_name": "x"}]}, "'run_name' is set by the sweep itself"),
        ({"grid": {"seq_len": [64]}, "lr_sweep": [0]}, "lr_sweep value 0 must be > 0"),
        ({"grid": {"seq_len": [64]}, "evals": [{"task": "mqr"}]}, "did you mean 'mqar'"),
        (
            {"grid": {"seq_len": [64]}, "select": {"metric": "mqar.accuracy"}},
            "select.metric 'mqar.accuracy' is neither",
        ),
        ({"grid": {"seq_len": [64]}, "base": "nope.yaml"}, "base config 'nope.yaml' not found"),
        ({"grid": {"model.d_modle": [64]}}, "did you mean 'model.d_model'"),
        ({"grid": {"model.d_model": [62]}}, "run d62: model.num_heads=4 does not divide"),
        (
            {"grid": {"seq_len": [64]}, "evals": [{"task": "mqar", "overrides": ["sampels=3"]}]},
            "eval mqar: unknown mqar setting 'sampels'",
        ),
        (
            {"grid": {"seq_len": [64]}, "evals": [{"task": "mqar", "overrides": ["x={nope}"]}]},
            "names 'nope' which is not a config key",
        ),
    ],
)
def test_bad_sweep_files_are_one_line_errors(tmp_path, data, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": MQAR_TINY, **data}, sort_keys=False))
    with pytest.raises(SweepError) as e:
        expand(load_sweep(path), tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_sweeps_expand_and_validate(path, tmp_path):
    lines = sweep_runner.dry_run_lines(load_sweep(path), tmp_path)
    assert lines[-1].startswith("all ") and lines[-1].endswith("run configs validated")
    names = [ln.split("] ", 1)[1].split()[0] for ln in lines if ln.startswith("[")]
    assert len(names) == len(set(names)) > 1


def test_shipped_sweep_set():
    assert {p.stem for p in SHIPPED} >= {
        "mqar_zoo",
        "mqar_zoo_cluster",
        "hybrid_ratio",
        "titans_ablation",
    }
    zoo = load_sweep(REPO / "configs" / "sweeps" / "mqar_zoo.yaml")
    from memzoo.config import available_models

    models = {v.get("model") for axis, vals in zoo.axes if axis == "model" for v in vals}
    assert models == set(available_models())


def test_titans_mac_stability_reruns_mqar_zoo_cells_with_one_setting_changed(tmp_path):
    """Its rows are read against mqar_zoo's rows of the same cell: each run differs from that
    row in exactly the one setting its name says."""

    def settings(run):
        flat = sweep_runner.flat_config(run.cfg.to_dict())
        return {k: v for k, v in flat.items() if k not in ("run_name", "output_dir")}

    sweeps = REPO / "configs" / "sweeps"
    zoo = {r.name: r for r in expand(load_sweep(sweeps / "mqar_zoo.yaml"), tmp_path)}
    runs = expand(load_sweep(sweeps / "titans_mac_stability.yaml"), tmp_path)
    expected = {
        "titans_mac_d128_T128_kv8_eta_max-0.1": {"model.gm_eta_max": (None, 0.1)},
        "titans_mac_d64_T256_kv16_eta_max-0.1": {"model.gm_eta_max": (None, 0.1)},
        "titans_mac_d64_T256_kv16_algorithm-gd": {"model.gm_algorithm": (None, "gd")},
        "titans_mac_d64_T256_kv16_lr1e-3": {"optim.lr": (0.003, 0.001)},
        "titans_mac_d64_T256_kv16_titans_segment-256": {"model.titans_segment": (64, 256)},
        "titans_mac_d64_T256_kv16_titans_detach-true": {"model.titans_detach": (False, True)},
        "titans_mac_d128_T128_kv8_titans_detach-true": {"model.titans_detach": (False, True)},
    }
    assert [r.name for r in runs] == list(expected)
    for run in runs:
        cell = "_".join(run.name.split("_")[:5])  # titans_mac_dD_TT_kvK
        mine, theirs = settings(run), settings(zoo[cell])
        changed = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        assert changed == expected[run.name], run.name


def test_print_commands_one_line_per_run(tmp_path, capsys):
    from memzoo.sweep.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "cmds",
                "base": MQAR_TINY,
                "grid": {"model": ["gla", "transformer"]},
                "evals": [{**TINY_MQAR_EVAL, "name": "recall"}],
            },
            sort_keys=False,
        )
    )
    assert main(["sweep", str(path), "--print-commands", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("memzoo train ") and "model=gla" in lines[0]
    run_dir = f"{tmp_path}/cmds/runs/gla"
    assert f"output_dir={tmp_path}/cmds/runs run_name=gla && " in lines[0]
    assert f"&& memzoo eval mqar {run_dir} seq_lens=64 num_pairs=4" in lines[0]
    assert lines[0].endswith(f"&& mv {run_dir}/evals/mqar {run_dir}/evals/recall")
    assert (tmp_path / "cmds" / "sweep.yaml").is_file()  # for `memzoo report` afterwards


def test_only_narrows_dry_run_and_print_commands_and_rejects_unknown_names(tmp_path, capsys):
    from memzoo.sweep.cli import main

    path = tmp_path / "s.yaml"
    grid = {"model": ["gla", "transformer", "deltanet"]}
    path.write_text(yaml.safe_dump({"name": "o", "base": MQAR_TINY, "grid": grid}))
    root = ["--root", str(tmp_path)]

    assert main(["sweep", str(path), "--dry-run", "--only", "deltanet,gla", *root]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sweep o: 2 of 3 runs -> ")
    assert [ln.split()[:2] for ln in out if ln.startswith("[")] == [
        ["[1/3]", "gla"],
        ["[3/3]", "deltanet"],
    ]
    assert main(["sweep", str(path), "--print-commands", "--only", "transformer", *root]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "model=transformer" in lines[0]

    for flag in ("--dry-run", "--print-commands"):
        assert main(["sweep", str(path), flag, "--only", "gla_d64", *root]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "no run named 'gla_d64' in this sweep" in captured.err


# ----------------------------------------------------------------------------- running


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    sweep = _sweep(overrides=TINY, grid={"model.d_model": [16, 32, 64]})
    trained = []

    def fake_train(cfg):
        if cfg.model.d_model == 32:
            raise RuntimeError("out of memory\n(details)")
        trained.append(cfg.run_name)
        return {"start_step": 0, "final_step": cfg.steps, "losses": [1.0], "params": 123}

    monkeypatch.setattr(sweep_runner, "train_run", fake_train)
    msgs = []
    res = sweep_runner.run_sweep(sweep, tmp_path, say=msgs.append)
    assert trained == ["d16", "d64"]  # the run after the failure still ran
    assert res["failed"] == ["d32"] and res["counts"]["failed"] == 1
    status = json.loads((tmp_path / "t" / "status.json").read_text())["runs"]
    assert status["d32"]["status"] == "failed" and status["d32"]["stage"] == "train"
    assert status["d32"]["error"] == "RuntimeError: out of memory (details)"
    assert "Traceback" in status["d32"]["traceback"]
    assert status["d16"]["status"] == status["d64"]["status"] == "finished"
    assert any("[2/3] d32: FAILED (train)" in m for m in msgs)
    report = (tmp_path / "t" / "report.md").read_text()
    assert "## Failed runs" in report and "`d32`: RuntimeError: out of memory" in report


def test_a_failed_run_keeps_its_training_wall_time_and_record(tmp_path, monkeypatch):
    """A run that fails in training records the time it trained (added to an earlier
    session's), and one that fails in its evals keeps what its training recorded."""
    sweep = _sweep(overrides=TINY, grid={"model.d_model": [16, 32]}, evals=[TINY_MQAR_EVAL])
    sweep_dir = tmp_path / "t"
    resumed = sweep_dir / "runs" / "d32" / "checkpoints" / "2"  # an earlier session's step 2
    resumed.mkdir(parents=True)
    sweep_runner.update_status(sweep_dir, "d32", status="interrupted", train_wall_s=100.0)

    def fake_train(cfg):
        time.sleep(0.05)
        if cfg.model.d_model == 32:
            raise FloatingPointError("non-finite gradient at step 3")
        return {"start_step": 0, "final_step": cfg.steps, "losses": [1.0], "params": 123}

    def failing_eval(task, run_dir, overrides):
        raise RuntimeError("eval broke")

    monkeypatch.setattr(sweep_runner, "train_run", fake_train)
    monkeypatch.setattr(sweep_runner, "eval_run", failing_eval)
    res = sweep_runner.run_sweep(sweep, tmp_path, say=lambda m: None, report=False)
    assert res["outcomes"] == {"d16": "failed", "d32": "failed"}
    status = json.loads((sweep_dir / "status.json").read_text())["runs"]
    d16, d32 = status["d16"], status["d32"]
    assert d32["stage"] == "train" and "non-finite gradient" in d32["error"]
    assert 100.05 <= d32["train_wall_s"] < 110
    assert d16["stage"] == "eval" and d16["error"] == "RuntimeError: eval broke"
    assert 0.05 <= d16["train_wall_s"] < 10
    assert (d16["params"], d16["start_step"], d16["final_step"]) == (123, 0, 4)


def test_tiny_sweep_end_to_end_resume_skip_and_report(tmp_path, monkeypatch):
    from memzoo.sweep.cli import main
    from memzoo.train.loop import train

    path = tmp_path / "tiny.yaml"
    spec = {
        "name": "tiny",
        "base": MQAR_TINY,
        "overrides": TINY,
        "grid": {"model.d_model": [16, 32]},
        "evals": [{**TINY_MQAR_EVAL, "name": "recall"}],  # results in evals/recall/
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep = load_sweep(path)
    root = tmp_path / "sweeps"
    first = expand(sweep, root)[0]
    # an interrupted run: stopped (checkpointed) at step 2 of 4
    assert train(first.cfg, stop_at=2)["interrupted"] == "stop_at"
    assert sweep_runner.latest_checkpoint(first.cfg.run_dir) == 2

    msgs = []
    res = sweep_runner.run_sweep(sweep, root, say=msgs.append)
    assert res["outcomes"] == {"d16": "trained", "d32": "trained"}, msgs
    assert any("[1/2] d16: resuming (step 2 -> 4)" in m for m in msgs)
    sweep_dir = root / "tiny"
    status = json.loads((sweep_dir / "status.json").read_text())["runs"]
    assert status["d16"]["start_step"] == 2 and status["d32"]["start_step"] == 0
    for name in ("d16", "d32"):
        run_dir = sweep_dir / "runs" / name
        assert sweep_runner.latest_checkpoint(run_dir) == 4
        assert json.loads((run_dir / "evals" / "recall" / "results.json").read_text())["step"] == 4
        assert not (run_dir / "evals" / "mqar").exists()

    # rerun: both are finished and evaluated, so nothing trains or evaluates
    def boom(*a, **k):
        raise AssertionError("should have been skipped")

    monkeypatch.setattr(sweep_runner, "train_run", boom)
    monkeypatch.setattr(sweep_runner, "eval_run", boom)
    msgs = []
    res = sweep_runner.run_sweep(sweep, root, say=msgs.append, report=False)
    assert res["outcomes"] == {"d16": "skipped", "d32": "skipped"} and not res["failed"]
    assert any("d32: evals: recall up to date" in m for m in msgs)

    # the sweep file edited after the runs trained: an error per run, not a silent mix
    edited = parse_sweep({**spec, "overrides": [*TINY, "optim.weight_decay=0.0"]}, path)
    res = sweep_runner.run_sweep(edited, root, say=msgs.append, report=False)
    assert res["failed"] == ["d16", "d32"]
    err = json.loads((sweep_dir / "status.json").read_text())["runs"]["d16"]["error"]
    assert "different config (differs in: optim.weight_decay)" in err
    sweep_runner.run_sweep(sweep, root, say=msgs.append, report=False)  # back to finished

    # the report, rebuilt by `memzoo report SWEEP_DIR`
    (sweep_dir / "report.md").unlink()
    assert main(["report", str(sweep_dir)]) == 0
    report = (sweep_dir / "report.md").read_text()
    assert "| d16 | 16 | finished |" in report and "recall.accuracy" in report
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["d16", "d32"]
    for r in rows:
        assert int(r["params"]) > 0 and int(r["tokens_seen"]) == 4 * 4 * 32
        assert float(r["final_loss"]) > 0 and float(r["heldout_loss"]) > 0
        assert 0 <= float(r["recall.accuracy"]) <= 1 and "recall.accuracy.T32.kv4" in r
        assert float(r["train_wall_s"]) > 0 and float(r["tokens_per_sec"]) > 0
    for png in ("accuracy_vs_width.png", "loss_curves.png"):
        assert (sweep_dir / "plots" / png).stat().st_size > 1000
        assert f"(plots/{png})" in report


# ----------------------------------------------------------------------------- report


def _fake_run(run_dir: Path, loss: float, acc: float, niah: float) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints" / "10").mkdir(parents=True)
    lines = [{"step": s, "loss": loss + 1 / s, "tokens_per_sec": 100.0, "tokens_seen": s * 8}
             for s in range(1, 11)]  # fmt: skip
    lines.append({"step": 10, "heldout_loss": loss, "heldout_bpb": loss / 0.69})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    mq = {"step": 10, "cells": [{"seq_len": 64, "num_pairs": 4, "accuracy": acc}]}
    cells = [
        {"length": n, "depth": d, "string_match": niah, "exact_match": niah / 2}
        for d in (0, 50, 100)
        for n in (128, 256)
    ]
    for task, rec in (("mqar", mq), ("niah", {"step": 10, "cells": cells})):
        (run_dir / "evals" / task).mkdir(parents=True)
        (run_dir / "evals" / task / "results.json").write_text(json.dumps(rec))


def test_report_plots_and_best_lr_from_run_files(tmp_path):
    spec = {
        "name": "fake",
        "grid": {
            "model": ["gla", "transformer"],
            "model.d_model": [64, 128],
            "length": [{"seq_len": 64, "data.mqar_num_pairs": 4}, {"seq_len": 128}],
        },
        "lr_sweep": [1e-3, 1e-2],
        "evals": [{"task": "mqar"}, {"task": "niah"}],
    }
    sweep_dir = tmp_path / "fake"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep = parse_sweep(spec)
    runs = expand(sweep, tmp_path, validate=False)
    assert len(runs) == 16
    status = {"runs": {}}
    for i, r in enumerate(runs):
        acc = 0.1 * (i % 4) + (0.5 if r.lr == 1e-2 else 0.0)
        _fake_run(sweep_dir / "runs" / r.name, 2.0 - acc, acc, acc)
        status["runs"][r.name] = {"status": "finished", "params": 1000 + i, "train_wall_s": 2.0}
    (sweep_dir / "status.json").write_text(json.dumps(status))
    out = build_report(sweep_dir)
    assert {p.name for p in out["plots"]} == {
        "accuracy_vs_width.png",
        "loss_curves.png",
        "niah_heatmaps.png",
    }
    best = {r["run"] for r in out["rows"] if r["best_lr"]}
    assert len(best) == 8 and all(n.endswith("_lr1e-2") for n in best)
    # the loss figure: a panel per width x length, a line per architecture in each
    panels = loss_curve_panels(sweep, [r for r in out["rows"] if r["best_lr"]])
    assert list(panels) == [f"model.d_model {d} seq_len {t}" for d in (64, 128) for t in (64, 128)]
    for title, members in panels.items():
        assert sorted(lab for lab, _ in members) == ["gla", "transformer"]
        d, t = (int(w) for w in title.split()[1::2])
        assert all(r["model.d_model"] == d and r["seq_len"] == t for _, r in members)
    report = (sweep_dir / "report.md").read_text()
    assert report.count("** ★ |") == 8 and "## Best learning rate per cell" in report
    assert "| **gla_d64_T64_kv4_lr1e-2** ★ |" in report
    with open(sweep_dir / "results.csv") as f:
        header = next(csv.reader(f))
    for col in ("mqar.accuracy.T64.kv4", "niah.string_match.L256.d50", "niah.exact_match"):
        assert col in header
    assert header[:6] == ["run", "model", "model.d_model", "seq_len", "data.mqar_num_pairs",
                          "optim.lr"]  # fmt: skip


def test_plots_say_where_a_run_stopped_and_which_step_an_eval_read(tmp_path):
    """An interrupted run's legend entry gives the step its curve reached (not only its
    ``steps`` setting), and a heatmap panel the checkpoint step its NIAH eval read."""
    spec = {
        "name": "st",
        "grid": {"model": ["gla", "transformer"], "steps": [10]},
        "evals": [{"task": "niah"}],
    }
    sweep_dir = tmp_path / "st"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep = parse_sweep(spec)
    gla, tf = (r.name for r in expand(sweep, tmp_path, validate=False))
    for name in (gla, tf):
        _fake_run(sweep_dir / "runs" / name, 2.0, 0.5, 0.5)
    (sweep_dir / "runs" / tf / "checkpoints" / "10").rename(
        sweep_dir / "runs" / tf / "checkpoints" / "6"
    )
    res = sweep_dir / "runs" / tf / "evals" / "niah" / "results.json"
    res.write_text(json.dumps({**json.loads(res.read_text()), "step": 4}))
    status = {"runs": {gla: {"status": "finished"}, tf: {"status": "interrupted"}}}
    (sweep_dir / "status.json").write_text(json.dumps(status))
    out = build_report(sweep_dir)
    assert "niah_heatmaps.png" in {p.name for p in out["plots"]}
    labels = [
        lab for members in loss_curve_panels(sweep, out["rows"]).values() for lab, _ in members
    ]
    assert labels == [gla, f"{tf} (to step 6)"]  # no panels: lines named by run
    # the loss figure passes each curve's last logged step, which can pass the last checkpoint
    # (a failed run logs steps after it) or stand where no checkpoint was written
    tf_row = next(r for r in out["rows"] if r["run"] == tf)
    assert _stopped({**tf_row, "_last_step": 8}) == " (to step 8)"
    assert _stopped({**tf_row, "final_step": None, "_last_step": 3}) == " (to step 3)"
    assert _stopped({**tf_row, "status": "finished", "_last_step": 8}) == ""
    titles = [t for t, *_ in niah_panels(sweep, out["rows"], sweep_dir)]
    assert titles == [f"{gla}\nat step 10", f"{tf}\nat step 4"]


def test_an_outer_lr_set_by_a_run_names_its_loss_curve_without_an_lr_sweep():
    """optim.lr is left out of the series labels only where lr_sweep picks it per cell; a
    setting only some runs change is named with its value."""
    spec = {
        "name": "lr",
        "runs": [
            {"model.d_model": 64, "model.gm_algorithm": "gd"},
            {"model.d_model": 64, "optim.lr": 0.001},
            {"model.d_model": 128, "model.gm_algorithm": "gd"},
        ],
    }
    rows = [
        {"run": "a", "model.d_model": 64, "model.gm_algorithm": "gd"},
        {"run": "b", "model.d_model": 64, "optim.lr": 0.001},
        {"run": "c", "model.d_model": 128, "model.gm_algorithm": "gd"},
    ]
    panels = loss_curve_panels(parse_sweep(spec), rows)
    assert {t: [lab for lab, _ in m] for t, m in panels.items()} == {
        "model.d_model 64": ["gm_algorithm=gd", "lr=0.001"],
        "model.d_model 128": ["gm_algorithm=gd"],
    }


def test_ablation_sweep_gets_accuracy_per_run_bars(tmp_path):
    """No width axis: the accuracy figure is a bar per run and eval cell, not Zoology's."""
    spec = {
        "name": "abl",
        "runs": [{"model": "titans_lmm"}, {"model": "titans_lmm", "model.chunk_size": 4}],
        "evals": [{"task": "mqar"}],
    }
    sweep_dir = tmp_path / "abl"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = expand(parse_sweep(spec), tmp_path, validate=False)
    for i, r in enumerate(runs):
        _fake_run(sweep_dir / "runs" / r.name, 2.0, 0.0, 0.0)
        cells = [{"seq_len": t, "num_pairs": t // 16, "accuracy": 0.2 * i + t / 1000}
                 for t in (128, 256)]  # fmt: skip
        res = sweep_dir / "runs" / r.name / "evals" / "mqar" / "results.json"
        res.write_text(json.dumps({"step": 10, "cells": cells}))
    stale = sweep_dir / "plots" / "accuracy_vs_width.png"  # from an earlier build
    stale.parent.mkdir()
    stale.write_bytes(b"old figure")
    mine = sweep_dir / "plots" / "notes.png"  # not a report figure: left alone
    mine.write_bytes(b"user file")
    out = build_report(sweep_dir)
    assert [p.name for p in out["plots"]] == ["accuracy_by_run.png", "loss_curves.png"]
    assert not stale.exists() and mine.exists()
    assert (sweep_dir / "plots" / "accuracy_by_run.png").stat().st_size > 1000
    assert "### Accuracy per run" in (sweep_dir / "report.md").read_text()
    row = out["rows"][1]
    assert row["mqar.accuracy.T256.kv16"] == pytest.approx(0.456)
    # no width or length axis: one panel, each line named by its run
    panels = loss_curve_panels(parse_sweep(spec), out["rows"])
    assert list(panels) == [""]
    assert [lab for lab, _ in panels[""]] == [r.name for r in runs]


def test_report_merges_rows_from_a_results_csv_and_another_sweep_dir(tmp_path):
    """``--merge``: a run not finished here takes its row from the first copy where it
    finished (a published results.csv, another machine's sweep directory)."""
    spec = {
        "name": "m",
        "grid": {"model": ["gla", "transformer", "retnet", "deltanet"]},
        "evals": [{"task": "mqar"}, {"task": "niah"}],
    }
    here, there = tmp_path / "here" / "m", tmp_path / "there" / "m"
    for d in (here, there):
        d.mkdir(parents=True)
        (d / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    gla, tf, ret, delta = (r.name for r in expand(parse_sweep(spec), tmp_path, validate=False))
    # earlier: gla, transformer, retnet finished; published as results.csv
    for i, name in enumerate((gla, tf, ret)):
        _fake_run(here / "runs" / name, 2.0, 0.1 * (i + 1), 0.5)
    (here / "status.json").write_text(json.dumps(
        {"runs": {n: {"status": "finished", "train_wall_s": 7.0} for n in (gla, tf, ret)}}
    ))  # fmt: skip
    build_report(here)
    published = tmp_path / "published.csv"
    published.write_bytes((here / "results.csv").read_bytes())
    # a fresh checkout: gla ran again here (finished), transformer was interrupted; deltanet
    # finished on another machine
    import shutil

    shutil.rmtree(here / "runs")
    _fake_run(here / "runs" / gla, 1.0, 0.9, 0.5)
    _fake_run(here / "runs" / tf, 3.0, 0.0, 0.5)
    (here / "status.json").write_text(json.dumps(
        {"runs": {gla: {"status": "finished"}, tf: {"status": "interrupted"}}}
    ))  # fmt: skip
    _fake_run(there / "runs" / delta, 1.5, 0.7, 0.25)
    (there / "status.json").write_text(json.dumps({"runs": {delta: {"status": "finished"}}}))

    with pytest.raises(SweepError, match="the results.csv this report rewrites"):
        build_report(here, merge=[here / "results.csv"])
    out = build_report(here, merge=[published, there])
    rows = {r["run"]: r for r in out["rows"]}
    assert rows[gla]["source"] == "" and rows[gla]["mqar.accuracy"] == pytest.approx(0.9)
    # finished in the csv beats interrupted here; its figures come back typed
    assert rows[tf]["source"] == str(published) and rows[tf]["status"] == "finished"
    assert rows[tf]["mqar.accuracy"] == pytest.approx(0.2)
    assert rows[tf]["train_wall_s"] == 7.0 and rows[tf]["final_step"] == 10
    assert rows[ret]["source"] == str(published) and rows[ret]["model"] == "retnet"
    assert rows[delta]["source"] == str(there) and rows[delta]["niah.string_match"] == 0.25
    assert [r["status"] for r in out["rows"]] == ["finished"] * 4
    with open(here / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert table[-1]["source"] == str(there) and table[0]["source"] == ""
    assert [r["run"] for r in table] == [gla, tf, ret, delta]
    report = (here / "report.md").read_text()
    assert f"2 from `{published}`, 1 from `{there}`" in report
    assert f"--merge {published} --merge {there}`" in report
    assert "4 runs (4 finished)" in report
    # curves and heatmaps from run directories (gla here, deltanet there); csv rows have none
    assert [r["run"] for r in out["rows"] if r["_dir"] is not None] == [gla, delta]
    assert {p.name for p in out["plots"]} == {
        "accuracy_by_run.png",
        "loss_curves.png",
        "niah_heatmaps.png",
    }

    # --publish: the report plus the records of runs with a directory; a fresh checkout that
    # merges the published directory gets every row back, and the curves of those runs
    pub = tmp_path / "experiments" / "m"
    before = {
        r["run"]: r for r in build_report(here, merge=[published, there], publish_to=pub)["rows"]
    }
    assert sorted(p.name for p in pub.iterdir()) == [
        "plots", "report.md", "results.csv", "runs", "status.json", "sweep.yaml"
    ]  # fmt: skip
    assert sorted(p.name for p in (pub / "runs").iterdir()) == [delta, gla]
    records = [
        p.relative_to(pub / "runs" / gla).as_posix() for p in (pub / "runs" / gla).rglob("*.*")
    ]
    assert sorted(records) == [
        "evals/mqar/results.json",
        "evals/niah/results.json",
        "metrics.jsonl",
    ]
    assert not (pub / "runs" / gla / "checkpoints").exists()
    assert (pub / "plots" / "loss_curves.png").stat().st_size > 1000
    fresh = tmp_path / "fresh" / "m"
    fresh.mkdir(parents=True)
    (fresh / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    again = build_report(fresh, merge=[pub], publish_to=pub)  # publish onto its own source
    for r in again["rows"]:
        assert r["status"] == "finished" and r["source"] == str(pub)
        for k in ("mqar.accuracy", "niah.string_match", "final_loss", "train_wall_s", "params"):
            assert r.get(k) == pytest.approx(before[r["run"]].get(k)), (r["run"], k)
    assert [r["run"] for r in again["rows"] if r["_dir"] is not None] == [gla, delta]
    assert sorted(p.name for p in (pub / "runs").iterdir()) == [delta, gla]
    with pytest.raises(SweepError, match="is the sweep directory itself"):
        build_report(fresh, publish_to=fresh)
    # an interrupted copy never replaces a published finished run
    published_metrics = (pub / "runs" / gla / "metrics.jsonl").read_text()
    _fake_run(fresh / "runs" / gla, 4.0, 0.0, 0.0)
    (fresh / "status.json").write_text(json.dumps({"runs": {gla: {"status": "interrupted"}}}))
    build_report(fresh, publish_to=pub)
    assert (pub / "runs" / gla / "metrics.jsonl").read_text() == published_metrics
    assert json.loads((pub / "status.json").read_text())["runs"][gla]["status"] == "finished"

    bad = tmp_path / "bad.csv"
    bad.write_text("name,acc\nx,1\n")
    with pytest.raises(SweepError, match="no 'run' column"):
        build_report(here, merge=[bad])
    other = tmp_path / "other.csv"
    other.write_text("run,status\nsomething_else,finished\n")
    with pytest.raises(SweepError, match="none of its 1 runs is a run of sweep 'm'"):
        build_report(here, merge=[other])
    with pytest.raises(SweepError, match="no such results.csv or sweep directory"):
        build_report(here, merge=[tmp_path / "missing.csv"])


def test_series_styles_stay_distinct_past_ten_lines():
    import matplotlib.pyplot as plt

    labels = [f"arch{i}" for i in range(40)]
    styles = series_styles(labels, plt)
    combos = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(combos) == 40
    assert len({s["color"] for s in styles.values()}) == 10


def test_flatten_eval_means_and_cells():
    rec = {"cells": [{"length": 256, "bpb": 2.0, "loss": 1.0}, {"length": 512, "bpb": 3.0}]}
    flat = flatten_eval("ppl", "ppl", rec)
    assert flat["ppl.bpb"] == 2.5 and flat["ppl.bpb.L512"] == 3.0 and flat["ppl.loss"] == 1.0


def test_config_drift_ignores_keys_added_since_and_execution_keys(tmp_path):

    from memzoo.config import load_config, save_config
    from memzoo.sweep.runner import config_drift

    cfg = load_config(MQAR_TINY, TINY)
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["model"]["remat"], saved["model"]["kernel_block_v"]  # an older run directory
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_drift(tmp_path, cfg) == []
    cfg.model.impl = "scan"
    assert config_drift(tmp_path, cfg) == []
    cfg.model.d_model = 2 * cfg.model.d_model
    assert config_drift(tmp_path, cfg) == ["model.d_model"]


def test_report_takes_steps_from_the_run_when_the_sweep_raised_them(tmp_path):
    """A sweep file may raise ``steps`` after its runs finished (constant lr: the sweep then
    extends them); until they are extended, the report says the steps they ran. So for every
    key the sweep lets change between a run's invocations (``train.*`` too)."""
    grid = {"model": ["gla", "transformer"], "steps": [20], "train.grad_accum": [2]}
    spec = {"name": "ext", "grid": grid}
    sweep_dir = tmp_path / "ext"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = expand(parse_sweep(spec), tmp_path, validate=False)
    status = {"runs": {}}
    for r, saved_steps in zip(runs, (10, 20), strict=True):
        _fake_run(sweep_dir / "runs" / r.name, 1.0, 0.5, 0.5)  # last checkpoint: step 10
        saved = {
            "steps": saved_steps,
            **({"train": {"grad_accum": 1}} if saved_steps == 10 else {}),
        }
        (sweep_dir / "runs" / r.name / "config.yaml").write_text(yaml.safe_dump(saved))
    status["runs"][runs[0].name] = {"status": "finished", "params": 1000, "train_wall_s": 2.0}
    (sweep_dir / "status.json").write_text(json.dumps(status))
    rows = {r["run"]: r for r in build_report(sweep_dir)["rows"]}
    done, extending = rows[runs[0].name], rows[runs[1].name]
    assert (done["steps"], done["status"]) == (10, "finished")
    assert (extending["steps"], extending["status"]) == (20, "incomplete")
    assert (done["train.grad_accum"], extending["train.grad_accum"]) == (1, 2)
