"""The pretraining loop on a tiny hybrid (one memory + one attention layer) on CPU: loss goes
down and is logged, runs are deterministic, stop/resume is exact, interrupted checkpoints are
ignored, SIGTERM checkpoints and exits cleanly, non-finite losses stop or skip without touching
parameters, gradient accumulation equals one big batch, a run restores for evaluation and
generation, and bf16 trains.

Each train() call compiles its step afresh (5-10 s on a 2-core CPU), so the module turns on
JAX's persistent compilation cache (a temporary directory, restored afterwards): runs whose
config yields the same program (same model, steps and loss) then load the executable instead
of recompiling, and the base run is shared by the module."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from tiny_runs import QUICKSTART, TINY_DATA, TINY_HYBRID

import memzoo
import memzoo.train.step as step_mod
from memzoo.cli import EXIT_SIGTERM
from memzoo.config import config_from_dict, load_config
from memzoo.data import build_tokenizer, heldout_batches
from memzoo.evaluate import heldout_metrics
from memzoo.models.lm import build_model
from memzoo.train.checkpoint import Checkpointer, restore_params
from memzoo.train.loop import TrainingError, train
from memzoo.train.metrics import read_metrics
from memzoo.train.step import make_eval_step

STEPS = 15
WORKERS = str(Path(__file__).resolve().parents[2] / "support" / "train_workers.py")
TINY = [
    *TINY_HYBRID,
    *TINY_DATA,
    "train.log_every=1",
    "optim.lr=0.003",
    "optim.warmup_steps=2",
    # a constant schedule after warmup keeps the compiled step independent of `steps`, so runs
    # of different lengths (and the SIGTERM subprocess) share one executable via the cache
    "optim.schedule=constant",
]


def make_cfg(output_dir, *extra, steps=STEPS):
    return load_config(QUICKSTART, [*TINY, f"output_dir={output_dir}", f"steps={steps}", *extra])


def latest_step(run_dir):
    ckpt = Checkpointer(Path(run_dir) / "checkpoints")
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def leaves(model_or_state):
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def copy_run(src_run_dir, dst_output_dir):
    shutil.copytree(src_run_dir, Path(dst_output_dir) / Path(src_run_dir).name)


def nan_loss(orig):
    def patched(model, batch):
        s, n = orig(model, batch)
        return s * jnp.nan, n

    return patched


def nan_grad_loss(orig):
    """The same loss value with a NaN gradient: d/ds sqrt(0 * s) is 0 * inf."""

    def patched(model, batch):
        s, n = orig(model, batch)
        return s + 0.0 * jnp.sqrt(0.0 * s), n

    return patched


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs, segment_ids):
    return nnx.merge(graphdef, state)(inputs, segment_ids=segment_ids)[0]


def logits_of(model, inputs, segment_ids=None):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, inputs, segment_ids))


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    path = tmp_path_factory.mktemp("jax_cache")
    jax.config.update(keys[0], str(path))
    jax.config.update(keys[1], 0.0)
    compilation_cache.reset_cache()
    yield path
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One uninterrupted 15-step run, checkpointed at its end (step 15)."""
    out = tmp_path_factory.mktemp("base")
    cfg = make_cfg(out)
    summary = train(cfg)
    return cfg, summary


# ----------------------------------------------------------------------------- training


def test_loss_decreases_and_run_dir_is_complete(base_run):
    cfg, summary = base_run
    losses = summary["losses"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < losses[0] - 0.2, losses
    assert summary["start_step"] == 0 and summary["final_step"] == STEPS
    assert summary["skipped_steps"] == 0 and "interrupted" not in summary
    assert math.isfinite(summary["heldout_bpb"]) and summary["heldout_bpb"] > 0
    assert summary["params"] > 0

    run_dir = cfg.run_dir
    records = read_metrics(run_dir)
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, STEPS + 1))
    for r in train_recs:
        assert {"step", "loss", "lr", "tokens_per_sec", "grad_norm", "tokens_seen"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0
        assert r["tokens_seen"] == r["step"] * cfg.batch_size * cfg.seq_len
    # the lr used by each step: linear warmup from 0 over 2 steps, then constant
    lrs = [r["lr"] for r in train_recs]
    assert lrs == pytest.approx([0.0, 0.0015] + [0.003] * (STEPS - 2))
    assert [r["loss"] for r in train_recs] == pytest.approx(losses)
    heldout = [r for r in records if "heldout_bpb" in r]
    assert [r["step"] for r in heldout] == [0, STEPS]
    assert heldout[-1]["heldout_bpb"] == pytest.approx(summary["heldout_bpb"])
    assert heldout[-1]["heldout_bpb"] < heldout[0]["heldout_bpb"]

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config_from_dict(saved) == cfg  # including the vocab size the loop filled in
    assert saved["model"]["vocab_size"] == build_tokenizer(cfg.data).vocab_size
    tb = run_dir / "tensorboard"
    assert tb.is_dir() and any(tb.iterdir())
    assert latest_step(run_dir) == STEPS


def test_same_config_is_deterministic(base_run, tmp_path):
    _, summary = base_run
    again = train(make_cfg(tmp_path))
    assert again["losses"] == summary["losses"]
    assert again["heldout_loss"] == summary["heldout_loss"]


def test_stop_and_resume_is_exact(base_run, tmp_path):
    _, full = base_run
    k = 6
    first = train(make_cfg(tmp_path), stop_at=k)
    assert first["interrupted"] == "stop_at"
    assert first["final_step"] == k and len(first["losses"]) == k
    run_dir = make_cfg(tmp_path).run_dir
    assert latest_step(run_dir) == k

    second = train(make_cfg(tmp_path))
    assert second["start_step"] == k and second["final_step"] == STEPS
    assert "interrupted" not in second
    assert first["losses"] + second["losses"] == full["losses"]
    assert second["heldout_loss"] == full["heldout_loss"]
    # metrics.jsonl holds each step once across the two invocations
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_resuming_under_a_changed_schedule_warns(base_run, tmp_path, capsys):
    cfg, _ = base_run
    copy_run(cfg.run_dir, tmp_path)
    capsys.readouterr()
    train(make_cfg(tmp_path, steps=STEPS + 2))  # constant lr: raising steps changes nothing
    assert "learning-rate schedule" not in capsys.readouterr().err
    saved = make_cfg(tmp_path).run_dir / "config.yaml"
    d = yaml.safe_load(saved.read_text())
    d["optim"]["schedule"] = "cosine"  # as if it had trained (and decayed) under cosine
    saved.write_text(yaml.safe_dump(d))
    train(make_cfg(tmp_path, steps=STEPS + 4))
    err = capsys.readouterr().err
    assert f"warning: run '{cfg.run_name}' resumes at step {STEPS + 2}" in err
    assert f"steps {STEPS + 2} -> {STEPS + 4}, optim.schedule cosine -> constant" in err


def test_stop_on_a_checkpoint_step_saves_once(tmp_path):
    # the periodic save and the stop save fall on the same step: one checkpoint, no error
    first = train(make_cfg(tmp_path, "train.checkpoint_every=4", steps=8), stop_at=4)
    assert first["interrupted"] == "stop_at" and first["final_step"] == 4
    assert latest_step(make_cfg(tmp_path).run_dir) == 4


def test_interrupted_checkpoint_is_ignored(base_run, tmp_path):
    cfg, full = base_run
    train(make_cfg(tmp_path), stop_at=10)
    run_dir = make_cfg(tmp_path).run_dir
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["10"]
    # What orbax 0.12 leaves behind when a save of step 15 is cut off: the step is written to
    # `15.orbax-checkpoint-tmp` and only renamed to `15` once complete; on a local filesystem
    # a step counts as finalized iff its directory name lacks that suffix
    # (orbax/checkpoint/_src/path/atomicity.py: validate_atomic_rename_final_path, used by
    # StandardNameFormat._build_metadata). Copy a complete step-15 checkpoint under that name,
    # so only the name marks it unfinished.
    shutil.copytree(
        cfg.run_dir / "checkpoints" / str(STEPS), ckpt_dir / f"{STEPS}.orbax-checkpoint-tmp"
    )
    assert latest_step(run_dir) == 10

    # the resumed run restores step 10 (not the fake 15), trains 11..15 exactly as the base
    # run did, and its save of step 15 replaces the stale temporary directory
    summary = train(make_cfg(tmp_path))
    assert summary["start_step"] == 10 and summary["final_step"] == STEPS
    assert summary["losses"] == full["losses"][10:]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["10", str(STEPS)]
    assert latest_step(run_dir) == STEPS


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(base_run, tmp_path, compile_cache):
    args = [*TINY, f"output_dir={tmp_path}", "steps=100000", "train.checkpoint_every=1000000"]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    metrics = tmp_path / "quickstart" / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memzoo.cli", "train", str(QUICKSTART), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        seen = 0
        while seen < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training steps logged within 180 s"
            time.sleep(0.1)
            if metrics.exists():
                lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                seen = max([r["step"] for r in lines if "loss" in r], default=0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_SIGTERM == 143, err[-3000:]  # distinct: saved, resumable
    assert "Traceback" not in err
    m = re.search(r"received SIGTERM: saved checkpoint at step (\d+)", err)
    assert m, err[-3000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < 100000
    assert latest_step(tmp_path / "quickstart") == stopped
    logged = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    assert max(r["step"] for r in logged) == stopped
    before = [r["loss"] for r in logged if "loss" in r]

    # rerunning the same run resumes from the signal's checkpoint, and the losses of the
    # interrupted + resumed run equal the uninterrupted base run's, step for step, exactly
    _, base = base_run
    summary = train(make_cfg(tmp_path, steps=max(stopped, STEPS)))
    assert summary["start_step"] == stopped > 0
    assert summary["final_step"] == max(stopped, STEPS)
    assert (before + summary["losses"])[:STEPS] == base["losses"]


# ----------------------------------------------------------------------------- non-finite

NAN_STEPS = 18  # both tests resume the base run (step 15) with the same program: one compile


def test_nonfinite_stop_raises_and_keeps_checkpoint(base_run, tmp_path, monkeypatch):
    cfg, _ = base_run
    copy_run(cfg.run_dir, tmp_path)
    monkeypatch.setattr(step_mod, "lm_loss", nan_loss(step_mod.lm_loss))
    with pytest.raises(TrainingError, match="non-finite loss at step 16") as exc:
        train(make_cfg(tmp_path, steps=NAN_STEPS))
    assert f"latest checkpoint (step {STEPS}) is intact" in str(exc.value)
    assert (
        "input: batch 15 of the data stream (0-based; the batch of step 16), rows [0, 1, 2, 3]"
        in str(exc.value)
    )
    monkeypatch.undo()

    run_dir = tmp_path / cfg.run_name
    assert latest_step(run_dir) == STEPS
    after, _ = memzoo.load(run_dir)
    before, _ = memzoo.load(cfg.run_dir)
    assert after.restored_step == STEPS
    for a, b in zip(leaves(after), leaves(before), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)


def test_nonfinite_gradient_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(step_mod, "lm_loss", nan_grad_loss(step_mod.lm_loss))
    cfg = make_cfg(tmp_path, "train.checkpoint_every=100", steps=3)
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    msg = str(exc.value)
    assert msg.startswith("non-finite gradient at step 1 (loss="), msg
    assert "grad_norm=nan" in msg
    assert "no checkpoint was written yet, so a rerun starts at step 0" in msg
    assert "step None" not in msg
    assert latest_step(tmp_path / cfg.run_name) is None


def test_nonfinite_skip_completes_without_updates(base_run, tmp_path, monkeypatch):
    cfg, _ = base_run
    copy_run(cfg.run_dir, tmp_path)
    monkeypatch.setattr(step_mod, "lm_loss", nan_loss(step_mod.lm_loss))
    summary = train(
        make_cfg(
            tmp_path, "train.on_nonfinite=skip", "train.max_skipped_steps=100", steps=NAN_STEPS
        )
    )
    monkeypatch.undo()
    n = NAN_STEPS - STEPS
    assert summary["skipped_steps"] == n
    assert summary["start_step"] == STEPS and summary["final_step"] == NAN_STEPS
    assert len(summary["losses"]) == n and all(math.isnan(x) for x in summary["losses"])
    recs = [r for r in read_metrics(tmp_path / cfg.run_name) if "loss" in r]
    assert recs[-1]["step"] == NAN_STEPS and recs[-1]["skipped_steps"] == n

    run_dir = tmp_path / cfg.run_name
    assert latest_step(run_dir) == NAN_STEPS
    after, _ = memzoo.load(run_dir)
    before, _ = memzoo.load(cfg.run_dir)
    for a, b in zip(leaves(after), leaves(before), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)  # skipped steps never update parameters


def test_nonfinite_names_the_offending_row(base_run, tmp_path, monkeypatch, capsys):
    """A NaN caused by one row of step 16's batch: the skip message names that row (and its
    documents and text), not the others."""
    import orbax.checkpoint as ocp

    from memzoo.data import make_train_iterator

    cfg, _ = base_run
    copy_run(cfg.run_dir, tmp_path)
    ckpt = Checkpointer(cfg.run_dir / "checkpoints")
    try:
        state = ckpt.manager.restore(STEPS, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
            "data"
        ]["iterator"]
    finally:
        ckpt.close()
    it = make_train_iterator(
        cfg.data,
        build_tokenizer(cfg.data),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    it.set_state(state)
    inputs = next(it)["inputs"]  # the batch of step 16
    others = set(inputs[[0, 1, 3]].ravel().tolist())
    token = next(int(t) for t in inputs[2] if int(t) not in others)

    orig = step_mod.lm_loss

    def poisoned(model, batch):
        s, n = orig(model, batch)
        return s + jnp.where(jnp.any(batch["inputs"] == token), jnp.nan, 0.0), n

    monkeypatch.setattr(step_mod, "lm_loss", poisoned)
    summary = train(make_cfg(tmp_path, "train.on_nonfinite=skip", steps=STEPS + 1))
    monkeypatch.undo()
    assert summary["skipped_steps"] == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "non-finite loss, update skipped" in x)
    assert line.startswith(f"step {STEPS + 1}: ")
    assert "rows [2] of 4: row 2 (documents [" in line
    assert "starts " in line


@pytest.mark.slow  # subprocesses; CI runs it in `make test-full`
def test_sigkill_during_checkpoint_write_keeps_previous_latest(tmp_path):
    """SIGKILL while the step-4 checkpoint is being written (hooked to hang just before
    orbax's atomic commit): step 2 stays the latest, and the rerun resumes from it with the
    same losses the killed run logged."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(WORKERS).parent)}
    proc = subprocess.Popen(
        [sys.executable, WORKERS, "slow_save", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = tmp_path / "WRITING"
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the checkpoint write never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    run_dir = tmp_path / "quickstart"
    assert Path(marker.read_text()).name == "4"  # it was committing step 4
    assert latest_step(run_dir) == 2
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert "4" not in leftovers and "2" in leftovers
    logged = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    assert {3, 4} <= set(logged)

    sys.path.insert(0, str(Path(WORKERS).parent))
    from train_workers import BASE

    summary = train(
        load_config(
            QUICKSTART,
            [*BASE, f"output_dir={tmp_path}", "steps=4", "train.checkpoint_every=2"],
        )
    )
    assert summary["start_step"] == 2 and summary["final_step"] == 4
    assert summary["losses"] == [logged[3], logged[4]]
    assert latest_step(run_dir) == 4


# ----------------------------------------------------------------------------- variants


def test_grad_accum_matches_one_big_batch(base_run, tmp_path):
    _, full = base_run
    # same total steps as the base run (so the same lr schedule), stopped after 3
    summary = train(make_cfg(tmp_path, "train.grad_accum=2"), stop_at=3)
    assert len(summary["losses"]) == 3
    np.testing.assert_allclose(summary["losses"], full["losses"][:3], rtol=1e-5)


def test_bf16_trains(tmp_path):
    summary = train(make_cfg(tmp_path, "train.precision=bf16", steps=3))
    assert len(summary["losses"]) == 3
    assert all(math.isfinite(x) for x in summary["losses"])
    assert math.isfinite(summary["heldout_bpb"])


def test_init_from_starts_a_new_run_from_the_parameters(base_run, tmp_path):
    cfg, full = base_run
    src = f"train.init_from={cfg.run_dir}"
    first = train(make_cfg(tmp_path, "run_name=ft", src), stop_at=2)
    run_dir = make_cfg(tmp_path, "run_name=ft").run_dir
    # step 0's held-out loss is the source run's final one: its parameters were loaded
    step0 = [r for r in read_metrics(run_dir) if r.get("step") == 0 and "heldout_loss" in r]
    assert step0[0]["heldout_loss"] == pytest.approx(full["heldout_loss"], rel=1e-6)
    # a new run: fresh optimiser (warmup from lr 0) and step counter, its own losses
    assert first["start_step"] == 0
    recs = [r for r in read_metrics(run_dir) if "loss" in r]
    assert recs[0]["lr"] == 0.0
    assert first["losses"][0] < full["losses"][0] - 0.2, (first["losses"], full["losses"])
    # the rerun resumes the run's own checkpoint and does not reload the source
    second = train(make_cfg(tmp_path, "run_name=ft", src), stop_at=3)
    assert second["start_step"] == 2 and len(second["losses"]) == 1

    # a checkpoints/STEP directory names the step
    by_step = train(
        make_cfg(tmp_path, "run_name=ft2", f"train.init_from={cfg.run_dir}/checkpoints/{STEPS}"),
        stop_at=1,
    )
    assert by_step["losses"] == first["losses"][:1]


def test_init_from_errors(base_run, tmp_path):
    from memzoo.config import ConfigError

    cfg, _ = base_run
    with pytest.raises(FileNotFoundError, match="train.init_from: .* neither a run directory"):
        train(make_cfg(tmp_path, f"train.init_from={tmp_path / 'nowhere'}"))
    with pytest.raises(FileNotFoundError, match="train.init_from: no checkpoint at"):
        train(make_cfg(tmp_path, f"train.init_from={cfg.run_dir}/checkpoints/7"))
    wider = f"model.d_model={cfg.model.d_model * 2}"
    with pytest.raises(ConfigError, match=r"does not fit this model: .* is \("):
        train(make_cfg(tmp_path, "run_name=w", wider, f"train.init_from={cfg.run_dir}"))
    assert not (tmp_path / "w").exists()  # refused before the run directory was written


# ----------------------------------------------------------------------------- restore


def test_load_matches_trained_params_and_generates(base_run):
    cfg, summary = base_run
    model, loaded_cfg = memzoo.load(cfg.run_dir)
    assert loaded_cfg == cfg
    assert model.restored_step == STEPS

    tok = build_tokenizer(cfg.data)
    batches = heldout_batches(
        cfg.data, tok, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=1
    )
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}

    # the held-out loss of the loaded parameters is the one train() measured with the
    # in-memory trained parameters at the last step
    graphdef, params = nnx.split(model)
    res = heldout_metrics(make_eval_step(graphdef), params, [batch], tok)
    assert res["heldout_loss"] == pytest.approx(summary["heldout_loss"], rel=1e-6)

    # the full (resume) restore and the params-only restore agree
    fresh = build_model(cfg.model, seed=cfg.seed)
    fgraph, fparams = nnx.split(fresh)
    ckpt = Checkpointer(cfg.run_dir / "checkpoints")
    try:
        from memzoo.train.optim import make_optimizer

        tx, _ = make_optimizer(cfg)
        full_params, _, data_state = ckpt.restore(STEPS, fparams, tx.init(fparams))
    finally:
        ckpt.close()
    assert int(data_state["step"]) == STEPS
    ids = [tok.bos_id] + tok.encode("def ")
    prompt = jnp.asarray([ids, ids], jnp.int32)
    logits_loaded = logits_of(model, prompt)  # one forward shape: a single compile
    logits_full = logits_of(nnx.merge(fgraph, full_params), prompt)
    np.testing.assert_array_equal(logits_loaded, logits_full)
    assert np.all(np.isfinite(logits_loaded))
    assert not np.allclose(logits_of(fresh, prompt), logits_loaded)

    # generation: right shape, prompt kept, greedy is deterministic
    out1 = np.asarray(memzoo.generate(model, prompt, 8))
    out2 = np.asarray(memzoo.generate(model, prompt, 8))
    assert out1.shape == (2, len(ids) + 8)
    np.testing.assert_array_equal(out1[:, : len(ids)], np.asarray(prompt))
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(out1[0], out1[1])
    assert out1.min() >= 0 and out1.max() < cfg.model.vocab_size
    # the first greedy token is the argmax of the full forward's last logits
    np.testing.assert_array_equal(out1[:, len(ids)], np.argmax(logits_loaded[:, -1], axis=-1))


def test_load_errors(base_run, tmp_path):
    cfg, _ = base_run
    with pytest.raises(FileNotFoundError, match="not a memzoo run directory"):
        memzoo.load(tmp_path / "missing")
    with pytest.raises(
        FileNotFoundError, match=rf"no checkpoint for step 7 .*available: \[{STEPS}\]"
    ):
        memzoo.load(cfg.run_dir, step=7)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(cfg.run_dir / "config.yaml", bare / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        memzoo.load(bare)
    (bare / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        memzoo.load(bare)
    # restore_params directly, for a template of the wrong step
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 99"):
        restore_params(cfg.run_dir / "checkpoints", None, step=99)


def test_resume_check_ignores_execution_keys_and_keys_added_later(tmp_path):
    from memzoo.config import ConfigError, save_config
    from memzoo.train.loop import _check_resume_compatible

    cfg = make_cfg(tmp_path)
    cfg.model.vocab_size = 259
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    saved = yaml.safe_load(path.read_text())
    del saved["model"]["remat"]  # a run saved before the key existed
    path.write_text(yaml.safe_dump(saved))
    for key, value in (("impl", "scan"), ("remat", True), ("kernel_block_v", 64)):
        setattr(cfg.model, key, value)
    _check_resume_compatible(cfg, path)  # how the model runs may change on resume
    cfg.model.d_model *= 2
    with pytest.raises(ConfigError, match=r"differs in: model\.d_model\)"):
        _check_resume_compatible(cfg, path)
