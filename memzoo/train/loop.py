"""The pretraining loop shared by every architecture.

``train(cfg)`` builds the model, data, optimiser and mesh from a validated config, resumes from
``runs/<run_name>/checkpoints`` when a checkpoint exists, and trains to ``cfg.steps``, logging to
``metrics.jsonl`` and TensorBoard, evaluating held-out loss / bits per byte, and saving
checkpoints (async, keep-last-K, atomic). SIGTERM / SIGINT save a checkpoint and return
(``memzoo train`` then exits 143 / 130). Parameters, optimizer state and batches are sharded
over the config's mesh (:mod:`memzoo.train.sharding`); several hosts train together
(:mod:`memzoo.train.distributed`). A non-finite loss stops the run or skips the update
(``train.on_nonfinite``), naming the step and the offending batch rows.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from memzoo.config import MESH_AXES, Config, ConfigError, save_config
from memzoo.data import build_tokenizer, heldout_batches
from memzoo.evaluate import heldout_metrics
from memzoo.models.lm import build_model, describe
from memzoo.train import distributed
from memzoo.train.checkpoint import (
    Checkpointer,
    complete_steps,
    resolve_init_from,
    restore_params,
    saved_param_shapes,
    shape_mismatch,
)
from memzoo.train.metrics import MetricsWriter, flops_per_token
from memzoo.train.optim import make_optimizer, schedule_change
from memzoo.train.sharding import (
    batch_sharding,
    build_mesh,
    opt_shardings,
    param_shardings,
    rules,
    validate_shardings,
)
from memzoo.train.step import make_eval_step, make_row_loss, make_train_step

__all__ = ["MESH_AXES", "TrainingError", "make_mesh", "train"]


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, incompatible resume)."""


def make_mesh(cfg: Config) -> Mesh:
    """The config's device mesh (the old name; see :func:`memzoo.train.sharding.build_mesh`)."""
    return build_mesh(cfg)


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag the loop checks after every step."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: give up waiting
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# how a model runs, not what it computes: a resumed run may change these
EXECUTION_KEYS = ("impl", "kernel_block_v", "kernel_interpret", "remat")


def _check_resume_compatible(cfg: Config, saved_path: Path) -> dict[str, Any]:
    """The saved config of an existing run, after checking ``cfg`` may resume it."""
    with open(saved_path) as f:
        saved = yaml.safe_load(f) or {}
    now = cfg.to_dict()
    defaults = Config().to_dict()["model"]
    old = {**defaults, **(saved.get("model") or {})}  # keys added since the run was saved
    diff = [k for k, v in now["model"].items() if k not in EXECUTION_KEYS and old.get(k) != v]
    if diff:
        raise ConfigError(
            f"run '{cfg.run_name}' already exists with a different model config "
            f"(differs in: {', '.join(f'model.{k}' for k in diff)}); "
            "use another run_name or output_dir"
        )
    for key in ("tokenizer", "tokenizer_path", "source"):
        if saved.get("data", {}).get(key) != now["data"][key]:
            raise ConfigError(
                f"run '{cfg.run_name}' already exists with data.{key}="
                f"{saved.get('data', {}).get(key)!r}; use another run_name"
            )
    return saved


def _check_init_from(cfg: Config, abstract: Any) -> tuple[Path, int] | None:
    """(checkpoints dir, step) of ``train.init_from`` when it will be used (the run has no
    checkpoint of its own yet), after checking its parameter shapes against the model."""
    if complete_steps(cfg.run_dir / "checkpoints"):
        return None  # a rerun resumes its own checkpoint
    directory, step = resolve_init_from(cfg.train.init_from)
    saved = saved_param_shapes(directory / str(step))
    problem = shape_mismatch(abstract, saved) if saved else None
    if problem:
        raise ConfigError(
            f"train.init_from={cfg.train.init_from}: the checkpoint of step {step} does not fit "
            f"this model: {problem}"
        )
    return directory, step


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _describe_nonfinite(
    row_loss: Any, params: Any, batch: dict, local: dict, data: Any, tokenizer: Any, step: int
) -> str:
    """Which input made step ``step`` non-finite: global batch rows whose own loss is
    non-finite, their documents (segment ids) and the start of the text (rows held here)."""
    try:
        per_row = np.asarray(row_loss(params, batch))
    except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the original error
        return f"(could not attribute it to rows: {type(e).__name__})"
    bad = [int(i) for i in np.flatnonzero(~np.isfinite(per_row))]
    where = f"batch {step - 1} of the data stream (0-based; the batch of step {step})"
    if not bad:
        return f"input: {where}; every row's own loss is finite (a non-finite gradient)"
    parts = []
    for r in bad[:4]:
        desc = f"row {r}"
        if data.lo <= r < data.hi:
            seg = np.asarray(local["segment_ids"][r - data.lo])
            docs = sorted({int(x) for x in seg if x > 0})
            ids = [int(t) for t in np.asarray(local["inputs"][r - data.lo])[:24]]
            try:
                text = tokenizer.decode(ids)
            except Exception:  # noqa: BLE001
                text = str(ids)
            desc += f" (documents {docs} of the row, starts {text!r})"
        parts.append(desc)
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return f"input: {where}, rows {bad} of {len(per_row)}: {'; '.join(parts)}{more}"


def train(cfg: Config, *, stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns a summary dict.

    ``stop_at`` ends this invocation after that global step as a preemption would (checkpoint,
    clean return), for time-sliced jobs; rerunning resumes. The summary holds ``losses`` (one
    per step run here), ``start_step``, ``final_step`` and the last held-out metrics;
    ``interrupted`` names the signal (or ``stop_at``) that ended the run early.

    Multi-host: every process calls ``train`` with the same config (``distributed.*`` keys or
    environment, see :mod:`memzoo.train.distributed`); process 0 writes the config, metrics and
    logs, all processes write their checkpoint shards together.
    """
    distributed.initialize(cfg)
    main = distributed.is_main()
    run_dir = cfg.run_dir
    tokenizer = build_tokenizer(cfg.data)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})"
        )
    saved = run_dir / "config.yaml"
    saved_cfg = _check_resume_compatible(cfg, saved) if saved.exists() else None

    mesh = build_mesh(cfg)
    b_sh = batch_sharding(mesh, cfg)

    def init_params():
        return nnx.split(build_model(cfg.model, seed=cfg.seed, precision=cfg.train.precision))[1]

    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: build_model(cfg.model, seed=cfg.seed, precision=cfg.train.precision))
    )
    validate_shardings(mesh, abstract, cfg)  # one-line errors before anything is placed
    init_from = _check_init_from(cfg, abstract) if cfg.train.init_from else None
    data = distributed.HostData(cfg, tokenizer, b_sh)
    if jax.process_count() > 1:  # everyone has checked the saved config before it changes
        multihost_utils.sync_global_devices("memzoo:config-checked")
    if main:
        save_config(cfg, saved)

    p_sh = param_shardings(mesh, abstract, cfg)
    params = jax.jit(init_params, out_shardings=p_sh)()  # created sharded, never whole
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    n_embed = int(np.prod(abstract["embed"]["embedding"].shape))
    if main:
        _log(describe(nnx.merge(graphdef, params)))
    tx, schedule = make_optimizer(cfg)
    o_sh = opt_shardings(mesh, jax.eval_shape(tx.init, abstract), cfg)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)

    eval_batches = (
        heldout_batches(
            cfg.data,
            tokenizer,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            max_batches=cfg.train.eval_batches,
        )
        if cfg.train.eval_batches
        else []
    )

    ckpt = Checkpointer(
        run_dir / "checkpoints",
        keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoint,
    )
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        params, opt_state, data_state = ckpt.restore(latest, params, opt_state)
        data.set_state(data_state)
        start = int(data_state["step"])
        if main:
            _log(f"resuming run '{cfg.run_name}' from step {start} ({run_dir / 'checkpoints'})")
            change = schedule_change(saved_cfg, cfg, start) if saved_cfg else None
            if change:
                _log(f"warning: {change}")
    elif init_from is not None:
        params, _ = restore_params(init_from[0], params, init_from[1])
        if main:
            _log(f"initialised parameters from step {init_from[1]} of {init_from[0].parent}")

    r = rules(cfg)
    train_step = make_train_step(
        graphdef,
        tx,
        cfg.train.grad_accum,
        mesh=mesh,
        rules=r,
        param_sharding=p_sh,
        opt_sharding=o_sh,
        batch_sharding=b_sh,
    )
    eval_step = make_eval_step(graphdef)
    row_loss = make_row_loss(graphdef)
    writer = MetricsWriter(run_dir, resume_step=start) if main else None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    fpt = flops_per_token(cfg, n_params - n_embed)
    global_shape = (cfg.batch_size, cfg.seq_len)

    def put(local):
        return {
            k: jax.make_array_from_process_local_data(b_sh, np.asarray(v), global_shape)
            for k, v in local.items()
        }

    def save(step: int, force: bool = False) -> None:
        data_state = {"step": step, **data.get_state()}
        ckpt.save(step, params, opt_state, data_state, force=force)

    def write(rec: dict) -> None:
        if writer is not None:
            writer.write(rec)

    def evaluate(step: int) -> dict:
        if not eval_batches:
            return {}

        def eval_global(p, batch):  # held-out batches are built whole on every host
            return eval_step(p, put(data.local_slice(batch)))

        res = heldout_metrics(eval_global, params, eval_batches, tokenizer)
        write({"step": step, **res})
        return res

    summary: dict[str, Any] = {"run_dir": str(run_dir), "start_step": start, "losses": []}
    progress = None
    if cfg.train.progress and main:
        from tqdm import tqdm

        progress = tqdm(
            total=cfg.steps, initial=start, desc=cfg.run_name, unit="step", dynamic_ncols=True
        )
    say = progress.write if progress is not None else _log
    if not main:
        say = lambda msg: None  # noqa: E731
    skipped = 0
    step = start
    t_last, tok_last = time.perf_counter(), 0
    last_eval: dict = {}
    try:
        with _StopFlag() as stop:
            if start == 0 and eval_batches:
                last_eval = evaluate(0)
                say(f"step 0: heldout_bpb {last_eval['heldout_bpb']:.4f}")
            while step < cfg.steps:
                local = next(data)
                batch = put(local)
                params, opt_state, m = train_step(params, opt_state, batch)
                step += 1
                loss = float(m["loss"])
                if not bool(m["finite"]):
                    which = _describe_nonfinite(
                        row_loss, params, batch, local, data, tokenizer, step
                    )
                    what = "loss" if not math.isfinite(loss) else "gradient"
                    if cfg.train.on_nonfinite == "stop":
                        latest = ckpt.latest_step()
                        kept = (
                            f"the latest checkpoint (step {latest}) is intact"
                            if latest is not None
                            else "no checkpoint was written yet, so a rerun starts at step 0"
                        )
                        raise TrainingError(
                            f"non-finite {what} at step {step} (loss={loss}, grad_norm="
                            f"{float(m['grad_norm'])}); {which}; parameters were not updated "
                            f"and {kept}. "
                            "Lower optim.lr, or set train.on_nonfinite=skip to skip such steps"
                        )
                    skipped += 1
                    if main:
                        _log(
                            f"step {step}: non-finite {what}, update skipped ({skipped} so far); "
                            f"{which}"
                        )
                    if skipped > cfg.train.max_skipped_steps:
                        raise TrainingError(
                            f"{skipped} non-finite steps (train.max_skipped_steps="
                            f"{cfg.train.max_skipped_steps}); stopping at step {step}; {which}"
                        )
                summary["losses"].append(loss)
                tok_last += tokens_per_step
                if progress is not None:
                    progress.update(1)
                if step % cfg.train.log_every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    tps = tok_last / max(now - t_last, 1e-9)
                    rec = {
                        "step": step,
                        "loss": loss,
                        "lr": float(schedule(step - 1)),
                        "grad_norm": float(m["grad_norm"]),
                        "tokens_per_sec": tps,
                        "tflops_per_sec": tps * fpt / 1e12,
                        "tokens_seen": step * tokens_per_step,
                        "skipped_steps": skipped,
                    }
                    if "aux_loss" in m:  # MoM: load-balancing loss (included in "loss")
                        rec["aux_loss"] = float(m["aux_loss"])
                    if "mom_load" in m:  # MoM: fraction of routed slots per [layer][memory]
                        rec["mom_load"] = np.asarray(m["mom_load"]).round(6).tolist()
                    write(rec)
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                    t_last, tok_last = now, 0
                if step % cfg.train.eval_every == 0 or step == cfg.steps:
                    last_eval = evaluate(step)
                    if last_eval:
                        msg = (
                            f"step {step}: loss {loss:.4f}  heldout_loss "
                            f"{last_eval['heldout_loss']:.4f}  heldout_bpb "
                            f"{last_eval['heldout_bpb']:.4f}"
                        )
                        say(msg)
                saved = step % cfg.train.checkpoint_every == 0 or step == cfg.steps
                if saved:
                    save(step, force=True)
                # hosts agree on stopping (a signal reaches them at different steps)
                signalled = distributed.any_process(stop.signal is not None)
                if signalled or step == stop_at:
                    if stop.signal is not None:
                        name = signal.Signals(stop.signal).name
                    else:
                        name = "SIGTERM" if signalled else "stop_at"  # another host's signal
                    if not saved:  # a stop on a checkpoint step reuses that checkpoint
                        save(step, force=True)
                    ckpt.wait()
                    if main:
                        _log(
                            f"received {name}: saved checkpoint at step {step} in "
                            f"{run_dir / 'checkpoints'}; rerun the same command to resume"
                        )
                    summary["interrupted"] = name
                    break
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    summary.update({"final_step": step, "skipped_steps": skipped, **last_eval, "params": n_params})
    return summary


def config_summary(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
