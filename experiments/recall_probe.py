"""Has a checkpoint learned to copy? Teacher-forced loss on the recall rows NIAH runs train on.

A recall row (``memzoo.data.passkey.recall_row``, the data behind ``data.recall_fraction``)
lists key-value pairs ``k is: v. ``, a newline, then repeats every pair verbatim in order,
then asks uniformly drawn keys until the row is full. The pairs' values are random, so their
digits cost about ln 10 = 2.3 nats each to any model; in the verbatim repeat every token can be
copied from earlier in the row, so a model with a copying (induction) circuit (Olsson et al.
2022) drives the loss there toward 0 and gets the value digits right. The lookups need the
value found by its key. This is the probe behind experiments/README.md's "How the copying
circuit appeared" (NIAH tiny) and the hybrid_ratio NIAH reading:

    python experiments/recall_probe.py sweeps/hybrid_ratio/runs/transformer_L12_pA_niah \
        sweeps/hybrid_ratio/runs/gated_deltanet_L12_pM_niah

For each run (latest checkpoint, or ``--step``) it prints the mean next-token loss in nats on
the three sections and the teacher-forced argmax accuracy on the value digits of the repeat
and of the lookups (chance 0.1), over ``--rows`` rows of ``--seq-len`` tokens (default: the
run's training length) drawn with ``--seed`` (not the training seed's rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

NONE, PAIRS, REPEAT, LOOKUP = 0, 1, 2, 3
SECTION_NAMES = {PAIRS: "pairs", REPEAT: "repeat", LOOKUP: "lookup"}


def sections(tokens: np.ndarray, newline_id: int, dot_id: int, special: set[int]) -> np.ndarray:
    """Section label (NONE/PAIRS/REPEAT/LOOKUP) of each token of one recall row.

    Before the newline: PAIRS (``n`` records ``k is: v. ``, each with one dot). After it, the
    first ``n`` records are the REPEAT and the rest LOOKUP. The newline and special tokens
    (BOS, EOS, pad) are NONE.
    """
    tokens = np.asarray(tokens)
    where = np.flatnonzero(tokens == newline_id)
    if where.size == 0:
        raise ValueError("not a recall row: no newline between the pairs and the queries")
    nl = int(where[0])
    n_pairs = int(np.sum(tokens[:nl] == dot_id))
    labels = np.full(tokens.shape, NONE, np.int8)
    done, after_dot = 0, False
    for t, tok in enumerate(tokens.tolist()):
        if tok in special or t == nl:
            continue
        if t < nl:
            labels[t] = PAIRS
            continue
        labels[t] = REPEAT if done < n_pairs else LOOKUP
        if after_dot:  # the separator after a record's dot still belongs to the record
            done, after_dot = done + 1, False
        elif tok == dot_id:
            after_dot = True
    return labels


def score(
    logp: np.ndarray, rows: list[dict[str, np.ndarray]], ids: dict[str, Any]
) -> dict[str, float]:
    """Loss per section and value-digit accuracy from log-probs [rows, T, V] of the rows.

    ``ids``: ``newline``, ``dot`` (token ids), ``digits`` and ``special`` (sets of ids). A
    target is labelled with the section of the token it predicts.
    """
    loss: dict[int, list[float]] = {k: [] for k in SECTION_NAMES}
    hits: dict[int, list[bool]] = {REPEAT: [], LOOKUP: []}
    for b, row in enumerate(rows):
        x, y, mask = row["inputs"], row["targets"], row["loss_mask"]
        full = np.concatenate([x, y[-1:]])
        lab = sections(full, ids["newline"], ids["dot"], ids["special"])[1:]
        nll = -np.take_along_axis(logp[b], y[:, None], -1)[:, 0]
        pred = logp[b].argmax(-1)
        for t in np.flatnonzero(mask > 0):
            s = int(lab[t])
            if s == NONE:
                continue
            loss[s].append(float(nll[t]))
            if s in hits and int(y[t]) in ids["digits"]:
                hits[s].append(bool(pred[t] == y[t]))
    out = {f"{SECTION_NAMES[s]}_loss": float(np.mean(v)) for s, v in loss.items() if v}
    out.update({f"{SECTION_NAMES[s]}_digit_acc": float(np.mean(v)) for s, v in hits.items() if v})
    out["value_digits"] = float(len(hits[REPEAT]) + len(hits[LOOKUP]))
    return out


def token_ids(tokenizer: Any) -> dict[str, Any]:
    """The ids ``score`` needs; a clear error for a tokenizer that merges ``.`` or newline."""
    one = {}
    for name, ch in (("newline", "\n"), ("dot", ".")):
        enc = list(tokenizer.encode(ch))
        if len(enc) != 1:
            raise SystemExit(f"recall_probe: the tokenizer encodes {ch!r} as {enc}; need 1 token")
        one[name] = enc[0]
    digits = {i for d in "0123456789" for i in tokenizer.encode(d)}
    special = {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None}
    return {**one, "digits": digits, "special": special}


def probe(run: str | Path, rows: int, seq_len: int | None, seed: int, step: int | None) -> dict:
    """Load ``run`` and score it on ``rows`` fresh recall rows."""
    from memzoo.data.passkey import recall_row
    from memzoo.data.tokenizer import build_tokenizer
    from memzoo.evals.runner import EvalContext, load_run

    model, cfg, run_dir = load_run(run, step)
    tok = build_tokenizer(cfg.data)
    ctx = EvalContext(model, cfg, tok, run_dir, int(model.restored_step))
    T = seq_len or int(cfg.seq_len)
    batch = [recall_row(tok, T, seed, n) for n in range(rows)]
    logits = ctx.logits(np.stack([r["inputs"] for r in batch]))
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    out = score(logp, batch, token_ids(tok))
    return {"run": str(run_dir), "step": ctx.step, "seq_len": T, **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (or checkpoint directories)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the run's seq_len")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    a = ap.parse_args(argv)
    cols = ["pairs_loss", "repeat_loss", "lookup_loss", "repeat_digit_acc", "lookup_digit_acc"]
    print("| run | step | T | " + " | ".join(cols) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    for run in a.runs:
        try:
            r = probe(run, a.rows, a.seq_len, a.seed, a.step)
        except FileNotFoundError as e:
            print(f"recall_probe: {e}", file=sys.stderr)
            return 2
        vals = " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols)
        print(f"| {Path(r['run']).name} | {r['step']} | {r['seq_len']} | {vals} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
