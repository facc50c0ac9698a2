"""The jitted train and eval steps, written over a device mesh.

Parameters are split from the NNX graph (``nnx.split``) so the steps are pure functions of
arrays: ``train_step(params, opt_state, batch) -> (params, opt_state, metrics)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Array = jax.Array


def lm_loss(model: nnx.Module, batch: dict[str, Array]) -> tuple[Array, Array]:
    """Summed next-token NLL (nats) over loss-masked targets, and the number of such targets."""
    logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, grad_accum: int):
    """A jitted step. The global batch is split into ``grad_accum`` micro-batches whose summed
    gradients are normalised by the total token count, so accumulation equals one big batch.
    A non-finite loss or gradient leaves params and optimiser state untouched (``finite`` says
    so); the host decides whether to stop or to skip."""

    def summed_loss(params, batch):
        # Looked up at trace time so tests can substitute the loss.
        return lm_loss(nnx.merge(graphdef, params), batch)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step(params, opt_state, batch):
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
            )

            def body(carry, mb):
                g_acc, l_acc, n_acc = carry
                (l, n), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, count), _ = jax.lax.scan(
                body, (zeros, jnp.zeros(()), jnp.zeros(())), micro
            )
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": count}
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(graphdef: Any):
    @jax.jit
    def eval_step(params, batch):
        return lm_loss(nnx.merge(graphdef, params), batch)

    return eval_step
