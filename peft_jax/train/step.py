"""Train state and the pure, jitted train / eval steps.

The state holds only what training changes: the trainable tree (the delta, plus any base
leaves a rule selected, e.g. BitFit biases), its optimizer state, the step and the rng.
The frozen base is a separate argument, never differentiated and never donated, so it
costs no gradient buffers, no optimizer state, and is bit-identical after training.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

Array = Any
# loss_fn(variables, batch, dropout_rng, deterministic) -> (loss, metrics dict of scalars)
LossFn = Callable[[dict, dict, Array, bool], tuple[Array, dict]]
# assemble(frozen, trainable) -> flax variables {"params": base, "peft": delta}
AssembleFn = Callable[[Any, Any], dict]


@flax.struct.dataclass
class TrainState:
    step: Array
    trainable: Any
    opt_state: Any
    rng: Array

    @classmethod
    def create(cls, trainable: Any, tx: optax.GradientTransformation, rng: Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable,
                   opt_state=tx.init(trainable), rng=rng)


def _tree_all_finite(tree: Any) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(loss_fn: LossFn, assemble: AssembleFn, tx: optax.GradientTransformation,
                    grad_accum: int = 1) -> Callable:
    """Build ``train_step(state, frozen, batch) -> (state, metrics)`` (not yet jitted).

    ``grad_accum > 1`` splits the batch's leading axis into that many micro-batches and sums
    gradients with ``lax.scan`` (same result as one big batch, up to float order).
    A step whose loss or gradients are not finite leaves the state unchanged and reports
    ``metrics["finite"] = 0`` so the loop can stop with the step number.
    """

    def grads_of(trainable, frozen, batch, rng):
        def f(tr):
            return loss_fn(assemble(frozen, tr), batch, rng, False)
        return jax.value_and_grad(f, has_aux=True)(trainable)

    def train_step(state: TrainState, frozen: Any, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        if grad_accum == 1:
            (loss, metrics), grads = grads_of(state.trainable, frozen, batch, step_rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)
            zeros = jax.tree.map(jnp.zeros_like, state.trainable)

            def body(carry, xs):
                g_acc, l_acc, i = carry
                (l, m), g = grads_of(state.trainable, frozen, xs, jax.random.fold_in(step_rng, i))
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, i + 1), m

            (grads, loss, _), ms = jax.lax.scan(body, (zeros, 0.0, 0), micro)
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss = loss / grad_accum
            metrics = jax.tree.map(jnp.mean, ms)
        finite = jnp.isfinite(loss) & _tree_all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(step=state.step + 1, trainable=keep(trainable, state.trainable),
                               opt_state=keep(opt_state, state.opt_state), rng=rng)
        metrics = dict(metrics)
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return train_step


def make_eval_step(predict_fn: Callable[[dict, dict], Any], assemble: AssembleFn) -> Callable:
    """``eval_step(trainable, frozen, batch) -> predict_fn(variables, batch)`` (deterministic)."""

    def eval_step(trainable: Any, frozen: Any, batch: dict):
        return predict_fn(assemble(frozen, trainable), batch)

    return eval_step


def jit_train_step(train_step: Callable, state_sharding: Any = None, frozen_sharding: Any = None,
                   batch_sharding: Any = None) -> Callable:
    """jit with the state donated (its buffers are reused for the new state)."""
    kw = {}
    if state_sharding is not None:
        kw = dict(in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                  out_shardings=(state_sharding, None))
    return jax.jit(train_step, donate_argnums=(0,), **kw)
