"""The pretraining loop shared by every architecture.

``train(cfg)`` builds the model, data, optimiser and mesh from a validated config, resumes from
``runs/<run_name>/checkpoints`` when a checkpoint exists, and trains to ``cfg.steps``, logging to
``metrics.jsonl`` and TensorBoard, evaluating held-out loss / bits per byte, and saving
checkpoints (async, keep-last-K, atomic). SIGTERM / SIGINT save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memzoo.config import Config, ConfigError, save_config
from memzoo.data import build_tokenizer, heldout_batches, make_train_iterator
from memzoo.evaluate import heldout_metrics
from memzoo.models.lm import build_model, count_params, describe
from memzoo.train.checkpoint import Checkpointer
from memzoo.train.metrics import MetricsWriter, flops_per_token
from memzoo.train.optim import make_optimizer
from memzoo.train.step import make_eval_step, make_train_step

MESH_AXES = ("data", "fsdp", "tensor")


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, incompatible resume)."""


def make_mesh(cfg: Config) -> Mesh:
    """Mesh over all devices with named axes (data, fsdp, tensor); -1 fills the remainder.

    Today the batch is split over data x fsdp and parameters are replicated; the fsdp and
    tensor axes are declared so that sharded parameters are a change of partition specs."""
    devices = jax.devices()
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices"
        )
    dp = sizes[0] * sizes[1]
    if cfg.batch_size % dp:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by data*fsdp={dp}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


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


def _check_resume_compatible(cfg: Config, saved_path: Path) -> None:
    with open(saved_path) as f:
        saved = yaml.safe_load(f) or {}
    now = cfg.to_dict()
    if saved.get("model") != now["model"]:
        diff = [k for k, v in now["model"].items() if saved.get("model", {}).get(k) != v]
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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(cfg: Config, *, stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns a summary dict.

    ``stop_at`` ends this invocation after that global step as a preemption would (checkpoint,
    clean return), for time-sliced jobs; rerunning resumes. The summary holds ``losses`` (one
    per step run here), ``start_step``, ``final_step`` and the last held-out metrics.
    """
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
    if saved.exists():
        _check_resume_compatible(cfg, saved)
    save_config(cfg, saved)

    mesh = make_mesh(cfg)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))

    model = build_model(cfg.model, seed=cfg.seed, precision=cfg.train.precision)
    graphdef, params = nnx.split(model)
    n_params = count_params(model)
    n_embed = model.embed.embedding[...].size
    del model
    _log(describe(nnx.merge(graphdef, params)))
    params = jax.device_put(params, replicated)
    tx, schedule = make_optimizer(cfg)
    opt_state = jax.device_put(tx.init(params), replicated)

    data_it = make_train_iterator(
        cfg.data, tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed
    )
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
        data_it.set_state(data_state["iterator"])
        start = int(data_state["step"])
        _log(f"resuming run '{cfg.run_name}' from step {start} ({run_dir / 'checkpoints'})")

    train_step = make_train_step(graphdef, tx, cfg.train.grad_accum)
    eval_step = make_eval_step(graphdef)
    writer = MetricsWriter(run_dir, resume_step=start)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    fpt = flops_per_token(cfg, n_params - n_embed)

    def put(batch):
        return {
            k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in batch.items()
        }

    def save(step: int, force: bool = False) -> None:
        ckpt.save(
            step,
            params,
            opt_state,
            {"step": step, "iterator": data_it.get_state()},
            force=force,
        )

    def evaluate(step: int) -> dict:
        if not eval_batches:
            return {}
        res = heldout_metrics(eval_step, params, [put(b) for b in eval_batches], tokenizer)
        writer.write({"step": step, **res})
        return res

    summary: dict[str, Any] = {"run_dir": str(run_dir), "start_step": start, "losses": []}
    progress = None
    if cfg.train.progress:
        from tqdm import tqdm

        progress = tqdm(
            total=cfg.steps, initial=start, desc=cfg.run_name, unit="step", dynamic_ncols=True
        )
    say = progress.write if progress is not None else _log
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
                batch = put(next(data_it))
                params, opt_state, m = train_step(params, opt_state, batch)
                step += 1
                loss = float(m["loss"])
                if not bool(m["finite"]):
                    if cfg.train.on_nonfinite == "stop":
                        raise TrainingError(
                            f"non-finite loss at step {step} (loss={loss}, grad_norm="
                            f"{float(m['grad_norm'])}); parameters were not updated and the "
                            f"latest checkpoint (step {ckpt.latest_step()}) is intact. Lower "
                            "optim.lr, or set train.on_nonfinite=skip to skip such steps"
                        )
                    skipped += 1
                    _log(f"step {step}: non-finite loss, update skipped ({skipped} so far)")
                    if skipped > cfg.train.max_skipped_steps:
                        raise TrainingError(
                            f"{skipped} non-finite steps (train.max_skipped_steps="
                            f"{cfg.train.max_skipped_steps}); stopping"
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
                    writer.write(rec)
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
                if stop.signal is not None or step == stop_at:
                    name = "stop_at" if stop.signal is None else signal.Signals(stop.signal).name
                    if not saved:  # a stop on a checkpoint step reuses that checkpoint
                        save(step, force=True)
                    ckpt.wait()
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
        writer.close()
    summary.update({"final_step": step, "skipped_steps": skipped, **last_eval, "params": n_params})
    return summary


def config_summary(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
