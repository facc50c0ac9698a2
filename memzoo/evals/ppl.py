"""Perplexity task: held-out loss, perplexity and bits per byte at several context lengths.

For each length L the held-out split is packed into rows of L tokens (as in training) and
scored: loss = mean NLL per target token (nats) over all positions of the rows, ppl = exp(loss),
bpb = summed NLL / (ln 2 * UTF-8 bytes of the targets). Lengths above the run's training
``seq_len`` are marked ``extrapolation``; the plot is the length-extrapolation curve (bpb vs
context length, a dashed line at the training length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from memzoo.evals.runner import EvalContext, EvalError, line_plot

NAME = "ppl"


@dataclass
class Settings:
    lengths: str = "128,256,512,1024"  # comma-separated context lengths (tokens)
    batches: int = 4  # held-out batches per length
    batch_size: int = 4


def parse_lengths(lengths: str) -> list[int]:
    try:
        out = [int(x) for x in str(lengths).replace(" ", "").split(",") if x]
    except ValueError:
        raise EvalError(
            f"ppl setting 'lengths' expects integers like 128,256, got {lengths!r}"
        ) from None
    if not out or any(n < 2 for n in out):
        raise EvalError(f"ppl setting 'lengths' expects lengths >= 2, got {lengths!r}")
    return out


def cells(s: Settings) -> list[dict]:
    if s.batches < 1 or s.batch_size < 1:
        raise EvalError("ppl settings 'batches' and 'batch_size' must be >= 1")
    return [{"length": n} for n in parse_lengths(s.lengths)]


def run_cell(ctx: EvalContext, s: Settings, cell: dict) -> dict:
    from memzoo.data import heldout_batches
    from memzoo.evaluate import heldout_metrics

    length = int(cell["length"])
    try:
        batches = heldout_batches(
            ctx.cfg.data,
            ctx.tokenizer,
            batch_size=s.batch_size,
            seq_len=length,
            max_batches=s.batches,
        )
    except ValueError as e:
        raise EvalError(f"no held-out data for {ctx.run_dir}: {e}") from None
    res = heldout_metrics(lambda _, batch: ctx.nll(batch), None, batches, ctx.tokenizer)
    if not res or res["heldout_tokens"] == 0:
        raise EvalError(f"the held-out split of {ctx.run_dir} has no tokens to score")
    loss = res["heldout_loss"]
    train_len = int(ctx.cfg.seq_len)
    return {
        "train_len": train_len,
        "ratio": length / train_len,
        "extrapolation": length > train_len,
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": res["heldout_bpb"],
        "tokens": res["heldout_tokens"],
    }


def table(s: Settings, results: list[dict]) -> str:
    lines = [
        "| length | train_len ratio | loss | ppl | bpb |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mark = " (extrapolation)" if r["extrapolation"] else ""
        lines.append(
            f"| {r['length']}{mark} | {r['ratio']:.2f} | {r['loss']:.4f} | {r['ppl']:.3f} "
            f"| {r['bpb']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plots(s: Settings, results: list[dict], out_dir: Path) -> list[Path]:
    if not results:
        return []
    train_len = results[0]["train_len"]
    path = line_plot(
        [r["length"] for r in results],
        {"held-out bpb": [r["bpb"] for r in results]},
        "context length (tokens)",
        "bits per byte",
        f"Length extrapolation (trained at {train_len})",
        Path(out_dir) / "ppl_vs_length.png",
        vline=train_len,
        vline_label=f"training length {train_len}",
        logx=True,
    )
    return [path]
