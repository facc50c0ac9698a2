"""Where a run's outer gradient is large: per-parameter gradient norms of a checkpoint.

A run's metrics.jsonl logs one number, the global gradient norm before clipping. When it
explodes (the Titans MAC rows of mqar_zoo and titans_mac_stability reach 1e7-1e9 before a
non-finite step), this says which parameters carry it: the norm of d(mean next-token loss)/d p
for every parameter p of the checkpoint, on the first ``--batches`` batches of the run's own
training stream, summed (root of the sum of squares) per block and sublayer, e.g.
``blocks/0/mixer/mem``, ``blocks/1/mlp``, ``embed``:

    python experiments/grad_norms.py RUN_DIR                   # latest checkpoint, 2 batches
    python experiments/grad_norms.py RUN_DIR --step 250 --batches 3 --top 8
    python experiments/grad_norms.py RUN_DIR --step 250 --spans 64   # per 64-token span

``--spans L`` splits each batch's loss by position: the gradient of the loss on the targets at
positions [0, L), [L, 2L), ... alone (the inputs are the whole rows; a causal model's loss in
a span sees every earlier token). With L = ``model.titans_segment`` this says whether the
gradient grows with the number of memory segments a target's loss is read through.

It reads the checkpoint's parameters only and trains nothing; the batches are the start of
the stream (MQAR rows are generated, so any batch is a fair sample), not the batch of the
failing step.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import memzoo
from memzoo.data.pipeline import make_train_iterator
from memzoo.data.tokenizer import build_tokenizer
from memzoo.train.step import make_loss_grad


def param_norms(grads: Any) -> dict[str, float]:
    """{"blocks/0/mixer/mem/in_proj/kernel": norm, ...} for every leaf of a gradient state."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if keys and keys[-1] == "value":
            keys = keys[:-1]
        out["/".join(keys)] = float(jnp.linalg.norm(jnp.ravel(leaf).astype(jnp.float32)))
    return out


def group_of(name: str) -> str:
    """The sublayer a parameter belongs to: ``blocks/i/<sublayer>[/<part>]`` for a block's
    mixer (split into its parts, e.g. ``mixer/mem`` and ``mixer/attn`` of a Titans layer) and
    ``blocks/i/<sublayer>`` otherwise; the first path element outside the blocks."""
    parts = name.split("/")
    if parts[0] != "blocks" or len(parts) < 3:
        return parts[0]
    depth = 4 if parts[2] == "mixer" and len(parts) > 4 else 3
    return "/".join(parts[:depth])


def group_norms(norms: dict[str, float]) -> dict[str, float]:
    """Root of the sum of squares of ``norms`` per :func:`group_of`."""
    sq: dict[str, float] = defaultdict(float)
    for name, v in norms.items():
        sq[group_of(name)] += v * v
    return {k: math.sqrt(v) for k, v in sq.items()}


def span_batches(batch: dict[str, Any], span: int) -> list[tuple[int, int, dict[str, Any]]]:
    """``[(start, end, batch with loss_mask zero outside [start, end))]`` for consecutive
    ``span``-token spans of the rows; the masks add up to the batch's own."""
    if span < 1:
        raise ValueError(f"--spans must be >= 1, got {span}")
    T = batch["loss_mask"].shape[1]
    out = []
    for start in range(0, T, span):
        end = min(start + span, T)
        pos = jnp.arange(T)
        keep = ((pos >= start) & (pos < end))[None, :]
        mask = jnp.where(keep, batch["loss_mask"], jnp.zeros_like(batch["loss_mask"]))
        out.append((start, end, {**batch, "loss_mask": mask}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--top", type=int, default=6, help="largest single parameters to list")
    ap.add_argument("--spans", type=int, default=0, help="also per span of this many tokens")
    args = ap.parse_args()

    model, cfg = memzoo.load(args.run_dir, args.step)
    data = make_train_iterator(
        cfg.data,
        build_tokenizer(cfg.data),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    graphdef, state = nnx.split(model)
    grad = make_loss_grad(graphdef)
    print(f"{args.run_dir} at step {model.restored_step}")
    for i in range(args.batches):
        batch = {k: jnp.asarray(v) for k, v in next(data).items()}
        loss, grads = grad(state, batch)
        norms = param_norms(grads)
        total = math.sqrt(sum(v * v for v in norms.values()))
        print(f"\nbatch {i}: loss {float(loss):.4f}  gradient norm {total:.4g}")
        for name, v in sorted(group_norms(norms).items()):
            print(f"  {v:12.4g}  {name}")
        print(f"  largest {args.top}:")
        for name, v in sorted(norms.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {v:12.4g}  {name}")
        if args.spans:
            print(f"  per {args.spans}-token span of targets (loss, gradient norm, largest parts):")
        for start, end, part in span_batches(batch, args.spans) if args.spans else []:
            n = int(part["loss_mask"].sum())
            if n == 0:
                print(f"  [{start:4d}, {end:4d})  no loss targets")
                continue
            loss, grads = grad(state, part)
            groups = group_norms(param_norms(grads))
            top = sorted(groups.items(), key=lambda kv: -kv[1])[:2]
            print(
                f"  [{start:4d}, {end:4d})  {n:5d} targets  loss {float(loss):.4f}  "
                f"gradient norm {float(optax.global_norm(grads)):.4g}  "
                + ", ".join(f"{k} {v:.3g}" for k, v in top)
            )


if __name__ == "__main__":
    main()
