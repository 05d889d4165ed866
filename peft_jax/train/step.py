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

from peft_jax.parallel.mesh import under_mesh

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


def _max_abs(tree: Any) -> Array:
    """Largest |value| over a tree's leaves (NaN if any is NaN; 0 for an empty tree)."""
    leaves = [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree) if x.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros((), jnp.float32)


def update_ratio(updates: Any, params: Any, floor: float = 0.1) -> Array:
    """``max|update| / max(max|param|, floor)``: the largest update element relative to the
    largest parameter (one pass over each tree, no overflow for huge finite values; the
    floor keeps a zero-initialized tree from reading as an explosion)."""
    return _max_abs(updates) / jnp.maximum(_max_abs(params), floor)


def make_train_step(loss_fn: LossFn, assemble: AssembleFn, tx: optax.GradientTransformation,
                    grad_accum: int = 1, max_update_ratio: float = 100.0) -> Callable:
    """Build ``train_step(state, frozen, batch) -> (state, metrics)`` (not yet jitted).

    ``grad_accum > 1`` splits the batch's leading axis into that many micro-batches and sums
    gradients with ``lax.scan`` (same result as one big batch, up to float order).

    Health check, every step, inside the step: the update is applied only if the loss, the
    gradient norm, the update, the UPDATED parameters and optimizer state are all finite
    and the update is not an explosion (``update_ratio > max_update_ratio``, see
    :func:`update_ratio`; 0 turns that guard off). Otherwise the state keeps its previous values (step and rng advance)
    and ``metrics["applied"] = 0`` (``finite``, ``update_ratio`` say why), so the loop can
    stop with the step number and a non-finite or exploded state is never checkpointed.
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
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ratio = update_ratio(updates, state.trainable)
        grad_norm = optax.global_norm(grads)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(ratio)
                  & _tree_all_finite(trainable) & _tree_all_finite(opt_state))
        applied = finite & (ratio <= max_update_ratio) if max_update_ratio > 0 else finite
        # one branch, not a select per leaf: XLA would fuse the whole chain of per-leaf
        # checks into every leaf's select (compile time quadratic in the number of leaves)
        trainable, opt_state = jax.lax.cond(applied, lambda: (trainable, opt_state),
                                            lambda: (state.trainable, state.opt_state))
        new_state = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                               rng=rng)
        metrics = dict(metrics)
        metrics.update(loss=loss, grad_norm=grad_norm, update_ratio=ratio,
                       finite=finite.astype(jnp.float32), applied=applied.astype(jnp.float32))
        return new_state, metrics

    return train_step


def make_eval_step(predict_fn: Callable[[dict, dict], Any], assemble: AssembleFn) -> Callable:
    """``eval_step(trainable, frozen, batch) -> predict_fn(variables, batch)`` (deterministic)."""

    def eval_step(trainable: Any, frozen: Any, batch: dict):
        return predict_fn(assemble(frozen, trainable), batch)

    return eval_step


def jit_train_step(train_step: Callable, state_sharding: Any = None, frozen_sharding: Any = None,
                   batch_sharding: Any = None) -> Callable:
    """jit with the state donated (its buffers are reused for the new state); with
    shardings, traced under their mesh (the models' activation constraints apply)."""
    kw = {}
    if state_sharding is not None:
        kw = dict(in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                  out_shardings=(state_sharding, None))
    mesh = next((s.mesh for s in jax.tree.leaves(state_sharding) if hasattr(s, "mesh")), None)
    return under_mesh(jax.jit(train_step, donate_argnums=(0,), **kw), mesh)
