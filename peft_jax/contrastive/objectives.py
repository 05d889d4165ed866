"""Contrastive objectives: the pluggable positive generator + loss of the SimCSE trainer.

One training loop (:func:`peft_jax.contrastive.simcse.train_contrastive`) serves every
objective; an objective says how a batch becomes views and a loss, and optionally what
batches it needs, what extra trainable state it keeps and how it embeds at evaluation:

- ``loss(enc, variables, batch, rng, deterministic) -> (loss, metrics)``: ``enc`` is an
  :class:`Encode` (model + pooling + the training-only projection head).
- ``batches(tokenizer, texts, cfg, seed)``: the (resumable) batch iterator; default
  :class:`peft_jax.contrastive.simcse.SentenceBatches`.
- ``init_extra(trainable, rng, d_model)`` / ``wrap_tx(tx, trainable)``: extra trainable
  leaves and optimizer wrapping (BYOL's predictor and EMA target network).
- ``embedder(model, variables, tokenizer, cfg)``: the sentence embedder used for evaluation.

Objectives:

=================  ==========================================================================
``Dropout``        unsupervised SimCSE: two dropout views, in-batch negatives
``ConSERT``        two augmented views (token shuffle / token cutoff / feature cutoff /
                   adversarial / none), in-batch negatives (Yan et al. 2021)
``DeCLUTR``        anchor and positive spans of the same document (Giorgi et al. 2021)
``BYOL``           bootstrapping: online network + predictor regresses the EMA target
                   network's projection of the other view; no negatives (Grill et al. 2020)
``PromptBERT``     template ``[MASK]`` (encoders) / last-token "means in one word" (decoders)
                   representations, template denoising, two templates as the views
                   (Jiang et al. 2022; PromptEOL, Jiang et al. 2023)
``RankEncoder``    SimCSE + agreement of in-batch similarities with the similarity of the
                   sentences' rank vectors over a corpus (Seonwoo et al. 2023)
=================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from peft_jax.contrastive import augment
from peft_jax.contrastive.batches import RankBatches, SentenceBatches
from peft_jax.contrastive.embed import embed_outputs, state_at_outputs
from peft_jax.contrastive.losses import contrastive_accuracy, cosine_matrix, unsup_simcse_loss
from peft_jax.peft import heads

Array = Any
TRAINING_ONLY = ("head", "predictor", "target")   # delta keys that never reach the model


def model_variables(variables: dict) -> dict:
    """Variables for the model itself: training-only delta keys (:data:`TRAINING_ONLY`)
    removed."""
    delta = {k: v for k, v in variables.get("peft", {}).items() if k not in TRAINING_ONLY}
    out = {"params": variables["params"]}
    if delta:
        out["peft"] = delta
    return out


@dataclasses.dataclass(frozen=True)
class Encode:
    """``enc(variables, ids, mask, rng, deterministic) -> [n, d]``: run the model, pool
    (or take the state at ``pos [n]``), apply the projection head when ``use_head``.

    ``perturb(x [n, l, d]) -> [n, l, d]`` acts on the token embeddings (ConSERT)."""

    model: Any
    pooling: str
    use_head: bool = True
    vocab_size: int = 0

    def features(self, variables: dict, ids: Array, mask: Array, rng: Optional[Array],
                 deterministic: bool, perturb: Optional[Callable] = None,
                 pos: Optional[Array] = None) -> Array:
        """Pooled states before the head ``[n, d]`` (fp32)."""
        mv = model_variables(variables)
        rngs = None if rng is None else {"dropout": rng}

        def run():
            if pos is None:
                return embed_outputs(self.model, mv, ids, mask, self.pooling, rngs=rngs,
                                     deterministic=deterministic)
            return state_at_outputs(self.model, mv, ids, mask, pos, rngs, deterministic)

        if perturb is None:
            return run()
        with augment.perturb_input_embeddings(perturb, self.vocab_size):
            return run()

    def project(self, variables: dict, z: Array) -> Array:
        return heads.apply_head("projection", variables["peft"]["head"], z) if self.use_head else z

    def __call__(self, variables: dict, ids: Array, mask: Array, rng: Optional[Array],
                 deterministic: bool, perturb: Optional[Callable] = None,
                 pos: Optional[Array] = None) -> Array:
        return self.project(variables, self.features(variables, ids, mask, rng, deterministic,
                                                     perturb, pos))


def _two(batch: dict) -> tuple[Array, Array]:
    """``[2b, l]`` ids/mask of the anchor batch stacked twice."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return jnp.concatenate([ids, ids], 0), jnp.concatenate([mask, mask], 0)


def _infonce(z: Array, b: int, temperature: float, batch: dict) -> tuple[Array, dict]:
    z1, z2 = z[:b], z[b:2 * b]
    return (unsup_simcse_loss(z1, z2, temperature, valid=batch.get("valid")),
            {"accuracy": contrastive_accuracy(z1, z2)})


class Objective:
    """Defaults shared by every objective (see the module docstring)."""

    name = "objective"

    def batches(self, tokenizer: Any, texts: Sequence[str], cfg: Any, seed: int):
        return SentenceBatches(tokenizer.encode(list(texts)), cfg.batch_size, cfg.max_length,
                               tokenizer.pad_id, seed)

    def init_extra(self, trainable: dict, rng: Array, d_model: int) -> dict:
        return trainable

    def wrap_tx(self, tx: optax.GradientTransformation, trainable: dict
                ) -> optax.GradientTransformation:
        return tx

    def embedder(self, model: Any, variables: dict, tokenizer: Any, cfg: Any, **kw):
        from peft_jax.contrastive.embed import Embedder
        return Embedder(model, model_variables(variables), tokenizer, pooling=cfg.pooling, **kw)

    def loss(self, enc: Encode, variables: dict, batch: dict, rng: Array, deterministic: bool,
             temperature: float) -> tuple[Array, dict]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Dropout(Objective):
    """Unsupervised SimCSE: the same sentences twice, different dropout masks."""

    name = "simcse"

    def loss(self, enc, variables, batch, rng, deterministic, temperature):
        ids, mask = _two(batch)
        return _infonce(enc(variables, ids, mask, rng, deterministic), ids.shape[0] // 2,
                        temperature, batch)


AUGMENTATIONS = ("none", "shuffle", "token_cutoff", "feature_cutoff", "adversarial")


@dataclasses.dataclass(frozen=True)
class ConSERT(Objective):
    """ConSERT: view ``i`` gets augmentation ``views[i]`` (:data:`AUGMENTATIONS`), dropout
    stays on. Defaults: ConSERT's best unsupervised pair (token shuffle + feature cutoff)
    with its cutoff rates (token 0.15, feature 0.2). ``adversarial``: ``eps * g/||g||`` added
    to the token embeddings, ``g`` the gradient of the loss of the un-attacked views with
    respect to them (one extra forward and backward pass)."""

    views: tuple = ("shuffle", "feature_cutoff")
    token_rate: float = 0.15
    feature_rate: float = 0.2
    eps: float = 1.0
    name = "consert"

    def __post_init__(self):
        bad = [v for v in self.views if v not in AUGMENTATIONS]
        if len(self.views) != 2 or bad:
            raise ValueError(f"ConSERT views={self.views!r}: two of {AUGMENTATIONS}")

    def _perturb(self, aug: str, rng: Array, mask: Array) -> Optional[Callable]:
        if aug == "token_cutoff":
            return lambda x: augment.token_cutoff(rng, x, mask, self.token_rate)
        if aug == "feature_cutoff":
            return lambda x: augment.feature_cutoff(rng, x, self.feature_rate)
        return None

    def view(self, aug: str, enc: Encode, variables: dict, batch: dict, rng: Array,
             deterministic: bool, extra: Optional[Callable] = None) -> Array:
        """One augmented view ``[b, d]`` of the batch (``extra``: a further embedding
        perturbation, e.g. the adversarial one)."""
        k_aug, k_drop = jax.random.split(rng)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if aug == "shuffle":
            ids = augment.token_shuffle(k_aug, ids, mask)
        p = self._perturb(aug, k_aug, mask)
        if extra is not None:
            p = extra if p is None else (lambda x, p=p: extra(p(x)))
        return enc(variables, ids, mask, k_drop, deterministic, perturb=p)

    def loss(self, enc, variables, batch, rng, deterministic, temperature):
        k1, k2, k3 = jax.random.split(rng, 3)
        keys = (k1, k2)
        z = [None, None]
        for i, aug in enumerate(self.views):
            if aug != "adversarial":
                z[i] = self.view(aug, enc, variables, batch, keys[i], deterministic)
        for i, aug in enumerate(self.views):
            if aug == "adversarial":
                z[i] = self.adversarial_view(enc, variables, batch, keys[i], deterministic,
                                             temperature, other=z[1 - i], first=i == 0)
        zz = jnp.concatenate(z, 0)
        return _infonce(zz, batch["input_ids"].shape[0], temperature, batch)

    def adversarial_view(self, enc, variables, batch, rng, deterministic, temperature,
                         other: Optional[Array], first: bool) -> Array:
        """The view with ``eps * g / ||g||`` added to its token embeddings; ``g`` is the
        gradient (stopped) of the InfoNCE loss against ``other`` (or a clean view) with
        respect to an additive perturbation at zero."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b, l = ids.shape
        ref = other if other is not None else jax.lax.stop_gradient(
            enc(variables, ids, mask, None, True))
        ref = jax.lax.stop_gradient(ref)

        def attacked_loss(delta):
            z = enc(variables, ids, mask, rng, deterministic, perturb=lambda x: x + delta)
            pair = (z, ref) if first else (ref, z)
            return unsup_simcse_loss(*pair, temperature, valid=batch.get("valid"))

        d = int(enc.model.config.d_model)   # width of the token embeddings
        g = jax.lax.stop_gradient(jax.grad(attacked_loss)(jnp.zeros((b, l, d), jnp.float32)))
        norm = jnp.sqrt(jnp.sum(g * g, axis=(1, 2), keepdims=True))
        adv = self.eps * g / jnp.maximum(norm, 1e-12)
        return enc(variables, ids, mask, rng, deterministic, perturb=lambda x: x + adv)


@dataclasses.dataclass(frozen=True)
class DeCLUTR(Objective):
    """DeCLUTR: anchor and positive spans of one document (:class:`augment.SpanBatches`);
    ``texts`` are documents; spans have ``min_span..max_span`` tokens."""

    min_span: int = 8
    max_span: int = 24
    name = "declutr"

    def batches(self, tokenizer, texts, cfg, seed):
        bos, eos = augment.special_ends(tokenizer)
        return augment.SpanBatches(augment.plain_ids(tokenizer, texts), cfg.batch_size,
                                   cfg.max_length, tokenizer.pad_id, self.min_span,
                                   self.max_span, bos, eos, seed)

    def loss(self, enc, variables, batch, rng, deterministic, temperature):
        ids = jnp.concatenate([batch["input_ids"], batch["pos_input_ids"]], 0)
        mask = jnp.concatenate([batch["attention_mask"], batch["pos_attention_mask"]], 0)
        return _infonce(enc(variables, ids, mask, rng, deterministic), batch["input_ids"].shape[0],
                        temperature, batch)


# ----------------------------------------------------------------------------- BYOL

def _online(trainable: dict) -> dict:
    """The part of the trainable tree the target network mirrors: everything but the
    predictor and the target itself."""
    peft = {k: v for k, v in trainable.get("peft", {}).items() if k not in ("predictor", "target")}
    return {"peft": peft, "params": trainable.get("params", {})}


def _override(tree: dict, sub: dict) -> dict:
    """``tree`` with the leaves of ``sub`` put in (same paths)."""
    flat = traverse_util.flatten_dict(tree)
    flat.update(traverse_util.flatten_dict(sub))
    return traverse_util.unflatten_dict(flat)


def ema_target(tau: float) -> optax.GradientTransformation:
    """After the inner optimizer's updates: ``target <- tau * target + (1 - tau) * online_new``
    (the update of ``peft/target`` is ``(1 - tau) * (online_new - target)``)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema_target needs params")
        new_online = optax.apply_updates(_online(params), _online(updates))
        target = params["peft"]["target"]
        upd = jax.tree.map(lambda t, o: (1.0 - tau) * (o - t), target, new_online)
        out = dict(updates)
        out["peft"] = {**updates["peft"], "target": upd}
        return out, state

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class BYOL(Objective):
    """BYOL-style bootstrapping for sentences: two dropout views (optionally ConSERT
    ``augment`` on the second); the online projection -> ``predictor`` must match the
    EMA target network's projection of the other view (cosine regression, symmetric);
    no negatives. The target (a copy of every trained leaf: delta, head, trained base
    leaves) lives in ``delta["target"]``, moves only by EMA with momentum ``tau``."""

    tau: float = 0.99
    augment: str = "none"
    name = "byol"

    def init_extra(self, trainable, rng, d_model):
        peft = dict(trainable["peft"])
        target = jax.tree.map(jnp.array, _online(trainable))   # copies
        peft["predictor"] = heads.init_head("projection", d_model, None, rng)
        peft["target"] = target
        return {**trainable, "peft": peft}

    def wrap_tx(self, tx, trainable):
        mask = jax.tree.map(lambda _: True, trainable)
        mask["peft"] = {**mask["peft"], "target": jax.tree.map(lambda _: False,
                                                               trainable["peft"]["target"])}
        return optax.chain(optax.masked(tx, mask), ema_target(self.tau))

    def target_variables(self, variables: dict) -> dict:
        t = variables["peft"]["target"]
        params = _override(variables["params"], t["params"]) if t["params"] else variables["params"]
        return {"params": params, "peft": t["peft"]}

    def loss(self, enc, variables, batch, rng, deterministic, temperature):
        k_on, k_tg, k_aug = jax.random.split(rng, 3)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ids2 = augment.token_shuffle(k_aug, ids, mask) if self.augment == "shuffle" else ids
        both_ids = jnp.concatenate([ids, ids2], 0)
        both_mask = jnp.concatenate([mask, mask], 0)
        b = ids.shape[0]
        online = enc(variables, both_ids, both_mask, k_on, deterministic)
        q = heads.apply_head("projection", variables["peft"]["predictor"], online)
        tv = jax.lax.stop_gradient(self.target_variables(variables))
        target = jax.lax.stop_gradient(enc(tv, both_ids, both_mask, k_tg, deterministic))
        swapped = jnp.concatenate([target[b:], target[:b]], 0)   # view 1 predicts view 2's target
        loss = byol_loss(q, swapped, batch.get("valid"))
        return loss, {"accuracy": contrastive_accuracy(online[:b], online[b:])}


def byol_loss(q: Array, t: Array, valid: Optional[Array] = None) -> Array:
    """Mean of ``2 - 2 cos(q_i, t_i)`` over rows ``[n, d]`` (``valid [n/2]`` per sentence)."""
    per = 2.0 - 2.0 * _rowcos(q, t)
    if valid is None:
        return jnp.mean(per)
    w = jnp.concatenate([valid, valid]).astype(jnp.float32)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def _rowcos(a: Array, b: Array, eps: float = 1e-8) -> Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (na * nb)


# ----------------------------------------------------------------------------- PromptBERT

@dataclasses.dataclass(frozen=True)
class PromptBERT(Objective):
    """PromptBERT / PromptEOL: a sentence is the state at the template's answer position
    (``{mask}``: the ``[MASK]`` token of an encoder; otherwise the last token, e.g.
    PromptEOL's ``This sentence : "{sentence}" means in one word:"`` for decoders), minus
    the same template's state with an empty sentence (template denoising, ``denoise``).
    Training: the two ``templates`` give the two views (plus dropout), in-batch negatives.
    Evaluation embeds with ``templates[0]``."""

    templates: tuple = ('This sentence : "{sentence}" means {mask} .',
                        'This sentence of "{sentence}" means {mask} .')
    denoise: bool = True
    name = "promptbert"

    def batches(self, tokenizer, texts, cfg, seed):
        from peft_jax.contrastive.prompt_embed import PromptBatches
        return PromptBatches(list(texts), tokenizer, self.templates, cfg.batch_size,
                             cfg.max_length, seed)

    def embedder(self, model, variables, tokenizer, cfg, **kw):
        from peft_jax.contrastive.prompt_embed import PromptEmbedder
        return PromptEmbedder(model, model_variables(variables), tokenizer, self.templates[0],
                              denoise=self.denoise, **kw)

    def loss(self, enc, variables, batch, rng, deterministic, temperature):
        b = batch["input_ids"].shape[0]
        ids = jnp.concatenate([batch["input_ids"], batch["pos_input_ids"], batch["tmpl_input_ids"]], 0)
        mask = jnp.concatenate([batch["attention_mask"], batch["pos_attention_mask"],
                                batch["tmpl_attention_mask"]], 0)
        pos = jnp.concatenate([batch["answer_pos"], batch["pos_answer_pos"], batch["tmpl_answer_pos"]], 0)
        h = enc.features(variables, ids, mask, rng, deterministic, pos=pos)
        h1, h2 = h[:b], h[b:2 * b]
        if self.denoise:
            h1, h2 = h1 - h[2 * b][None], h2 - h[2 * b + 1][None]
        z = enc.project(variables, jnp.concatenate([h1, h2], 0))
        return _infonce(z, b, temperature, batch)


# ----------------------------------------------------------------------------- RankEncoder

def rank_vectors(emb: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """Rank vectors ``[n, N]``: each sentence's ranks of its cosine similarity to the ``N``
    corpus sentences, centred and L2-normalized (so that ``r_i . r_j`` is the Spearman
    correlation of two sentences' rankings)."""
    from scipy.stats import rankdata
    e = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    c = corpus / np.maximum(np.linalg.norm(corpus, axis=-1, keepdims=True), 1e-12)
    r = rankdata(e @ c.T, axis=1)
    r = r - r.mean(1, keepdims=True)
    return (r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class LazyRankTable:
    """The rank-vector table ``[n, N]`` of :func:`rank_vectors`, row by row on first use:
    the teacher embeds only the sentences that batches draw (a short run over a large
    corpus of training sentences touches a few of them). ``table[rows] -> [len(rows), N]``."""

    def __init__(self, texts: Sequence[str], teacher: Callable, corpus: np.ndarray):
        self.texts, self.teacher, self.corpus = list(texts), teacher, corpus
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, rows) -> np.ndarray:
        rows = [int(r) for r in np.atleast_1d(rows)]
        todo = sorted(set(rows) - self._rows.keys())
        if todo:
            emb = np.asarray(self.teacher([self.texts[i] for i in todo]), np.float32)
            self._rows.update(zip(todo, rank_vectors(emb, self.corpus)))
        return np.stack([self._rows[r] for r in rows])


def rank_loss(z: Array, r: Array, valid: Optional[Array] = None) -> Array:
    """Mean over in-batch pairs ``i != j`` of ``(cos(z_i, z_j) - r_i . r_j)^2``;
    ``z [b, d]``, ``r [b, N]`` (unit rank vectors)."""
    sim = cosine_matrix(z, z)
    target = r.astype(jnp.float32) @ r.astype(jnp.float32).T
    b = z.shape[0]
    w = 1.0 - jnp.eye(b, dtype=jnp.float32)
    if valid is not None:
        v = valid.astype(jnp.float32)
        w = w * v[:, None] * v[None, :]
    return jnp.sum(w * (sim - target) ** 2) / jnp.maximum(jnp.sum(w), 1.0)


@dataclasses.dataclass(frozen=True)
class RankEncoder(Objective):
    """SimCSE (dropout views) + ``weight`` x :func:`rank_loss`: the in-batch cosine
    similarities of the first view's (pre-head) states follow the similarities of the
    sentences' rank vectors over a corpus. The rank vectors come from a frozen reference
    encoder (``teacher(texts) -> [n, d]``, e.g. the starting model) and a corpus of
    ``corpus_size`` training sentences, computed once before training."""

    teacher: Optional[Callable] = None
    weight: float = 1.0
    corpus_size: int = 256
    name = "rankencoder"

    def batches(self, tokenizer, texts, cfg, seed):
        if self.teacher is None:
            raise ValueError("RankEncoder needs teacher (texts -> [n, d] embeddings)")
        texts = list(texts)
        idx = np.random.default_rng(seed).choice(len(texts), min(self.corpus_size, len(texts)),
                                                 replace=False)
        corpus = np.asarray(self.teacher([texts[i] for i in np.sort(idx)]), np.float32)
        table = LazyRankTable(texts, self.teacher, corpus)
        return RankBatches(tokenizer.encode(texts), table, cfg.batch_size, cfg.max_length,
                           tokenizer.pad_id, seed)

    def loss(self, enc, variables, batch, rng, deterministic, temperature):
        ids, mask = _two(batch)
        b = batch["input_ids"].shape[0]
        h = enc.features(variables, ids, mask, rng, deterministic)
        z = enc.project(variables, h)
        loss, m = _infonce(z, b, temperature, batch)
        rl = rank_loss(h[:b], batch["rank_vec"], batch.get("valid"))
        return loss + self.weight * rl, {**m, "rank_loss": rl}


OBJECTIVES = {"simcse": Dropout, "consert": ConSERT, "declutr": DeCLUTR, "byol": BYOL,
              "promptbert": PromptBERT, "rankencoder": RankEncoder}
