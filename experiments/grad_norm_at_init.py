"""Gradient norm of a run's model at initialisation, on one held-out MQAR batch.

    python experiments/grad_norm_at_init.py sweeps/mqar_zoo/runs/yaad_d64_T128_kv8
    python experiments/grad_norm_at_init.py RUN --lengths 80,96,112,128 --impl scan,auto
    python experiments/grad_norm_at_init.py RUN model.gm_loss=l2 model.gm_layer_norm=false

The model is built from the run's config.yaml with the run's seed (the weights training starts
from; no checkpoint is read), with ``model.*`` overrides applied on top. For each length and
``model.impl`` it prints the masked cross-entropy (the training loss) and the global gradient
norm over all parameters, then the parameters with the largest gradient norms. A norm that
grows with the length points at the recurrence (explosion through time), not at one layer.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import yaml
from flax import nnx

from memzoo.api import load_config
from memzoo.data.mqar import mqar_heldout_batches
from memzoo.models.lm import build_model


def grad_norms(run: Path, length: int, impl: str, overrides: dict, batch: int, top: int) -> None:
    cfg = load_config(run)
    if cfg.data.source != "mqar":
        raise SystemExit(f"{run}: data.source is {cfg.data.source!r}; this probe needs mqar")
    b = mqar_heldout_batches(cfg.data, batch_size=batch, seq_len=length, max_batches=1)[0]
    model = build_model(dataclasses.replace(cfg.model, impl=impl, **overrides), seed=cfg.seed)

    def loss_fn(model: nnx.Module) -> jax.Array:
        logits, _ = model(jnp.asarray(b["inputs"]), segment_ids=jnp.asarray(b["segment_ids"]))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(b["targets"]))
        mask = jnp.asarray(b["loss_mask"])
        return (nll * mask).sum() / mask.sum()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    state = nnx.state(grads)
    total = float(optax.global_norm(state))
    print(f"T {length:4d}  impl {impl:5s}  loss {float(loss):.4f}  grad norm {total:.4g}")
    leaves = jax.tree_util.tree_leaves_with_path(state)
    norms = sorted(((float(jnp.linalg.norm(v)), jax.tree_util.keystr(p)) for p, v in leaves))
    for n, path in norms[::-1][:top]:
        print(f"    {n:10.4g}  {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="run directory (holds config.yaml)")
    ap.add_argument("overrides", nargs="*", help="model.KEY=VALUE (YAML values)")
    ap.add_argument("--lengths", default="", help="comma-separated; default the run's seq_len")
    ap.add_argument("--impl", default="auto", help="comma-separated model.impl values")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top", type=int, default=4, help="largest per-parameter norms shown")
    args = ap.parse_args()
    overrides = {}
    for kv in args.overrides:
        key, sep, value = kv.partition("=")
        if not sep or not key.startswith("model."):
            raise SystemExit(f"override {kv!r}: expected model.KEY=VALUE")
        overrides[key.removeprefix("model.")] = yaml.safe_load(value)
    cfg = load_config(args.run)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg.model)}
    if unknown:
        raise SystemExit(f"unknown model keys: {', '.join(sorted(unknown))}")
    lengths = [int(t) for t in args.lengths.split(",") if t] or [cfg.seq_len]
    for length in lengths:
        for impl in args.impl.split(","):
            grad_norms(args.run, length, impl, overrides, args.batch, args.top)


if __name__ == "__main__":
    main()
