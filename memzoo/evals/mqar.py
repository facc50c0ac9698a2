"""MQAR evaluation (Zoology-style multi-query associative recall): ``memzoo eval mqar RUN``.

Sweeps sequence length x number of key-value pairs on samples from the MQAR generator
(``memzoo.data.mqar``, evaluation stream, so never the training or held-out rows) and scores
the greedy prediction (argmax over the full vocabulary) at every query position: accuracy =
correct queried values / queried positions. One forward pass per batch, no generation.

The run need not have been trained on ``data.source=mqar``: with ``vocab_size`` set
explicitly any model whose vocabulary holds ``vocab_size + 4`` ids can be probed (ids
``vocab_size .. vocab_size + 3`` are used as filler / BOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memzoo.data.mqar import EVAL_STREAM, NUM_SPECIALS, MQARSource, MQARSpec

NAME = "mqar"


def _error(msg: str) -> Exception:
    try:
        from memzoo.evals.runner import EvalError
    except ImportError:  # pragma: no cover - runner not available
        return ValueError(msg)
    return EvalError(msg)


@dataclass
class Settings:
    """MQAR settings (``memzoo eval mqar RUN_DIR key=value ...``).

    Attributes:
      seq_lens: comma-separated sequence lengths (tokens fed to the model).
      num_pairs: comma-separated numbers of key-value pairs; cells whose length cannot hold
        the pairs and their queries (``seq_len < 2 * pairs * (1 + passes)``) are skipped.
      passes: queries per key.
      vocab_size: regular ids (keys the lower half, values the upper); 0 = the run's
        ``data.mqar_vocab_size`` (required to be set for runs not trained on mqar).
      gap_power: query-slot power law (see ``memzoo.data.mqar``).
      samples: sequences per cell.
      batch_size: sequences per forward pass.
      seed: generator seed (samples are a function of seed, cell and index).
    """

    seq_lens: str = "64,128,256"
    num_pairs: str = "4,8,16"
    passes: int = 1
    vocab_size: int = 0
    gap_power: float = 0.01
    samples: int = 256
    batch_size: int = 32
    seed: int = 0


def _ints(text: Any, what: str) -> list[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise _error(f"mqar: {what} must be comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise _error(f"mqar: {what} must be positive integers, got {text!r}")
    return out


def cells(s: Settings) -> list[dict]:
    """Every (seq_len, num_pairs) combination that fits, in order of length then pairs."""
    if s.passes < 1 or s.samples < 1 or s.batch_size < 1:
        raise _error("mqar: passes, samples and batch_size must be >= 1")
    out = []
    for t in _ints(s.seq_lens, "seq_lens"):
        for n in _ints(s.num_pairs, "num_pairs"):
            if t >= 2 * n * (1 + s.passes):
                out.append({"seq_len": t, "num_pairs": n})
    if not out:
        raise _error(
            f"mqar: no cell fits: every seq_len in {s.seq_lens!r} is shorter than "
            f"2 * num_pairs * (1 + passes) for num_pairs in {s.num_pairs!r}"
        )
    return out


def resolve_vocab(ctx: Any, s: Settings) -> int:
    """The MQAR vocabulary for this run (``s.vocab_size`` or the run's data config)."""
    v = int(s.vocab_size)
    cfg = getattr(ctx, "cfg", None)
    if v == 0:
        if cfg is None or getattr(cfg.data, "source", None) != "mqar":
            raise _error(
                "mqar: this run was not trained on data.source=mqar; "
                "set vocab_size=N (N + 4 <= the model's vocabulary)"
            )
        v = int(cfg.data.mqar_vocab_size)
    if cfg is not None and cfg.model.vocab_size and v + NUM_SPECIALS > cfg.model.vocab_size:
        raise _error(
            f"mqar: vocab_size={v} needs {v + NUM_SPECIALS} ids but the model has "
            f"{cfg.model.vocab_size}"
        )
    return v


def run_cell(ctx: Any, s: Settings, cell: dict) -> dict:
    """Accuracy over the query positions of ``s.samples`` sequences of this cell."""
    v = resolve_vocab(ctx, s)
    spec = MQARSpec(v, int(cell["seq_len"]), int(cell["num_pairs"]), int(s.passes), s.gap_power)
    try:
        spec.check()
    except ValueError as e:
        raise _error(f"mqar: {e}") from None
    src = MQARSource(spec, seed=s.seed, stream=EVAL_STREAM, with_distances=True)
    correct = total = 0
    dist_sum = 0
    for start in range(0, s.samples, s.batch_size):
        batch = src.batch(start, min(s.batch_size, s.samples - start))
        logits = np.asarray(ctx.logits(batch["inputs"].astype(np.int32)))
        pred = logits.argmax(-1)
        mask = batch["loss_mask"] > 0
        correct += int((pred[mask] == batch["targets"][mask]).sum())
        total += int(mask.sum())
        dist_sum += int(batch["distances"][mask].sum())
    return {
        "accuracy": correct / max(total, 1),
        "correct": correct,
        "queries": total,
        "samples": int(s.samples),
        "vocab_size": v,
        "passes": int(s.passes),
        "mean_distance": dist_sum / max(total, 1),
        "chance": spec.chance,
    }


def table(s: Settings, results: list[dict]) -> str:
    """Markdown: rows = number of pairs, columns = sequence lengths, cells = accuracy (%)."""
    lens = sorted({int(r["seq_len"]) for r in results})
    pairs = sorted({int(r["num_pairs"]) for r in results})
    acc = {(int(r["num_pairs"]), int(r["seq_len"])): r["accuracy"] for r in results}
    lines = [
        "| pairs \\ seq_len | " + " | ".join(str(t) for t in lens) + " |",
        "|---|" + "---:|" * len(lens),
    ]
    for n in pairs:
        row = [f"{100 * acc[(n, t)]:.1f}" if (n, t) in acc else "-" for t in lens]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    if results:
        mean = sum(r["accuracy"] for r in results) / len(results)
        lines += [
            "",
            f"MQAR accuracy (%) over queried positions, {s.samples} samples per cell, "
            f"passes={s.passes}, seed={s.seed}; mean {100 * mean:.1f}%",
        ]
    return "\n".join(lines) + "\n"


def plots(s: Settings, results: list[dict], out_dir: Path) -> list[Path]:
    """``accuracy.png``: accuracy vs number of pairs, one line per sequence length."""
    if not results:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for t in sorted({int(r["seq_len"]) for r in results}):
        rows = sorted((r for r in results if int(r["seq_len"]) == t), key=lambda r: r["num_pairs"])
        ax.plot(
            [r["num_pairs"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            marker="o",
            label=f"T={t}",
        )
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("MQAR")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
