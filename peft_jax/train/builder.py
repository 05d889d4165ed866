"""One builder of the train state, used by every entry point (the runner, SimCSE, the
benchmarks)::

    ts = build_train_state(model, base, methods, inputs, rng, make_tx, mesh=mesh)
    step = jit_train_step(make_train_step(loss_fn, ts.variables, ts.tx, grad_accum),
                          ts.state_sh, ts.frozen_sh)
    state, metrics = step(ts.state, ts.frozen, batch)

It initializes the delta (:func:`peft_jax.peft.init_delta` over ``inputs``: any arrays of
the right rank, the delta's shapes do not depend on them), splits it from the base by the
methods (:func:`peft_jax.peft.partition.split_trainable`: trainable delta + base leaves the
methods select, frozen base + method-owned frozen state), builds the optimizer over the
trainable tree only, and places everything on the mesh: frozen base leaves by the
logical-axis rules table (``peft_jax.parallel.mesh``), the small delta, the optimizer state
and method-owned frozen leaves replicated.

With ``scan_layers`` the delta is stacked once here (``layers`` leaves ``[n, ...]``, like
the base): the state, its optimizer state and the step see one leaf per stacked tensor;
``transform`` (e.g. ``train.init_from``) still receives the per-layer form, and
``peft_jax.runner.run.delta_tree`` gives it back.

``abstract_state()`` gives the state as ``jax.ShapeDtypeStruct`` leaves with their
shardings, which is what a checkpoint restore needs (no data, no real init of the
optimizer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from peft_jax.models import quantize
from peft_jax.models.slots import Slots
from peft_jax.models.stack import is_scanned, stack_layers, unstack_layers
from peft_jax.parallel.mesh import logical_axes_tree, shardings_for
from peft_jax.peft import tree
from peft_jax.peft.init_delta import init_delta
from peft_jax.peft.partition import BASE_KEY, DELTA_KEY, split_trainable, variables_fn
from peft_jax.programs import ProgramCache
from peft_jax.train.checkpoint import abstract_with_shardings
from peft_jax.train.step import TrainState

Array = Any


@dataclasses.dataclass
class TrainSetup:
    """A train state ready for :func:`peft_jax.train.step.make_train_step`.

    ``variables(frozen, trainable)`` assembles the model variables (and materializes
    method-owned forms, e.g. the prefix MLP) inside the step.
    """

    state: TrainState
    frozen: Any
    tx: optax.GradientTransformation
    state_sh: Any
    frozen_sh: Any
    mesh: Any
    methods: tuple
    variables: Callable[[Any, Any], dict]

    def abstract_state(self) -> Any:
        """The state's shapes, dtypes and shardings (for checkpoint restore)."""
        shapes = jax.eval_shape(lambda s: s, self.state)
        if self.state_sh is None:
            return shapes
        return abstract_with_shardings(shapes, self.state_sh)


def _match(tree: Any, axes: Any) -> Any:
    """Axes tree restricted to the structure of ``tree`` (None where it has no axes)."""
    if isinstance(tree, Mapping):
        return {k: _match(v, axes.get(k) if isinstance(axes, Mapping) else None)
                for k, v in tree.items()}
    return axes if isinstance(axes, tuple) else None


def base_axes(model: Any, inputs: Mapping[str, Array], int8: bool = False) -> Any:
    """Logical-axis tuples of every base leaf, from an abstract init of the plain model
    (``int8``: as stored with int8 kernels and their scales)."""
    plain = model.clone(slots=Slots())
    arrays = {k: v for k, v in inputs.items() if hasattr(v, "shape")}
    static = {k: v for k, v in inputs.items() if k not in arrays}
    abstract = jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), **arrays, **static))
    return logical_axes_tree(quantize.abstract_quantized(abstract["params"]) if int8
                             else abstract["params"])


def _split(model: Any, base: Any, methods: tuple, inputs: Mapping[str, Array], rng: Array,
           transform: Optional[Callable[[Any], Any]],
           programs: Optional[ProgramCache] = None) -> tuple[Any, Any]:
    delta = init_delta(model, base, inputs, rng, methods, programs) if methods else {}
    trainable, frozen = split_trainable(base, delta, methods=methods)
    # base leaves a method trains (BitFit, full) leave a bf16 base in fp32: fp32 updates
    trainable = jax.tree.map(lambda a: a.astype(jnp.float32)
                             if jnp.issubdtype(a.dtype, jnp.floating) else a, trainable)
    scanned = is_scanned(model)
    if transform is not None:   # sees the per-layer form (trained base leaves: unstacked)
        trainable = transform(unstack_layers(trainable) if scanned else trainable)
    if scanned:   # one leaf per stacked tensor in the step (see models.stack)
        trainable = stack_layers(trainable)
        frozen = {BASE_KEY: frozen[BASE_KEY], DELTA_KEY: stack_layers(frozen[DELTA_KEY])}
    return trainable, frozen


def build_train_state(model: Any, base: Any, methods: Sequence[Any],
                      inputs: Mapping[str, Array], rng: Array,
                      make_tx: Callable[[Any], optax.GradientTransformation], *,
                      mesh: Any = None, transform: Optional[Callable[[Any], Any]] = None,
                      abstract: bool = False,
                      programs: Optional[ProgramCache] = None) -> TrainSetup:
    """Delta init, trainable/frozen split, optimizer, placement on ``mesh``.

    ``model``: the Flax module built with ``Slots(methods)``; ``base``: its pretrained
    params; ``inputs``: model inputs for the init (e.g. ``input_ids``, ``attention_mask``
    ``[1, 8]``; ``decoder_input_ids`` for encoder-decoders); ``make_tx(trainable)``: the
    optimizer; ``transform(trainable) -> trainable``: e.g. start from a saved delta
    (``train.init_from``). Without ``mesh`` the arrays stay on the default device.

    ``abstract=True``: ``state`` holds ``jax.ShapeDtypeStruct`` leaves (traced with
    ``jax.eval_shape``: no optimizer or delta is computed), for restoring a checkpoint into
    it; the frozen tree is still real (method-owned frozen state is computed), unless
    ``base`` itself is ``jax.ShapeDtypeStruct`` leaves (then so is the frozen tree, with its
    shardings: enough to lower and compile the step, e.g. ``benchmarks/scan_compile.py``).
    """
    methods = tuple(methods)
    k_delta, k_state = jax.random.split(rng)
    inputs = {k: jnp.asarray(v) if hasattr(v, "shape") else v for k, v in inputs.items()}
    if abstract:
        trainable, frozen_abs = jax.eval_shape(
            lambda b: _split(model, b, methods, inputs, k_delta, transform, programs), base)
        if tree.flatten(frozen_abs[DELTA_KEY]):   # method-owned frozen state: compute it
            _, frozen = _split(model, base, methods, inputs, k_delta, None, programs)
        else:
            frozen = split_trainable(base, {}, methods=methods)[1]
        tx = make_tx(trainable)
        state = jax.eval_shape(lambda t, r: TrainState.create(t, tx, r), trainable, k_state)
    else:
        trainable, frozen = _split(model, base, methods, inputs, k_delta, transform, programs)
        tx = make_tx(trainable)
        state = TrainState.create(trainable, tx, k_state)
    state_sh = frozen_sh = None
    shapes_only = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen))
    if mesh is not None:
        axes = base_axes(model, inputs, quantize.is_quantized(base))
        frozen_sh = {BASE_KEY: shardings_for(frozen[BASE_KEY], mesh,
                                             _match(frozen[BASE_KEY], axes)),
                     DELTA_KEY: shardings_for(frozen[DELTA_KEY], mesh)}
        state_sh = shardings_for(state, mesh)
        if not abstract:
            state = jax.device_put(state, state_sh)
        frozen = (abstract_with_shardings(frozen, frozen_sh) if shapes_only
                  else jax.device_put(frozen, frozen_sh))
    elif not shapes_only:
        frozen = jax.tree.map(jnp.asarray, frozen)
        if not abstract:   # numpy leaves (base leaves a method trains) would compile twice
            state = jax.tree.map(jnp.asarray, state)
    return TrainSetup(state=state, frozen=frozen, tx=tx, state_sh=state_sh, frozen_sh=frozen_sh,
                      mesh=mesh, methods=methods, variables=variables_fn(methods))
