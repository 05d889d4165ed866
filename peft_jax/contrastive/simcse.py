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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax.contrastive.embed import Embedder, embed_outputs, make_tokenizer
from peft_jax.contrastive.losses import contrastive_accuracy, sup_simcse_loss, unsup_simcse_loss
from peft_jax.models.slots import Slots
from peft_jax.parallel.mesh import shard_batch
from peft_jax.peft import heads
from peft_jax.peft.base_rules import FullFinetuning
from peft_jax.peft.heads import Head
from peft_jax.train.builder import build_train_state
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

def make_loss_fn(model: Any, pooling: str, temperature: float = 0.05, use_head: bool = True
                 ) -> Callable:
    """``loss_fn(variables, batch, dropout_rng, deterministic) -> (loss, metrics)`` for
    :func:`peft_jax.train.step.make_train_step`. batch: ``input_ids``, ``attention_mask``
    ``[b, l]`` and optional ``valid [b]`` (0 = padding row)."""

    def loss_fn(variables: dict, batch: dict, rng: Array, deterministic: bool):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        both_ids = jnp.concatenate([ids, ids], axis=0)        # [2b, l]: two dropout views
        both_mask = jnp.concatenate([mask, mask], axis=0)
        z = embed_outputs(model, model_variables(variables), both_ids, both_mask, pooling,
                          rngs={"dropout": rng}, deterministic=deterministic)
        if use_head:
            z = apply_head(variables["peft"]["head"], z)
        b = ids.shape[0]
        z1, z2 = z[:b], z[b:]
        loss = unsup_simcse_loss(z1, z2, temperature, valid=batch.get("valid"))
        return loss, {"accuracy": contrastive_accuracy(z1, z2)}

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


def model_variables(variables: dict) -> dict:
    """Variables for the model itself: the training-only ``head`` removed from the delta."""
    delta = {k: v for k, v in variables.get("peft", {}).items() if k != "head"}
    out = {"params": variables["params"]}
    if delta:
        out["peft"] = delta
    return out


# ----------------------------------------------------------------------------- data

class SentenceBatches:
    """Endless shuffled fixed-shape batches of tokenized sentences (``[b, max_length]``);
    resumable: ``get_state()`` / ``set_state(state)`` give/restore ``(epoch, position)``."""

    def __init__(self, token_ids: Sequence[Sequence[int]], batch_size: int, max_length: int,
                 pad_id: int, seed: int = 0):
        if len(token_ids) < batch_size:
            raise ValueError(f"SimCSE needs at least batch_size={batch_size} sentences, "
                             f"got {len(token_ids)}")
        self.ids = [list(t)[:max_length] for t in token_ids]
        self.batch_size, self.max_length, self.pad_id, self.seed = batch_size, max_length, pad_id, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["position"])
        self._order = self._perm(self.epoch)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.pos + self.batch_size > len(self._order):  # drop the ragged tail of an epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        rows = self._order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self._batch(rows)

    def _batch(self, rows: np.ndarray) -> dict:
        ids, mask = self._pad([self.ids[i] for i in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def _pad(self, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token lists -> ``input_ids, attention_mask [b, max_length]`` (int32)."""
        ids = np.full((len(seqs), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), self.max_length), np.int32)
        for r, t in enumerate(seqs):
            ids[r, :len(t)] = t
            mask[r, :len(t)] = 1
        return ids, mask


class TripletBatches(SentenceBatches):
    """Endless shuffled batches of tokenized triplets: ``input_ids``/``attention_mask``
    (anchors), ``pos_*`` and ``neg_*``, each ``[b, max_length]``; resumable as
    :class:`SentenceBatches` (same shuffling over triplet indices)."""

    def __init__(self, anchor_ids: Sequence[Sequence[int]], pos_ids: Sequence[Sequence[int]],
                 neg_ids: Sequence[Sequence[int]], batch_size: int, max_length: int,
                 pad_id: int, seed: int = 0):
        if not len(anchor_ids) == len(pos_ids) == len(neg_ids):
            raise ValueError(f"triplet columns differ in length: anchors {len(anchor_ids)}, "
                             f"positives {len(pos_ids)}, negatives {len(neg_ids)}")
        if len(anchor_ids) < batch_size:
            raise ValueError(f"supervised SimCSE needs at least batch_size={batch_size} "
                             f"triplets, got {len(anchor_ids)}")
        super().__init__(anchor_ids, batch_size, max_length, pad_id, seed)
        self.pos_ids = [list(t)[:max_length] for t in pos_ids]
        self.neg_ids = [list(t)[:max_length] for t in neg_ids]

    def _batch(self, rows: np.ndarray) -> dict:
        out = super()._batch(rows)
        for name, col in (("pos", self.pos_ids), ("neg", self.neg_ids)):
            ids, mask = self._pad([col[i] for i in rows])
            out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = ids, mask
        return out


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

    def embedder(self, tokenizer: Any, pooling: str, **kw) -> Embedder:
        return Embedder(self.model, self.variables, tokenizer, pooling=pooling, **kw)


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
    sentences = list(sentences)

    def batches_of(tokenizer: Any, seed: int) -> SentenceBatches:
        return SentenceBatches(tokenizer.encode(sentences), cfg.batch_size, cfg.max_length,
                               tokenizer.pad_id, seed)

    return _train("train_simcse", pretrained, cfg, methods, full_finetune, mesh, eval_fn,
                  eval_every, progress, batches_of,
                  lambda model: make_loss_fn(model, cfg.pooling, cfg.temperature, cfg.use_head))


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
           loss_fn_of: Callable[[Any], Callable]) -> SimCSEResult:
    """Shared set-up and loop: ``batches_of(tokenizer, seed)`` makes the (resumable) batches,
    ``loss_fn_of(model)`` the loss for :func:`make_train_step`."""
    if not methods and not full_finetune:
        raise ValueError(f"{name}: nothing to train; give PEFT methods or full_finetune=True")
    config = with_dropout(pretrained.config, cfg.dropout)
    pre = dataclasses.replace(pretrained, config=config)
    methods = (tuple(methods) + ((FullFinetuning(),) if full_finetune else ())
               + ((Head(kind="projection", dropout=0.0, num_labels=0, d_model=pre.d_model),)
                  if cfg.use_head else ()))
    model = pre.build(Slots(methods))
    tokenizer = make_tokenizer(pre.tokenizer, cfg.max_length)
    batches = batches_of(tokenizer, cfg.seed)

    def make_tx(_trainable):
        tx = optax.adamw(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay)
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx) if cfg.clip_norm else tx

    inputs = {"input_ids": np.ones((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int32)}
    ts = build_train_state(model, pre.base, methods, inputs, jax.random.PRNGKey(cfg.seed),
                           make_tx, mesh=mesh)
    frozen, state = ts.frozen, ts.state
    step = make_train_step(loss_fn_of(model), ts.variables, ts.tx)
    if mesh is not None:
        shard = lambda b: shard_batch(b, mesh)
        train_step = jit_train_step(step, ts.state_sh, ts.frozen_sh, None)
    else:
        shard = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
        train_step = jit_train_step(step)

    def variables_of(st: TrainState) -> dict:
        return model_variables(ts.variables(frozen, st.trainable))

    loop_eval = None
    if eval_fn is not None:
        loop_eval = lambda st: eval_fn(Embedder(model, variables_of(st), tokenizer,
                                                pooling=cfg.pooling))
    result = run_loop(state=state, frozen=frozen, train_step=train_step, batches=batches,
                      shard=shard, eval_fn=loop_eval,
                      cfg=LoopConfig(total_steps=cfg.steps, log_every=cfg.log_every,
                                     eval_every=eval_every, progress=progress),
                      examples_per_step=cfg.batch_size,
                      meta_fn=lambda: {"data": batches.get_state()})
    variables = variables_of(result.state)
    head_out = result.state.trainable["peft"].get("head") if cfg.use_head else None
    return SimCSEResult(model=model, variables=variables, head=head_out, loop=result)
