"""The eval runner: load a run, iterate a task's cells, write results.json / table.md / plots.

Also the pieces every task shares: ``EvalContext`` (model + helpers), ``EvalError`` (a one-line
user error), ``parse_settings`` (``key=value`` overrides into a task's ``Settings``) and the
plot helpers ``heatmap`` and ``line_plot`` (matplotlib, Agg backend).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("ppl", "mqar", "niah")


class EvalError(ValueError):
    """A user-facing evaluation error, printed as one line by the CLI."""


# ----------------------------------------------------------------------------- tasks


def load_task(name: str) -> Any:
    """The task module ``memzoo.evals.<name>`` (imported lazily)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise EvalError(f"unknown eval task '{name}'{hint}; tasks: {', '.join(TASKS)}")
    module = f"memzoo.evals.{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise EvalError(
                f"eval task '{name}' is not available (no module {module}, "
                f"memzoo/evals/{name}.py is missing)"
            ) from None
        raise


def parse_settings(task: Any, overrides: Sequence[str]) -> Any:
    """The task's ``Settings`` with ``key=value`` overrides applied (typed like config keys)."""
    from memzoo.config import ConfigError, _coerce, parse_override

    settings = task.Settings()
    hints = typing.get_type_hints(type(settings))
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            raise EvalError(str(e)) from None
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise EvalError(
                f"unknown {task.NAME} setting '{key}'{hint}; settings: {', '.join(hints)}"
            )
        try:
            setattr(settings, key, _coerce(key, value, hints[key]))
        except ConfigError as e:
            raise EvalError(str(e).replace("config key", f"{task.NAME} setting", 1)) from None
    return settings


# ----------------------------------------------------------------------------- loading


def resolve_run(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(run_dir, step): ``path`` is a run directory or one of its ``checkpoints/<step>`` dirs."""
    path = Path(path)
    if (
        path.name.isdigit()
        and path.parent.name == "checkpoints"
        and (path.parent.parent / "config.yaml").is_file()
    ):
        named = int(path.name)
        if step is not None and step != named:
            raise EvalError(
                f"{path} is the checkpoint of step {named}, but --step {step} was given"
            )
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {path}")
        return path.parent.parent, named
    return path, step


def load_run(path: str | Path, step: int | None = None) -> tuple[Any, Any, Path]:
    """(model, cfg, run_dir) for a run directory or checkpoint directory.

    Missing runs / checkpoints / steps raise FileNotFoundError; a config whose model does not
    match the saved weights raises EvalError naming the run directory.
    """
    import memzoo

    run_dir, step = resolve_run(path, step)
    _check_saved_shapes(run_dir, step)
    try:
        model, cfg = memzoo.load(run_dir, step)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(first) > 200:
            first = first[:200] + "..."
        raise EvalError(
            f"the model in {run_dir}/config.yaml does not match the saved weights "
            f"(was the config edited?): {first}"
        ) from None
    return model, cfg, run_dir


def _check_saved_shapes(run_dir: Path, step: int | None) -> None:
    """Compare the config's parameter shapes with the checkpoint's metadata before restoring
    (orbax reports a mismatch from background tasks, with tracebacks on stderr). Best effort:
    anything unreadable is left to ``memzoo.load``."""
    try:
        from flax import nnx

        from memzoo.api import load_config
        from memzoo.models.lm import build_model
        from memzoo.train.checkpoint import complete_steps, saved_param_shapes, shape_mismatch

        cfg = load_config(run_dir)
        ckpts = Path(run_dir) / "checkpoints"
        steps = complete_steps(ckpts)
        if step is None:
            step = steps[-1] if steps else None
        if step is None or step not in steps:
            return
        saved = saved_param_shapes(ckpts / str(step))
        if not saved:  # no readable tree metadata: leave the check to the restore itself
            return
        _, template = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, seed=cfg.seed)))
        problem = shape_mismatch(template, saved)
    except Exception:
        return
    if problem:
        raise EvalError(
            f"the model in {run_dir}/config.yaml does not match the saved weights of step "
            f"{step} (was the config edited?): {problem}"
        )


# ----------------------------------------------------------------------------- context


@dataclasses.dataclass
class EvalContext:
    """What a task's ``run_cell`` gets: the restored model and helpers around it."""

    model: Any
    cfg: Any
    tokenizer: Any
    run_dir: Path
    step: int
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def _split(self) -> tuple[Any, Any]:
        if "split" not in self._cache:
            from flax import nnx

            self._cache["split"] = nnx.split(self.model)
        return self._cache["split"]

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Next-token logits fp32 [B, T, V] for int tokens [B, T] (no cache, one document)."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        graphdef, state = self._split()
        if "logits_fn" not in self._cache:

            @jax.jit
            def fwd(state, tokens):
                logits, _ = nnx.merge(graphdef, state)(tokens)
                return logits.astype(jnp.float32)

            self._cache["logits_fn"] = fwd  # jit caches one executable per shape
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int [batch, time], got shape {tokens.shape}")
        return np.asarray(self._cache["logits_fn"](state, jnp.asarray(tokens)), np.float32)

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 0
    ) -> list[list[int]]:
        """Greedy continuations (new tokens only, ``max_new_tokens`` each) of equal-length
        prompts, batched (``batch_size`` rows at a time; 0 = all at once)."""
        import memzoo

        if not prompt_ids:
            return []
        lengths = {len(p) for p in prompt_ids}
        if len(lengths) != 1:
            raise ValueError(f"prompts must have equal lengths, got {sorted(lengths)}")
        (plen,) = lengths
        if max_new_tokens <= 0:
            return [[] for _ in prompt_ids]
        arr = np.asarray(prompt_ids, np.int32)
        bs = batch_size if batch_size > 0 else len(arr)
        out: list[list[int]] = []
        for i in range(0, len(arr), bs):
            chunk = arr[i : i + bs]
            if len(chunk) < bs:  # pad the last chunk to the compiled batch size
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), 0)])
            res = np.asarray(memzoo.generate(self.model, chunk, max_new_tokens))
            n = min(bs, len(arr) - i)
            out.extend(res[:n, plen:].astype(int).tolist())
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; EvalError (one line) if the tokenizer cannot encode it."""
        tok = self.tokenizer
        ids = list(tok.encode(text))
        if text and not ids:
            raise EvalError(f"the tokenizer encodes the prompt {text[:40]!r} to no tokens")
        unk = _unknown_id(tok)
        vocab = int(self.cfg.model.vocab_size)
        bad = [i for i in ids if (unk is not None and i == unk) or not 0 <= i < vocab]
        if bad:
            where = ""
            for ch in dict.fromkeys(text):
                ch_ids = tok.encode(ch)
                if any((unk is not None and i == unk) or not 0 <= i < vocab for i in ch_ids):
                    where = f", e.g. for {ch!r}"
                    break
            kind = getattr(self.cfg.data, "tokenizer", type(tok).__name__)
            raise EvalError(
                f"the {kind} tokenizer of {self.run_dir} cannot encode the prompt: "
                f"{len(bad)} unknown or out-of-vocabulary token(s){where}"
            )
        return ids

    def nll(self, batch: dict) -> tuple[float, float]:
        """(summed NLL in nats, number of scored targets) of a held-out-format batch."""
        import jax.numpy as jnp

        from memzoo.train.step import make_eval_step

        graphdef, state = self._split()
        if "eval_step" not in self._cache:
            self._cache["eval_step"] = make_eval_step(graphdef)
        s, n = self._cache["eval_step"](state, {k: jnp.asarray(v) for k, v in batch.items()})
        return float(s), float(n)


def _unknown_id(tok: Any) -> int | None:
    sp = getattr(tok, "_sp", None)
    if sp is not None:
        u = int(sp.unk_id())
        return u if u >= 0 else None
    hf = getattr(tok, "_tok", None)
    if hf is not None:
        token = getattr(getattr(hf, "model", None), "unk_token", None)
        if token:
            u = hf.token_to_id(token)
            return int(u) if u is not None else None
    return None


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(
    matrix: Any,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    title: str,
    path: str | Path,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """A red-to-green ("RdYlGn") heatmap PNG with the values written in the cells.

    ``matrix`` [rows, cols]: rows = needle depth, columns = context length. NaN cells are blank.
    """
    plt = _pyplot()
    m = np.asarray(matrix, np.float64)
    rows, cols = m.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * cols + 2.0), max(3.0, 0.5 * rows + 1.5)))
    im = ax.imshow(m, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(cols), [str(c) for c in col_labels])
    ax.set_yticks(range(rows), [str(r) for r in row_labels])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    span = (vmax - vmin) or 1.0
    for i in range(rows):
        for j in range(cols):
            v = m[i, j]
            if np.isfinite(v):
                frac = (v - vmin) / span
                color = "black" if 0.25 < frac < 0.8 else "white"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def line_plot(
    xs: Sequence[float],
    ys_by_label: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: str | Path,
    *,
    vline: float | None = None,
    vline_label: str = "",
    logx: bool = False,
) -> Path:
    """One line per label over ``xs`` (markers at the points), optional vertical line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, ys in ys_by_label.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    if vline is not None:
        ax.axvline(vline, color="gray", linestyle="--", label=vline_label or None)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(ys_by_label) > 1 or vline_label:
        ax.legend()
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------- runner


def run_eval(
    task_name: str,
    run: str | Path,
    overrides: Sequence[str] = (),
    *,
    step: int | None = None,
    progress: bool = True,
) -> dict:
    """Run every cell of a task on a run; writes RUN_DIR/evals/<task>/{results.json,table.md,
    *.png} and returns {"task", "run_dir", "step", "settings", "cells", "table", "plots"}."""
    from tqdm import tqdm

    from memzoo.data import build_tokenizer

    task = load_task(task_name)
    settings = parse_settings(task, overrides)
    cells = task.cells(settings)  # settings errors before the (slow) model load
    model, cfg, run_dir = load_run(run, step)
    ctx = EvalContext(
        model=model,
        cfg=cfg,
        tokenizer=build_tokenizer(cfg.data),
        run_dir=run_dir,
        step=int(model.restored_step),
    )
    results = []
    bar = tqdm(cells, desc=f"{task.NAME} cells", file=sys.stderr, disable=not progress)
    with bar:
        for cell in bar:
            metrics = task.run_cell(ctx, settings, dict(cell))
            results.append({**cell, **metrics})
    out_dir = run_dir / "evals" / task.NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task.NAME,
        "run_dir": str(run_dir),
        "step": ctx.step,
        "settings": dataclasses.asdict(settings),
        "cells": results,
    }
    (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    table = task.table(settings, results)
    (out_dir / "table.md").write_text(table.rstrip("\n") + "\n")
    plots = [Path(p) for p in task.plots(settings, results, out_dir)]
    return {**record, "table": table, "plots": [str(p) for p in plots], "out_dir": str(out_dir)}
