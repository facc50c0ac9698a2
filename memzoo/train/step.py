"""The jitted train and eval steps, written over a device mesh.

Parameters are split from the NNX graph (``nnx.split``) so the steps are pure functions of
arrays: ``train_step(params, opt_state, batch) -> (params, opt_state, metrics)``.

Auxiliary losses (MoM's load balancing) are sown by layers as ``nnx.Intermediate``
``aux_loss`` values, only under ``nnx.capture``. The train step runs :func:`lm_loss` under
capture and optimises ``(NLL_sum + aux * count) / count = NLL_mean + aux`` (aux summed over
layers); it reports ``aux_loss`` and ``mom_load`` (per-layer token fractions per memory) when a
model sows them. The eval step calls :func:`lm_loss` without capture: held-out loss stays NLL.
Models that sow nothing train exactly as before (nothing is added to their loss).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memzoo.layers.partitioning import activation_sharding

Array = jax.Array


def lm_loss(model: nnx.Module, batch: dict[str, Array]) -> tuple[Array, Array]:
    """Summed next-token NLL (nats) over loss-masked targets, and the number of such targets."""
    logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _named(inter: Any, name: str) -> list[Array]:
    """Values sown under ``name`` (in module order), from a captured intermediates State."""
    out = []
    for path, var in nnx.to_flat_state(inter):
        if path and path[-1] == name:
            vals = var.get_value() if hasattr(var, "get_value") else var
            out.extend(vals if isinstance(vals, tuple) else (vals,))
    return out


def loss_with_aux(model: nnx.Module, batch: dict[str, Array]) -> tuple[Array, Any]:
    """Training objective: ``lm_loss`` under ``nnx.capture``; returns ``(summed loss,
    (count, extras))`` with ``summed loss = NLL_sum + aux * count`` when the model sows aux
    losses, and extras ``{"aux_loss": [], "mom_load": [layers, M]}`` (empty when none)."""
    (loss_sum, count), inter = nnx.capture(lm_loss, nnx.Intermediate)(model, batch)
    extras: dict[str, Array] = {}
    aux = _named(inter, "aux_loss")
    if aux:
        total = sum(jnp.asarray(a, jnp.float32) for a in aux)
        loss_sum = loss_sum + total * jax.lax.stop_gradient(jnp.maximum(count, 1.0))
        extras["aux_loss"] = total
    load = _named(inter, "mom_load")
    if load:
        extras["mom_load"] = jnp.stack([jnp.asarray(x, jnp.float32) for x in load])
    return loss_sum, (count, extras)


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    grad_accum: int,
    *,
    mesh: Any = None,
    rules: Any = None,
    param_sharding: Any = None,
    opt_sharding: Any = None,
    batch_sharding: Any = None,
    jit: bool = True,
):
    """A jitted step. The global batch is split into ``grad_accum`` micro-batches whose summed
    gradients are normalised by the total token count, so accumulation equals one big batch.
    A non-finite loss or gradient leaves params and optimiser state untouched (``finite`` says
    so); the host decides whether to stop or to skip (:func:`make_row_loss` then tells which
    input rows were non-finite).

    Sharding (``memzoo.train.sharding``): with ``mesh`` and ``rules`` (the config's
    ``mesh.rules``) activations are constrained at block boundaries; with ``param_sharding``,
    ``opt_sharding`` and ``batch_sharding`` the step is jitted with those in/out shardings
    (metrics replicated). ``jit=False`` returns the plain step function, for callers that jit
    (or ``.lower``) it themselves."""

    def summed_loss(params, batch):
        # lm_loss is looked up at trace time (inside loss_with_aux) so tests can substitute it.
        with activation_sharding(mesh, rules):
            return loss_with_aux(nnx.merge(graphdef, params), batch)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step(params, opt_state, batch):
        if grad_accum == 1:
            (loss_sum, (count, extras)), grads = grad_fn(params, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
            )

            def body(carry, mb):
                g_acc, l_acc, n_acc = carry
                (l, (n, ex)), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), ex

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, count), extras = jax.lax.scan(
                body, (zeros, jnp.zeros(()), jnp.zeros(())), micro
            )
            extras = jax.tree.map(lambda x: jnp.mean(x, axis=0), extras)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": count}
        metrics.update(extras)
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    if not jit:
        return step
    if param_sharding is None:
        return jax.jit(step, donate_argnums=(0, 1))
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(param_sharding, opt_sharding, batch_sharding),
        out_shardings=(param_sharding, opt_sharding, replicated),
        donate_argnums=(0, 1),
    )


def make_loss_grad(graphdef: Any):
    """Jitted ``(state, batch) -> (mean next-token loss, its gradient)`` for a model state
    (``lm_loss`` without the auxiliary losses, no optimiser): for probes that inspect the
    outer gradient of a model or a checkpoint (experiments/titans_inner_lr.py,
    experiments/grad_norms.py)."""

    def mean_loss(state, batch):
        total, count = lm_loss(nnx.merge(graphdef, state), batch)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))


def make_row_loss(graphdef: Any):
    """Jitted summed training NLL of each batch row on its own, ``[B]`` (``lm_loss`` per row),
    used only after a non-finite step, to name the offending input rows."""

    @jax.jit
    def row_loss(params, batch):
        model = nnx.merge(graphdef, params)

        def one(row):
            return lm_loss(model, jax.tree.map(lambda x: x[None], row))[0]

        return jax.vmap(one)(batch)

    return row_loss


def make_eval_step(graphdef: Any):
    @jax.jit
    def eval_step(params, batch):
        return lm_loss(nnx.merge(graphdef, params), batch)

    return eval_step
