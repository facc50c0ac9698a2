"""Outer-gradient norm of the Titans LMM at initialisation, by chunk size and max inner lr.

The titans_ablation sweep found the chunk-1 and chunk-4 LMMs stuck at the initial loss with
exploding gradients (median logged norm before clipping 160 at chunk 1 over its first 500
steps, 20 at chunk 4, 1.0 at 16).
This prints the same quantity at step 0, on the sweep's model and data (2 layers, d_model 64,
MQAR T 128 with 8 pairs, batch 32), for each chunk size x ``gm_eta_max`` (the ceiling of the
inner step eta_t = eta_max * sigmoid(W x), Titans' theta_t), so a setting can be checked in
under a minute before it is trained for an hour:

    python experiments/titans_inner_lr.py                       # chunks 1,4,16,64 x 1.0,0.3,0.1
    python experiments/titans_inner_lr.py --chunks 1 --eta-max 1.0 --extra model.gm_algorithm=gd
    python experiments/titans_inner_lr.py --chunks 16 --eta-max 1.0 --extra model=yaad

``--extra model=NAME`` swaps the Titans LMM for another gradient memory (yaad, moneta, ...;
the mqar_zoo d 64 / T 128 cell is this setting too): the probe behind the Yaad finding in
experiments/README.md (mqar_zoo, seventh slice).

Each cell is the median over ``--seeds`` initialisations (one batch each) of the global norm of
the gradient of the mean next-token loss with respect to every parameter.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import jax.numpy as jnp
import optax
from flax import nnx

from memzoo.config import load_config
from memzoo.data.pipeline import make_train_iterator
from memzoo.data.tokenizer import build_tokenizer
from memzoo.models.lm import build_model
from memzoo.train.step import make_loss_grad

MQAR_TINY = Path(__file__).resolve().parents[1] / "configs" / "train" / "mqar_tiny.yaml"
SWEEP = [  # configs/sweeps/titans_ablation.yaml's shared overrides
    "seq_len=128",
    "data.mqar_num_pairs=8",
    "model.n_layers=2",
    "model.d_model=64",
    "model=titans_lmm",
]


def grad_norm(overrides: list[str], seeds: int) -> tuple[float, float]:
    """Median outer-gradient norm and median loss (nats) at initialisation."""
    norms, losses = [], []
    step = None
    for seed in range(seeds):
        cfg = load_config(MQAR_TINY, [*SWEEP, *overrides, f"seed={seed}"])
        cfg.model.vocab_size = build_tokenizer(cfg.data).vocab_size
        model = build_model(cfg.model, seed=seed)
        data = make_train_iterator(
            cfg.data, None, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=seed
        )
        batch = {k: jnp.asarray(v) for k, v in next(iter(data)).items()}
        graphdef, state = nnx.split(model)
        step = step or make_loss_grad(graphdef)  # one compile per setting; the seeds reuse it
        loss, grads = step(state, batch)
        norms.append(float(optax.global_norm(grads)))
        losses.append(float(loss))
    return statistics.median(norms), statistics.median(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="1,4,16,64")
    ap.add_argument("--eta-max", default="1.0,0.3,0.1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    args = ap.parse_args()
    print(f"{'chunk':>5} {'eta_max':>7} {'grad norm':>10} {'loss':>6}")
    for chunk in args.chunks.split(","):
        for eta in args.eta_max.split(","):
            over = [f"model.chunk_size={chunk}", f"model.gm_eta_max={eta}", *args.extra]
            norm, loss = grad_norm(over, args.seeds)
            print(f"{chunk:>5} {eta:>7} {norm:>10.2f} {loss:>6.3f}", flush=True)


if __name__ == "__main__":
    main()
