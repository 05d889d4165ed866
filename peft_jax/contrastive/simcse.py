"""Unsupervised SimCSE (Gao et al. 2021) through the shared training system.

Each batch of ``b`` sentences is run twice in one forward pass (``[2b, l]``) with dropout
on; the two dropout views of a sentence are positives, the other ``b - 1`` sentences'
views in-batch negatives (:func:`peft_jax.contrastive.losses.unsup_simcse_loss`). An MLP
projection head over the pooled output (part of the delta, key ``head``) is used in
training only; embeddings come from the pooled output without it (SimCSE's
``mlp_only_train``).

What trains is decided like every other run: PEFT methods (e.g. LoRA -> "LoRA-SimCSE") fill
the model's slots and their delta trains with the head; ``full_finetune=True`` also trains
every base leaf (the ``full`` method). The state comes from the one train-state builder
(``train.builder.build_train_state``: the projection head is a ``Head(kind="projection")``
method), the step is ``train.step.make_train_step`` and the loop ``train.loop.run_loop``;
with a ``mesh`` the base is sharded by the rules table, the batch on its leading axis, and
the loss is computed on the global arrays, so the in-batch negatives are those of the
global batch.

Supervised SimCSE (:func:`train_simcse_supervised`): batches of NLI triplets (anchor,
entailment positive, contradiction hard negative; :mod:`peft_jax.contrastive.nli`) run as
``[3b, l]`` in one forward pass with dropout on, loss
:func:`peft_jax.contrastive.losses.sup_simcse_loss` (in-batch + hard negatives). It shares
the model/delta/optimizer/loop set-up with the unsupervised path (``_train``).

The rest of the contrastive family (:func:`train_contrastive`): the positive generator and
the loss are an objective of :mod:`peft_jax.contrastive.objectives` (ConSERT augmentations,
DeCLUTR spans, BYOL with an EMA target, PromptBERT / PromptEOL, RankEncoder); unsupervised
SimCSE is ``objectives.Dropout()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax.contrastive.batches import RankBatches, SentenceBatches, TripletBatches  # noqa: F401
from peft_jax.contrastive.embed import Embedder, embed_outputs, make_tokenizer
from peft_jax.contrastive.losses import contrastive_accuracy, sup_simcse_loss
from peft_jax.contrastive.objectives import Dropout, Encode, Objective, model_variables
from peft_jax.models.slots import Slots
from peft_jax.parallel.mesh import shard_batch
from peft_jax.peft import heads
from peft_jax.peft.base_rules import FullFinetuning
from peft_jax.peft.heads import Head
from peft_jax.train.builder import build_train_state
from peft_jax.phases import PhaseClock
from peft_jax.train.loop import LoopConfig, LoopResult, run_loop
from peft_jax.train.step import TrainState, jit_train_step, make_train_step

Array = Any


@dataclasses.dataclass(frozen=True)
class SimCSEConfig:
    """Hyper-parameters of an unsupervised SimCSE run (SimCSE defaults where they apply)."""

    pooling: str = "cls"            # SimCSE unsup-BERT: cls + MLP head in training only
    temperature: float = 0.05
    use_head: bool = True           # MLP (dense + tanh) over the pooled output, training only
    max_length: int = 32
    batch_size: int = 64
    steps: int = 200
    learning_rate: float = 3e-5     # full fine-tuning; LoRA usually wants ~1e-3..5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: Optional[float] = None
    dropout: Optional[float] = None  # override the model's dropout (fields named *dropout)
    seed: int = 42
    log_every: int = 10
    hard_negative_weight: float = 0.0  # supervised only (SimCSE's --hard_negative_weight)


# ----------------------------------------------------------------------------- head

def init_head(rng: Array, d: int) -> dict:
    """SimCSE's MLP (``peft.heads`` "projection": ``tanh(x @ W + b)``, ``[b, d] -> [b, d]``)."""
    return heads.init_head("projection", d, None, rng)


def apply_head(head: dict, x: Array) -> Array:
    return heads.apply_head("projection", head, x)


# ----------------------------------------------------------------------------- loss

def make_loss_fn(model: Any, pooling: str, temperature: float = 0.05, use_head: bool = True,
                 objective: Objective = Dropout()) -> Callable:
    """``loss_fn(variables, batch, dropout_rng, deterministic) -> (loss, metrics)`` for
    :func:`peft_jax.train.step.make_train_step`. ``objective`` (default: unsupervised
    SimCSE's dropout views; :mod:`peft_jax.contrastive.objectives`) turns the batch into
    views and a loss. SimCSE batch: ``input_ids``, ``attention_mask`` ``[b, l]`` and optional
    ``valid [b]`` (0 = padding row)."""
    enc = Encode(model, pooling, use_head, vocab_size=int(getattr(model.config, "vocab_size", 0)))

    def loss_fn(variables: dict, batch: dict, rng: Array, deterministic: bool):
        return objective.loss(enc, variables, batch, rng, deterministic, temperature)

    return loss_fn


def make_sup_loss_fn(model: Any, pooling: str, temperature: float = 0.05, use_head: bool = True,
                     hard_negative_weight: float = 0.0) -> Callable:
    """Supervised-SimCSE ``loss_fn(variables, batch, dropout_rng, deterministic)``. batch
    (from :class:`TripletBatches`): anchor ``input_ids``/``attention_mask``, ``pos_*`` and
    ``neg_*`` the same, all ``[b, l]``; optional ``valid [b]``. The three views run as one
    ``[3b, l]`` forward pass."""

    def loss_fn(variables: dict, batch: dict, rng: Array, deterministic: bool):
        b = batch["input_ids"].shape[0]
        ids = jnp.concatenate([batch["input_ids"], batch["pos_input_ids"],
                               batch["neg_input_ids"]], axis=0)             # [3b, l]
        mask = jnp.concatenate([batch["attention_mask"], batch["pos_attention_mask"],
                                batch["neg_attention_mask"]], axis=0)
        z = embed_outputs(model, model_variables(variables), ids, mask, pooling,
                          rngs={"dropout": rng}, deterministic=deterministic)
        if use_head:
            z = apply_head(variables["peft"]["head"], z)
        z1, z2, z3 = z[:b], z[b:2 * b], z[2 * b:]
        loss = sup_simcse_loss(z1, z2, z3, temperature, hard_negative_weight,
                               valid=batch.get("valid"))
        return loss, {"accuracy": contrastive_accuracy(z1, jnp.concatenate([z2, z3], axis=0))}

    return loss_fn


# ----------------------------------------------------------------------------- data

def unlabelled_sentences(source: str, split: str = "train", data_dir: Optional[str] = None,
                         limit: Optional[int] = None) -> list[str]:
    """Unique sentences for unsupervised training: a text file (one sentence per line) or a
    ``peft_jax.data`` task name (every text field of every example of ``split``; labels are
    not read). ``limit``: keep the first ``limit`` unique sentences."""
    import os
    if os.path.isfile(source):
        from peft_jax.contrastive.embed import read_sentences
        sents = read_sentences(source)
    else:
        from peft_jax.data import get_task
        task = get_task(source)
        sents = [" ".join(str(ex[f]).split()) for ex in task.load(split, data_dir)
                 for f in task.text_fields if ex.get(f)]
    sents = list(dict.fromkeys(s for s in sents if s))
    return sents[:limit] if limit else sents


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass
class SimCSEResult:
    model: Any             # the model with its slots (embedding without the head)
    variables: dict        # {"params": base, "peft": delta} (head removed)
    head: Optional[dict]
    loop: LoopResult
    objective: Objective = Dropout()
    cfg: Optional[SimCSEConfig] = None
    phases: Optional[dict] = None   # time to first step (peft_jax.phases), from the call

    def embedder(self, tokenizer: Any, pooling: Optional[str] = None, **kw) -> Any:
        """The objective's sentence embedder (pooling ``pooling`` or the run's)."""
        cfg = self.cfg or SimCSEConfig()
        if pooling is not None:
            cfg = dataclasses.replace(cfg, pooling=pooling)
        return self.objective.embedder(self.model, self.variables, tokenizer, cfg, **kw)


def with_dropout(config: Any, rate: Optional[float]) -> Any:
    """``config`` with every ``*dropout`` field set to ``rate`` (None: unchanged)."""
    if rate is None:
        return config
    names = [f.name for f in dataclasses.fields(config) if f.name.endswith("dropout")]
    if not names:
        raise ValueError(f"{type(config).__name__} has no dropout fields; SimCSE needs dropout "
                         "noise (use a PEFT method with dropout, e.g. LoRA dropout)")
    return dataclasses.replace(config, **{n: float(rate) for n in names})


def learning_rate_schedule(cfg: SimCSEConfig) -> optax.Schedule:
    """Linear warmup over ``warmup_steps``, then linear decay to 0 at ``steps`` (SimCSE)."""
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(cfg.steps - cfg.warmup_steps, 1))
    if not cfg.warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                 decay], [cfg.warmup_steps])


def train_simcse(pretrained: Any, sentences: Sequence[str], cfg: SimCSEConfig = SimCSEConfig(),
                 methods: Sequence[Any] = (), full_finetune: bool = False,
                 mesh: Any = None, eval_fn: Optional[Callable[[Embedder], dict]] = None,
                 eval_every: int = 0, progress: bool = False) -> SimCSEResult:
    """Train unsupervised SimCSE on ``sentences``.

    ``pretrained``: a :class:`peft_jax.models.registry.Pretrained`; ``methods``: PEFT method
    configs (the delta is made by ``peft_jax.peft.init_delta``); ``full_finetune``: also
    train every base leaf. ``eval_fn(embedder) -> metrics`` runs every ``eval_every`` steps
    and at the end (e.g. STS-B dev Spearman).
    """
    return train_contrastive(pretrained, sentences, Dropout(), cfg, methods, full_finetune,
                             mesh, eval_fn, eval_every, progress)


def train_contrastive(pretrained: Any, texts: Sequence[str], objective: Objective,
                      cfg: SimCSEConfig = SimCSEConfig(), methods: Sequence[Any] = (),
                      full_finetune: bool = False, mesh: Any = None,
                      eval_fn: Optional[Callable[[Any], dict]] = None, eval_every: int = 0,
                      progress: bool = False) -> SimCSEResult:
    """Train any :mod:`peft_jax.contrastive.objectives` objective on ``texts`` (sentences;
    documents for DeCLUTR) through the shared loop; arguments as :func:`train_simcse`."""
    texts = list(texts)
    return _train(f"train_contrastive[{objective.name}]", pretrained, cfg, methods,
                  full_finetune, mesh, eval_fn, eval_every, progress,
                  lambda tokenizer, seed: objective.batches(tokenizer, texts, cfg, seed),
                  lambda model: make_loss_fn(model, cfg.pooling, cfg.temperature, cfg.use_head,
                                             objective), objective)


def train_simcse_supervised(pretrained: Any, triplets: Sequence[Sequence[str]],
                            cfg: SimCSEConfig = SimCSEConfig(), methods: Sequence[Any] = (),
                            full_finetune: bool = False, mesh: Any = None,
                            eval_fn: Optional[Callable[[Embedder], dict]] = None,
                            eval_every: int = 0, progress: bool = False) -> SimCSEResult:
    """Train supervised SimCSE on ``triplets`` ``(anchor, positive, hard negative)`` (e.g.
    :func:`peft_jax.contrastive.nli.load_triplets`); arguments as :func:`train_simcse`, plus
    ``cfg.hard_negative_weight``. SimCSE's supervised BERT recipe: ``pooling="cls"``,
    ``batch_size=512``, ``learning_rate=5e-5``, ``max_length=32``, temperature 0.05."""
    bad = [i for i, t in enumerate(triplets) if len(t) != 3]
    if bad:
        raise ValueError(f"triplets[{bad[0]}] has {len(triplets[bad[0]])} fields; expected "
                         "(anchor, positive, hard negative)")
    cols = [[t[j] for t in triplets] for j in range(3)]

    def batches_of(tokenizer: Any, seed: int) -> TripletBatches:
        a, p, n = (tokenizer.encode(c) for c in cols)
        return TripletBatches(a, p, n, cfg.batch_size, cfg.max_length, tokenizer.pad_id, seed)

    return _train("train_simcse_supervised", pretrained, cfg, methods, full_finetune, mesh,
                  eval_fn, eval_every, progress, batches_of,
                  lambda model: make_sup_loss_fn(model, cfg.pooling, cfg.temperature,
                                                 cfg.use_head, cfg.hard_negative_weight))


def _train(name: str, pretrained: Any, cfg: SimCSEConfig, methods: Sequence[Any],
           full_finetune: bool, mesh: Any, eval_fn: Optional[Callable[[Embedder], dict]],
           eval_every: int, progress: bool,
           batches_of: Callable[[Any, int], SentenceBatches],
           loss_fn_of: Callable[[Any], Callable],
           objective: Objective = Dropout()) -> SimCSEResult:
    """Shared set-up and loop: ``batches_of(tokenizer, seed)`` makes the (resumable) batches,
    ``loss_fn_of(model)`` the loss for :func:`make_train_step`; ``objective`` may add
    trainable state (``init_extra``), wrap the optimizer (``wrap_tx``) and embeds for
    evaluation (``embedder``)."""
    if not methods and not full_finetune:
        raise ValueError(f"{name}: nothing to train; give PEFT methods or full_finetune=True")
    clock = PhaseClock(from_process_start=False)
    with clock:
        return _train_timed(clock, name, pretrained, cfg, methods, full_finetune, mesh, eval_fn,
                            eval_every, progress, batches_of, loss_fn_of, objective)


def _train_timed(clock: PhaseClock, name: str, pretrained: Any, cfg: SimCSEConfig,
                 methods: Sequence[Any], full_finetune: bool, mesh: Any,
                 eval_fn: Optional[Callable[[Embedder], dict]], eval_every: int, progress: bool,
                 batches_of: Callable[[Any, int], SentenceBatches],
                 loss_fn_of: Callable[[Any], Callable], objective: Objective) -> SimCSEResult:
    config = with_dropout(pretrained.config, cfg.dropout)
    pre = dataclasses.replace(pretrained, config=config)
    methods = (tuple(methods) + ((FullFinetuning(),) if full_finetune else ())
               + ((Head(kind="projection", dropout=0.0, num_labels=0, d_model=pre.d_model),)
                  if cfg.use_head else ()))
    model = pre.build(Slots(methods))
    clock.mark("model_load")
    tokenizer = make_tokenizer(pre.tokenizer, cfg.max_length)
    batches = batches_of(tokenizer, cfg.seed)
    clock.mark("data")

    def make_tx(trainable):
        tx = optax.adamw(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay)
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx) if cfg.clip_norm else tx
        return objective.wrap_tx(tx, trainable)   # e.g. BYOL: EMA of the target network

    inputs = {"input_ids": np.ones((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int32)}
    extra_rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    ts = build_train_state(model, pre.base, methods, inputs, jax.random.PRNGKey(cfg.seed),
                           make_tx, mesh=mesh,
                           transform=lambda tr: objective.init_extra(tr, extra_rng, pre.d_model))
    frozen, state = ts.frozen, ts.state
    step = make_train_step(loss_fn_of(model), ts.variables, ts.tx)
    if mesh is not None:
        shard = lambda b: shard_batch(b, mesh)
        train_step = jit_train_step(step, ts.state_sh, ts.frozen_sh, None)
    else:
        shard = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
        train_step = jit_train_step(step)
    clock.mark("init")

    def variables_of(st: TrainState) -> dict:
        return model_variables(ts.variables(frozen, st.trainable))

    loop_eval = None
    if eval_fn is not None:
        loop_eval = lambda st: eval_fn(objective.embedder(model, variables_of(st), tokenizer, cfg))
    result = run_loop(state=state, frozen=frozen, train_step=train_step, batches=batches,
                      shard=shard, eval_fn=loop_eval,
                      cfg=LoopConfig(total_steps=cfg.steps, log_every=cfg.log_every,
                                     eval_every=eval_every, progress=progress),
                      examples_per_step=cfg.batch_size,
                      meta_fn=lambda: {"data": batches.get_state()}, clock=clock)
    variables = variables_of(result.state)
    head_out = result.state.trainable["peft"].get("head") if cfg.use_head else None
    return SimCSEResult(model=model, variables=variables, head=head_out, loop=result,
                        objective=objective, cfg=cfg, phases=clock.summary())
