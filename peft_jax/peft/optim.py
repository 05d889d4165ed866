"""Per-group optimizers: each label of the trainable tree gets its own optimizer.

::

    labels = label_tree(trainable, [(r"peft/head/.*", "head"), (r".*", "delta")])
    tx = make_optimizer({"delta": GroupConfig("adamw", 1e-3),
                         "head": GroupConfig("adamw", 1e-4, weight_decay=0.01)},
                        labels, clip_norm=1.0)

Built with ``optax.multi_transform``: a leaf's optimizer state exists only in its own
group. Global gradient clipping (``clip_norm``) acts on all groups together, before
them. A group with optimizer ``"frozen"`` gets zero updates and no state.

AdamW is optax's chain (``scale_by_adam``, decoupled weight decay, learning rate) with one
change, :func:`scale_by_adam`: the bias corrections ``1 - b**t`` are computed as
``-expm1(t * log(b))``. optax computes ``1 - float32(0.999)**t``, which loses about 1e-5
(relative) to rounding ``b2`` and to cancellation, a systematic difference from PyTorch's
AdamW (bias corrections in float64) that the training-trajectory parity test measures.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from peft_jax.peft.method import owner
from peft_jax.peft.partition import DELTA_KEY, map_with_paths

OPTIMIZERS = ("adamw", "adafactor", "sgd", "frozen")
SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """Optimizer of one parameter group.

    schedule: ``"constant"``, ``"linear"`` or ``"cosine"``, each after ``warmup_steps`` of
    linear warmup from 0; decays go from ``learning_rate`` to
    ``learning_rate * end_lr_factor`` at ``total_steps`` (required by the decays).
    ``weight_decay``: decoupled (AdamW style) for adamw/sgd, Adafactor's
    ``weight_decay_rate`` for adafactor.
    """

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    end_lr_factor: float = 0.0
    weight_decay: float = 0.0
    # adamw
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # sgd
    momentum: Optional[float] = None
    # adafactor
    decay_rate: float = 0.8
    multiply_by_parameter_scale: bool = True
    clipping_threshold: Optional[float] = 1.0
    min_dim_size_to_factor: int = 128

    @classmethod
    def lester(cls, **overrides) -> "GroupConfig":
        """Prompt tuning as in Lester et al. 2021: Adafactor, lr 0.3 constant, decay rate
        0.8, weight decay 1e-5, no parameter scaling."""
        kw = dict(optimizer="adafactor", learning_rate=0.3, schedule="constant",
                  decay_rate=0.8, weight_decay=1e-5, multiply_by_parameter_scale=False)
        kw.update(overrides)
        return cls(**kw)


def make_schedule(g: GroupConfig, label: str = "") -> optax.Schedule:
    """The learning-rate schedule of a group (see :class:`GroupConfig`)."""
    where = f"group {label!r}: " if label else ""
    if g.schedule not in SCHEDULES:
        raise ValueError(f"{where}schedule={g.schedule!r}; allowed: {list(SCHEDULES)}")
    lr, warm = float(g.learning_rate), int(g.warmup_steps)
    if warm < 0:
        raise ValueError(f"{where}warmup_steps={warm} must be >= 0")
    if g.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm),
                                     optax.constant_schedule(lr)], [warm])
    if g.total_steps is None or g.total_steps <= warm:
        raise ValueError(f"{where}schedule={g.schedule!r} needs total_steps > warmup_steps "
                         f"(got total_steps={g.total_steps}, warmup_steps={warm})")
    end = lr * float(g.end_lr_factor)
    if g.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, int(g.total_steps), end)
    decay = optax.linear_schedule(lr, end, int(g.total_steps) - warm)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def make_group_optimizer(g: GroupConfig, label: str = "") -> optax.GradientTransformation:
    """The optimizer of one group (no clipping: that is global, see :func:`make_optimizer`)."""
    where = f"group {label!r}: " if label else ""
    if g.optimizer not in OPTIMIZERS:
        raise ValueError(f"{where}optimizer={g.optimizer!r}; allowed: {list(OPTIMIZERS)}")
    if g.optimizer == "frozen":
        return optax.set_to_zero()
    lr = make_schedule(g, label)
    if g.optimizer == "adamw":
        return optax.chain(scale_by_adam(g.b1, g.b2, g.eps),
                           optax.add_decayed_weights(g.weight_decay),
                           optax.scale_by_learning_rate(lr))
    if g.optimizer == "sgd":
        sgd = optax.sgd(lr, momentum=g.momentum)
        if g.weight_decay:
            # decoupled: the decay is scaled by the learning rate like the gradient
            return optax.chain(optax.add_decayed_weights(g.weight_decay), sgd)
        return sgd
    return optax.adafactor(lr, min_dim_size_to_factor=g.min_dim_size_to_factor,
                           decay_rate=g.decay_rate,
                           multiply_by_parameter_scale=g.multiply_by_parameter_scale,
                           clipping_threshold=g.clipping_threshold,
                           weight_decay_rate=g.weight_decay or None)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                  ) -> optax.GradientTransformation:
    """Adam's rescaling, state ``optax.ScaleByAdamState`` (as ``optax.scale_by_adam``), with
    bias corrections accurate in float32: ``1 - b**t = -expm1(t log b)``, ``log b`` taken in
    float64 (see the module docstring)."""
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * jnp.square(g) + b2 * v, updates, state.nu)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = -jnp.expm1(t * log_b1), -jnp.expm1(t * log_b2)
        out = jax.tree.map(lambda m, v: (m / c1.astype(m.dtype))
                           / (jnp.sqrt(v / c2.astype(v.dtype)) + eps), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(groups: Mapping[str, GroupConfig], labels_tree: Any,
                   clip_norm: Optional[float] = None) -> optax.GradientTransformation:
    """One optax transformation for the whole trainable tree.

    ``labels_tree``: same structure as the trainable tree (or a prefix of it), leaves are
    labels (:func:`peft_jax.peft.partition.label_tree`). Every label used must have a
    group; unused groups are an error too (likely a misspelled label).
    """
    used = set(jax.tree.leaves(labels_tree))
    missing = sorted(map(str, used - set(groups)))
    if missing:
        raise ValueError(f"labels {missing} have no optimizer group; groups: {sorted(groups)}")
    unused = sorted(map(str, set(groups) - used))
    if unused:
        raise ValueError(f"optimizer groups {unused} label no parameter; labels in the "
                         f"tree: {sorted(map(str, used))}")
    txs = {label: make_group_optimizer(g, str(label)) for label, g in groups.items()}
    tx = optax.multi_transform(txs, labels_tree)
    if clip_norm is not None:
        if clip_norm <= 0:
            raise ValueError(f"clip_norm={clip_norm} must be > 0 (or None for no clipping)")
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


def group_learning_rates(groups: Mapping[str, GroupConfig], step: int) -> dict[str, float]:
    """Learning rate of every group at ``step`` (for logging)."""
    return {k: float(make_schedule(g, k)(step)) for k, g in groups.items()
            if g.optimizer != "frozen"}


def method_labels(trainable: Any, methods: Any) -> Any:
    """Optimizer-group label of every trainable leaf: the owning method's ``lr_group`` for
    delta leaves (``"default"`` when no method claims one), ``"default"`` for base leaves."""
    def label(path: str, _leaf: Any) -> str:
        top, _, rest = path.partition("/")
        m = owner(methods, rest) if top == DELTA_KEY else None
        return m.lr_group if m is not None else "default"

    return map_with_paths(label, trainable)


def optimizer_from_config(o: Any, trainable: Any, methods: Any, total_steps: int
                          ) -> optax.GradientTransformation:
    """The run's optimizer (``config.optim``): one group per ``lr_group`` of the methods
    (learning rate ``config.optim.<group>_lr``, 0 or absent = ``config.optim.lr``), with
    global gradient clipping ``config.optim.clip_norm`` (0 = none)."""
    labels = method_labels(trainable, methods)
    used = sorted(set(jax.tree.leaves(labels)))

    def lr_of(group: str) -> float:
        key = f"{group}_lr"
        return float(o[key]) if key in o and o[key] else float(o.lr)

    groups = {g: GroupConfig(optimizer=o.optimizer, learning_rate=lr_of(g), schedule=o.schedule,
                             warmup_steps=o.warmup_steps, total_steps=total_steps,
                             weight_decay=o.weight_decay,
                             multiply_by_parameter_scale=o.optimizer != "adafactor")
              for g in used}
    return make_optimizer(groups, labels, clip_norm=o.clip_norm or None)
