"""A config -> a trained delta: the runner behind ``peft-jax train | eval | export | params``.

Data flow (DESIGN.md): config -> task (load, encode, fixed-shape batches) -> base loaded
once -> delta initialized by the methods -> jitted train step over a mesh -> metrics
(progress bar, JSONL, TensorBoard) -> orbax checkpoint of the delta + optimizer + data
position -> eval -> ``result.json`` row.

Formats (``config.task.format``):
- ``classification`` / ``regression``: pooled states (``config.model.pooling``) -> a head
  in the delta (``delta["head"]``) -> softmax CE / MSE.
- ``verbalizer``: prompt-based (LM-BFF): a template with the answer slot, label words; the
  LM's scores of the label words at the mask (MLM) or next-token (causal LM) position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import defaults
from peft_jax.config import ConfigError

Array = Any


# ----------------------------------------------------------------------------- methods


def build_methods(cfg, pre: Any = None, task: Any = None) -> tuple:
    """The PEFT method objects named by ``config.peft.methods`` (heads and base-leaf rules
    are handled separately: they are not slots). ``pre``/``task`` feed the prompt
    initializers that need the tokenizer (sampled vocab ranking, class labels, text)."""
    from peft_jax import peft as P

    out = []
    for m in defaults.method_list(cfg):
        if m == "prompt":
            out.append(P.PromptTuning(**prompt_init_kwargs(cfg, pre, task)))
        elif m == "prefix":
            p = cfg.peft.prefix
            out.append(P.PrefixTuning(length=p.length, projection_hidden=p.projection_hidden or None))
        elif m == "lora":
            p = cfg.peft.lora
            out.append(P.LoRA(targets=p.targets, rank=p.rank, alpha=p.alpha, dropout=p.dropout,
                              use_rslora=p.rslora))
        elif m == "adapter":
            p = cfg.peft.adapter
            out.append(P.Adapter(placement=p.placement, bottleneck=p.bottleneck))
        elif m == "ia3":
            p = cfg.peft.ia3
            out.append(P.IA3(targets=p.targets, feedforward=p.feedforward))
    return tuple(out)


def tokenizer_kind(tokenizer) -> str:
    """'sentencepiece' (ids roughly frequency-ordered), 'wordpiece' or 'bpe'."""
    name = type(tokenizer).__name__.lower()
    model = ""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        model = type(backend.model).__name__.lower()
    if "unigram" in model or "t5" in name or "sentencepiece" in name:
        return "sentencepiece"
    if "wordpiece" in model or "bert" in name:
        return "wordpiece"
    return "bpe"


def corpus_ranking(tokenizer, texts: list[str]) -> tuple[int, ...]:
    """Token ids sorted by decreasing count over ``texts`` (ties: smaller id first)."""
    counts: dict[int, int] = {}
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    return tuple(sorted(counts, key=lambda i: (-counts[i], i)))


def prompt_init_kwargs(cfg, pre: Any, task: Any) -> dict:
    """PromptTuning arguments for ``config.peft.prompt`` (initializer inputs resolved)."""
    p = cfg.peft.prompt
    kw = dict(length=p.length, placement=p.placement, init=p.init, init_scale=p.init_scale,
              top_k=p.top_k)
    tok = getattr(pre, "tokenizer", None)
    if p.init in ("sampled_vocab", "class_labels") and tok is not None:
        kind = tokenizer_kind(tok)
        kw["tokenizer_kind"] = kind
        if p.ranking == "corpus" or (p.ranking == "auto" and kind != "sentencepiece"):
            texts = [ex[f] for ex in task.load(cfg.task.train_split) for f in task.text_fields]
            kw["ranking"] = corpus_ranking(tok, texts)
    if p.init == "class_labels":
        words = _label_words(cfg, task) or task.verbalizer
        if words is None:
            raise ConfigError("config.peft.prompt.init='class_labels' needs label words: "
                              "config.task.label_words or a task with a default verbalizer")
        from peft_jax.data.templates import verbalizer_words
        per_class = verbalizer_words(words, task.verbalizer_keys())
        kw["label_token_ids"] = tuple(
            tuple(tok(" " + ws[0] if kw.get("tokenizer_kind") == "bpe" else ws[0],
                      add_special_tokens=False)["input_ids"]) for ws in per_class)
    if p.init == "text":
        kw["text_token_ids"] = tuple(tok(p.text, add_special_tokens=False)["input_ids"])
    if p.init == "file":
        kw["init_file"] = p.file
        kw["allow_resize"] = p.resize or None
    return kw


def base_patterns(cfg) -> tuple[str, ...]:
    """Base leaves that train (BitFit biases, or everything for full fine-tuning)."""
    from peft_jax.peft import partition

    methods = defaults.method_list(cfg)
    pats: tuple[str, ...] = ()
    if "full" in methods:
        pats += partition.full_finetuning_patterns()
    if "bitfit" in methods:
        pats += partition.bitfit_patterns()
    return pats


# ----------------------------------------------------------------------------- runner


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built once from a validated config."""

    cfg: Any
    pre: Any                 # models.registry.Pretrained
    task: Any                # data.Task
    methods: tuple
    model: Any               # flax module with slots
    base_id: str
    base_hash: str
    embedder: Any = None     # similarity demonstrations: sentence encoder, built on first use

    @property
    def kind(self) -> str:
        return self.pre.kind


def _dtype(cfg):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.model.dtype]


def with_model_options(pre: Any, cfg) -> Any:
    """``pre`` with ``config.model.dropout_impl`` / ``remat`` set on its model config (for
    families that have them; the weights are shared, not copied)."""
    fields = {f.name for f in dataclasses.fields(pre.config)} if dataclasses.is_dataclass(pre.config) else set()
    over = {k: getattr(cfg.model, k) for k in ("dropout_impl", "remat") if k in fields}
    if not over or all(getattr(pre.config, k) == v for k, v in over.items()):
        return pre
    return dataclasses.replace(pre, config=dataclasses.replace(pre.config, **over))


def build_experiment(cfg, pretrained: Any = None) -> Experiment:
    """Validate the config, load the base (or take ``pretrained``) and the task."""
    defaults.validate(cfg)
    from peft_jax import data as D
    from peft_jax.models.registry import load_pretrained
    from peft_jax.models.slots import Slots
    from peft_jax.peft.delta_io import base_fingerprint

    task = (D.task_from_config(defaults.file_task_config(cfg)) if cfg.task.name == "file"
            else D.get_task(cfg.task.name))
    pre = with_model_options(pretrained or load_pretrained(cfg.model.name), cfg)
    methods = build_methods(cfg, pre, task)
    model = pre.build(Slots(methods), _dtype(cfg))
    return Experiment(cfg=cfg, pre=pre, task=task, methods=methods, model=model,
                      base_id=str(getattr(pre, "name", cfg.model.name)),
                      base_hash=base_fingerprint(pre.base))


# ----------------------------------------------------------------------------- data


def _family(pre) -> str:
    return {"encoder": "mlm", "decoder": "causal", "encoder_decoder": "t5"}[pre.kind]


def _label_words(cfg, task) -> Any:
    if not cfg.task.label_words:
        return None  # the task's default verbalizer
    words = [w.strip() for w in cfg.task.label_words.split(",")]
    return [w.split("|") for w in words]  # "great|good,terrible|bad": several words per class


def encode_split(exp: Experiment, examples: list, demo_pool: Optional[list] = None) -> Any:
    """Examples -> ``data.Encoded`` for this experiment's format and model family.

    With ``config.task.demonstrations`` every example gets one demonstration per class from
    ``demo_pool`` (default: the training split), fixed per example and seed."""
    from peft_jax.data.tokenize import encode_classification, encode_prompt

    cfg, tok = exp.cfg, exp.pre.tokenizer
    if cfg.task.format == "verbalizer":
        demos = None
        if cfg.task.demonstrations:
            pool = demo_pool if demo_pool is not None else demonstration_pool(exp)
            demos = demonstrations_for(exp, examples, pool)
        return encode_prompt(examples, cfg.task.template or None, _label_words(cfg, exp.task), tok,
                             family=_family(exp.pre), max_len=cfg.task.max_length, task=exp.task,
                             demonstrations=demos)
    return encode_classification(examples, tok, cfg.task.max_length, task=exp.task)


def demonstration_pool(exp: Experiment) -> list:
    """Labelled examples demonstrations are drawn from (``task.demo_pool`` or the train split)."""
    return exp.task.load(exp.cfg.task.demo_pool or exp.cfg.task.train_split)


def demonstrations_for(exp: Experiment, queries: list, pool: list) -> list:
    """``[query][class]`` demonstrations (LM-BFF): random within the class, or sampled from
    the half of the class most similar to the query under ``task.demo_embedder``."""
    from peft_jax.data.fewshot import select_demonstrations

    cfg = exp.cfg
    embed_fn = None
    if cfg.task.demonstrations == "similarity":
        if exp.embedder is None:
            from peft_jax.contrastive.embed import load_embedder
            exp.embedder = load_embedder(cfg.task.demo_embedder, pooling="mean", max_length=128,
                                         batch_size=64)
        embed_fn = exp.embedder
    return select_demonstrations(queries, pool, cfg.seed, cfg.task.demonstrations,
                                 num_classes=exp.task.num_labels, embed_fn=embed_fn,
                                 text_fields=exp.task.text_fields)


def load_examples(exp: Experiment, split: str, limit: int = 0, seed: int = 0) -> list:
    examples = exp.task.load(split)
    if limit and len(examples) > limit:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(examples), limit, replace=False))
        examples = [examples[i] for i in keep]
    return examples


def read_extra_train(path: str, task: Any) -> list:
    """Rows of ``task.extra_train`` (JSONL): the task's text fields + ``label`` and/or
    ``soft_label`` (a list of C probabilities). Errors name the file and line."""
    from peft_jax.data.readers import DataError

    rows = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: not JSON ({e.msg})") from None
            missing = [k for k in task.text_fields if not isinstance(ex.get(k), str)]
            if missing or ("label" not in ex and "soft_label" not in ex):
                raise DataError(f"{path}:{ln}: needs text fields {list(task.text_fields)} and "
                                f"'label' or 'soft_label'; missing {missing or ['label']}")
            if "soft_label" in ex and len(ex["soft_label"]) != task.num_labels:
                raise DataError(f"{path}:{ln}: soft_label has {len(ex['soft_label'])} values; "
                                f"task {task.name} has {task.num_labels} classes")
            rows.append(ex)
    return rows


def mixture_examples(cfg, task: Any, target: list) -> list:
    """Training examples of a multi-task run: the target's plus ``task.mixture`` tasks
    (``name:split``; same number of classes, shared head / verbalizer), mixed at the
    configured rates (``peft_jax.data.mixtures``)."""
    from peft_jax import data as D

    parts = [p.strip() for p in cfg.task.mixture.split(",") if p.strip()]
    examples = {task.name: list(target)}
    for p in parts:
        name, _, split = p.partition(":")
        t = D.get_task(name)
        if t.num_labels != task.num_labels:
            raise ConfigError(f"config.task.mixture: {name} has {t.num_labels} classes, "
                              f"{task.name} has {task.num_labels}; mixed tasks share one head "
                              "/ verbalizer, so their label sets must match")
        ex = t.load(split or "train")
        examples[name] = [{**{f: e[g] for f, g in zip(task.text_fields, t.text_fields)},
                           "label": e["label"]} for e in ex]
    sizes = {k: len(v) for k, v in examples.items()}
    rates = D.mixture_rates(sizes, cfg.task.mixture_mode, cfg.task.mixture_cap or None,
                            cfg.task.mixture_temperature)
    cap = cfg.task.mixture_cap
    n = cfg.task.mixture_examples or sum(min(v, cap) if cap else v for v in sizes.values())
    return D.mix(examples, rates, n, seed=cfg.seed)


def training_examples(exp: Experiment) -> list:
    """The train split (optionally capped), + extra rows, + multi-task mixture."""
    cfg = exp.cfg
    ex = load_examples(exp, cfg.task.train_split, cfg.task.max_train_examples, cfg.seed)
    if cfg.task.extra_train:
        ex = ex + read_extra_train(cfg.task.extra_train, exp.task)
    if cfg.task.mixture:
        ex = mixture_examples(cfg, exp.task, ex)
    return ex


# ----------------------------------------------------------------------------- pieces


def format_spec(exp: Experiment, encoded: Any = None):
    from peft_jax.train.forward import FormatSpec

    cfg = exp.cfg
    lw = None
    if cfg.task.format == "verbalizer":
        lw = tuple(tuple(tuple(int(t) for t in w) for w in c)
                   for c in np.asarray(encoded.constants["label_word_ids"]))
    start = getattr(exp.pre.config, "decoder_start_token_id", 0) or 0
    return FormatSpec(kind=exp.pre.kind, format=cfg.task.format, pooling=cfg.model.pooling,
                      head_kind="regression" if cfg.task.format == "regression" else "classification",
                      head_dropout=cfg.peft.head.dropout, label_word_ids=lw, methods=exp.methods,
                      decoder_start_token_id=int(start))


def init_trainable(exp: Experiment, example_batch: dict, rng: Array) -> tuple[Any, Any]:
    """(trainable, frozen): the delta (+ head, + rule-selected base leaves) and the rest."""
    from peft_jax.peft import init_delta
    from peft_jax.peft.heads import init_head
    from peft_jax.peft.partition import split_trainable

    cfg = exp.cfg
    k_delta, k_head = jax.random.split(rng)
    delta: dict = {}
    if exp.methods:
        batch = {"input_ids": jnp.asarray(example_batch["input_ids"]),
                 "attention_mask": jnp.asarray(example_batch["attention_mask"])}
        if exp.kind == "encoder_decoder":
            batch["decoder_input_ids"] = jnp.zeros((batch["input_ids"].shape[0], 1), jnp.int32)
        delta = init_delta(exp.model, exp.pre.base, batch, k_delta)
    if cfg.task.format in ("classification", "regression"):
        n = 1 if cfg.task.format == "regression" else exp.task.num_labels
        delta["head"] = init_head("regression" if n == 1 and cfg.task.format == "regression"
                                  else "classification", exp.pre.d_model, n, k_head)
    return split_trainable(exp.pre.base, delta, base_patterns(cfg))


def make_tx(cfg, trainable: Any):
    from peft_jax.peft.optim import GroupConfig, make_optimizer
    from peft_jax.peft.partition import label_tree

    o = cfg.optim
    total = cfg.train.steps

    def group(lr):
        return GroupConfig(optimizer=o.optimizer, learning_rate=lr, schedule=o.schedule,
                           warmup_steps=o.warmup_steps, total_steps=total,
                           weight_decay=o.weight_decay,
                           multiply_by_parameter_scale=False if o.optimizer == "adafactor" else True)

    rules = [(r"peft/head/.*", "head"), (r"peft/(.*/)?prompt", "prompt"), (r".*", "default")]
    labels = label_tree(trainable, rules, unused="ignore")
    lrs = {"default": o.lr, "head": o.head_lr or o.lr, "prompt": o.prompt_lr or o.lr}
    used = set(jax.tree.leaves(labels))
    groups = {k: group(lr) for k, lr in lrs.items() if k in used}
    return make_optimizer(groups, labels, clip_norm=o.clip_norm or None)


def assemble_fn(frozen: Any, trainable: Any) -> dict:
    """Flax variables from (frozen, trainable); folds a prefix MLP reparameterization."""
    from peft_jax.peft.partition import assemble
    from peft_jax.peft.prefix import materialize

    v = assemble(frozen, trainable)
    if "prefix_reparam" in v["peft"]:
        v = {"params": v["params"], "peft": materialize(v["peft"])}
    return v


def evaluate(exp: Experiment, spec, predict, trainable: Any, frozen: Any, encoded: Any,
             shard: Callable, batch_size: int) -> dict:
    """Task metrics of the current delta on an encoded split (all rows, padded batches)."""
    from peft_jax.data.metrics import compute_metrics

    y, lab = predict_encoded(exp, predict, trainable, frozen, encoded, shard, batch_size)
    if exp.cfg.task.format == "regression":
        return compute_metrics(exp.task.metrics, y, lab)
    return compute_metrics(exp.task.metrics, y.argmax(-1), lab, num_classes=exp.task.num_labels)


def predict_encoded(exp: Experiment, predict, trainable: Any, frozen: Any, encoded: Any,
                    shard: Callable, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores ``[n, C]`` or ``[n]``, labels ``[n]``) of every encoded row, in row order."""
    from peft_jax.data import make_batches

    it = make_batches(encoded, batch_size, buckets=tuple(exp.cfg.train.buckets), shuffle=False,
                      drop_remainder=False, num_epochs=1, shard_index=jax.process_index(),
                      shard_count=jax.process_count())
    preds, labels, keep, rows = [], [], [], []
    for batch in it:
        y = predict(trainable, frozen, shard(_model_batch(batch)))
        if jax.process_count() > 1:  # global predictions; every host gets all rows
            from jax.experimental import multihost_utils
            y = np.asarray(multihost_utils.process_allgather(y, tiled=True))
            batch = {k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True))
                     for k in ("label", "example_mask", "row")}
        else:
            y = np.asarray(jax.device_get(y))
        preds.append(y)
        labels.append(batch["label"])
        keep.append(batch["example_mask"] > 0)
        rows.append(batch["row"])
    k = np.concatenate(keep)
    order = np.argsort(np.concatenate(rows)[k], kind="stable")   # buckets -> row order
    return np.concatenate(preds)[k][order], np.concatenate(labels)[k][order]


MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "label", "example_mask", "mask_pos",
              "soft_label")


def _model_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _flat_config(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if hasattr(v, "items"):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    walk(cfg, "")
    return out


@dataclasses.dataclass
class Session:
    """A prepared run: experiment, encoded data, spec, mesh, state, jitted functions."""

    exp: Experiment
    spec: Any
    mesh: Any
    state: Any
    frozen: Any
    state_sh: Any
    frozen_sh: Any
    tx: Any
    batches: Any
    train_enc: Any
    eval_enc: Any
    n_train: int
    n_eval: int
    predict: Callable
    shard: Callable
    meta_base: dict

    def evaluate(self, trainable: Any, encoded: Any = None) -> dict:
        return evaluate(self.exp, self.spec, self.predict, trainable, self.frozen,
                        self.eval_enc if encoded is None else encoded, self.shard,
                        self.exp.cfg.train.eval_batch_size)

    def abstract_state(self) -> Any:
        from peft_jax.train.checkpoint import abstract_with_shardings
        return abstract_with_shardings(jax.eval_shape(lambda: self.state), self.state_sh)


def setup(cfg, pretrained: Any = None) -> Session:
    """Everything before the first step: load, encode, init the delta, shard, jit."""
    from peft_jax.data import make_batches
    from peft_jax.parallel import distributed
    from peft_jax.parallel.mesh import logical_axes_tree, make_mesh, shard_batch, shardings_for
    from peft_jax.peft.delta_io import methods_config
    from peft_jax.peft.partition import select_base
    from peft_jax.train.forward import make_predict_fn
    from peft_jax.train.step import TrainState, make_eval_step

    distributed.initialize()
    exp = build_experiment(cfg, pretrained)
    c = cfg.train

    train_ex = training_examples(exp)
    eval_ex = load_examples(exp, cfg.task.eval_split, cfg.task.max_eval_examples, cfg.seed)
    pool = demonstration_pool(exp) if cfg.task.demonstrations else None
    train_enc, eval_enc = encode_split(exp, train_ex, pool), encode_split(exp, eval_ex, pool)
    batches = make_batches(train_enc, c.batch_size // max(jax.process_count(), 1),
                           buckets=tuple(c.buckets), seed=cfg.seed,
                           shard_index=jax.process_index(), shard_count=jax.process_count())
    spec = format_spec(exp, train_enc)

    mesh = make_mesh(dict(cfg.mesh))
    k_init, k_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    example = next(make_batches(train_enc, 2, buckets=tuple(c.buckets), shuffle=False,
                                drop_remainder=False, num_epochs=1))
    trainable, frozen = init_trainable(exp, example, k_init)
    if cfg.train.init_from:
        trainable = init_from_delta(trainable, cfg.train.init_from, exp)
    tx = make_tx(cfg, trainable)
    state = TrainState.create(trainable, tx, k_train)

    # shardings: base by the logical-axis rules, everything trainable replicated
    abstract_vars = jax.eval_shape(lambda: exp.pre.build().init(
        jax.random.PRNGKey(0), **_init_args(exp, example)))
    axes = logical_axes_tree(abstract_vars["params"])
    pats = base_patterns(cfg)
    axes_frozen = select_base(axes, pats)[1] if pats else axes
    frozen_sh = shardings_for(frozen, mesh, _match(frozen, axes_frozen))
    state_sh = shardings_for(state, mesh)
    predict = jax.jit(make_eval_step(make_predict_fn(exp.model, spec), assemble_fn))
    meta_base = json.loads(json.dumps({
        "base_id": exp.base_id, "base_hash": exp.base_hash, "methods": methods_config(exp.methods),
        "format": cfg.task.format, "task": exp.task.name}))
    return Session(exp=exp, spec=spec, mesh=mesh, state=jax.device_put(state, state_sh),
                   frozen=jax.device_put(frozen, frozen_sh), state_sh=state_sh, frozen_sh=frozen_sh,
                   tx=tx, batches=batches, train_enc=train_enc, eval_enc=eval_enc,
                   n_train=len(train_ex), n_eval=len(eval_ex), predict=predict,
                   shard=lambda b: shard_batch(_model_batch(b), mesh), meta_base=meta_base)


def init_from_delta(trainable: Any, folder: str, exp: Experiment) -> Any:
    """Start from a saved delta (intermediate-task fine-tuning): every trainable leaf whose
    path and shape appear in ``folder`` takes the saved value; the rest (e.g. a head for
    another number of classes) keep their fresh initialization. The delta must belong to
    the same base model."""
    from peft_jax.peft.delta_io import flatten_delta, load_delta, unflatten_delta

    saved, _ = load_delta(folder, base_id=exp.base_id, base_hash=exp.base_hash)
    src = flatten_delta(saved)
    flat = flatten_delta(jax.device_get(trainable))
    taken = [k for k, v in flat.items() if k in src and np.shape(src[k]) == np.shape(v)]
    if not taken:
        raise ConfigError(f"config.train.init_from={folder!r}: no leaf of the saved delta "
                          f"matches this run's trainable parameters (saved: {sorted(src)[:4]}...)")
    out = {k: (np.asarray(src[k], np.asarray(v).dtype) if k in taken else v) for k, v in flat.items()}
    skipped = sorted(set(flat) - set(taken))
    print(f"[peft_jax] init_from {folder}: {len(taken)} leaves loaded"
          + (f", {len(skipped)} fresh ({', '.join(skipped[:3])}{'...' if len(skipped) > 3 else ''})"
             if skipped else ""), flush=True)
    return jax.tree.map(jnp.asarray, unflatten_delta(out))


def predict_scores(s: "Session", trainable: Any, examples: list) -> np.ndarray:
    """Class scores ``[n, C]`` (or regression values ``[n]``) of ``examples``, in order."""
    enc = encode_split(s.exp, examples)
    y, _ = predict_encoded(s.exp, s.predict, trainable, s.frozen, enc, s.shard,
                           s.exp.cfg.train.eval_batch_size)
    return y


def run_experiment(cfg, pretrained: Any = None, on_step: Optional[Callable[[int], None]] = None
                   ) -> dict:
    """Train (or resume) the run described by ``cfg``; returns and writes its result row."""
    from peft_jax.peft.partition import tree_size
    from peft_jax.train.checkpoint import DeltaCheckpointer
    from peft_jax.train.forward import make_loss_fn
    from peft_jax.train.loop import LoopConfig, run_loop
    from peft_jax.train.step import jit_train_step, make_train_step
    from peft_jax.train.writers import MetricWriter

    t_start = time.perf_counter()
    s = setup(cfg, pretrained)
    exp, spec, c = s.exp, s.spec, cfg.train
    os.makedirs(cfg.workdir, exist_ok=True)
    main = jax.process_index() == 0
    state, frozen, batches, shard, meta_base = s.state, s.frozen, s.batches, s.shard, s.meta_base
    trainable = state.trainable
    train_step = jit_train_step(make_train_step(make_loss_fn(exp.model, spec), assemble_fn, s.tx,
                                                c.grad_accum), s.state_sh, s.frozen_sh, None)

    ckpt = DeltaCheckpointer(os.path.join(cfg.workdir, "checkpoints"), keep=c.keep)
    best = (DeltaCheckpointer(os.path.join(cfg.workdir, "best"), keep=1, best_metric=c.best_metric)
            if c.best_metric else None)
    resumed_from = None
    if c.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(s.abstract_state(), meta_base)
        batches.set_state(meta["data"])
        resumed_from = int(meta["step"])

    feed, loop_shard = batches, shard
    if c.prefetch > 0:   # host collation + transfer of step t+1 overlap step t
        from peft_jax.parallel.prefetch import DevicePrefetcher
        feed, loop_shard = DevicePrefetcher(batches, shard, depth=c.prefetch), (lambda b: b)

    def meta_fn(step: int) -> dict:
        # the position after the batches consumed (not after those prefetched)
        return {**meta_base, "step": int(step), "data": feed.get_state()}

    def eval_fn(st):
        return s.evaluate(st.trainable)

    baseline = {}
    if c.baseline and resumed_from is None:
        baseline = eval_fn(state)

    writer = MetricWriter(cfg.workdir) if main else None

    n_params = tree_size(trainable)
    if main:
        print(f"[peft_jax] {exp.base_id}: {exp.pre.kind}, methods={cfg.peft.methods}, "
              f"trainable={n_params:,} / base={tree_size(exp.pre.base):,} params; "
              f"mesh={dict(s.mesh.shape)}; train={s.n_train} eval={s.n_eval} examples"
              + (f"; resumed from step {resumed_from}" if resumed_from is not None else ""),
              flush=True)
    try:
        result_loop = run_loop(
            state=state, frozen=frozen, train_step=train_step, batches=feed, shard=loop_shard,
            cfg=LoopConfig(total_steps=c.steps, log_every=c.log_every, eval_every=c.eval_every,
                           ckpt_every=c.ckpt_every, progress=c.progress and main),
            eval_fn=eval_fn, checkpointer=ckpt, meta_fn=meta_fn, writer=writer,
            examples_per_step=c.batch_size, best_metric=c.best_metric or None, best_checkpointer=best,
            on_step=on_step)
    finally:
        if feed is not batches:
            feed.close()
    ckpt.close()
    if best is not None:
        best.close()
    if writer:
        writer.close()

    result = {
        "name": cfg.name, "status": result_loop.status, "config": _flat_config(cfg),
        "metrics": result_loop.last_eval, "baseline": baseline,
        "trainable_params": int(n_params), "base_params": int(tree_size(exp.pre.base)),
        "steps": int(jax.device_get(result_loop.state.step)), "wall_s": time.perf_counter() - t_start,
        "train_wall_s": result_loop.wall_s, "compilations": result_loop.compilations,
        "resumed_from": resumed_from,
    }
    selected = result_loop.state.trainable
    if result_loop.status == "finished" and best is not None:
        # model selection (e.g. LM-BFF: the dev-set best step) for the test evaluation
        sel = DeltaCheckpointer(os.path.join(cfg.workdir, "best"), keep=1, best_metric=c.best_metric)
        try:
            step = sel.best_step()
            if step is not None:
                best_state, _ = sel.restore(s.abstract_state(), meta_base, step=step)
                selected = best_state.trainable
                result["selected_step"] = int(step)
        finally:
            sel.close()
    if result_loop.status == "finished" and cfg.task.test_split:
        test_enc = encode_split(exp, load_examples(exp, cfg.task.test_split,
                                                   cfg.task.max_test_examples, cfg.seed))
        result["test"] = s.evaluate(selected, test_enc)
    if main:
        if result_loop.status == "finished":
            from peft_jax.peft.delta_io import save_delta
            # the whole trainable tree: the delta ("peft") and any trained base leaves ("params");
            # the selected step's under train.best_metric, else the last
            save_delta(os.path.join(cfg.workdir, "delta"),
                       jax.device_get(selected), base_id=exp.base_id,
                       base_hash=exp.base_hash, methods=exp.methods, overwrite=True)
        _write_json(os.path.join(cfg.workdir, "result.json"), result)
        print(results_table(result), flush=True)
    result["state"] = result_loop.state
    result["frozen"] = frozen
    result["selected"] = selected
    result["session"] = s
    return result


def _init_args(exp: Experiment, example: dict) -> dict:
    args = {"input_ids": jnp.asarray(example["input_ids"]),
            "attention_mask": jnp.asarray(example["attention_mask"])}
    if exp.kind == "encoder_decoder":
        args["decoder_input_ids"] = jnp.zeros((args["input_ids"].shape[0], 1), jnp.int32)
    return args


def _match(tree: Any, axes: Any) -> Any:
    """Axes tree restricted to the structure of ``tree`` (unboxed base from a checkpoint)."""
    if isinstance(tree, dict):
        return {k: _match(v, axes.get(k) if isinstance(axes, dict) else None) for k, v in tree.items()}
    return axes if isinstance(axes, tuple) else None


def results_table(result: dict) -> str:
    """The small table the main job prints: baseline vs trained, params, time."""
    rows = []
    keys = sorted(set(result.get("metrics", {})) | set(result.get("baseline", {})))
    width = max([len(k) for k in keys] + [10])
    rows.append(f"{'metric':<{width}}  {'untrained':>10}  {'trained':>10}")
    for k in keys:
        b = result.get("baseline", {}).get(k)
        t = result.get("metrics", {}).get(k)
        fmt = lambda v: f"{v:10.4f}" if isinstance(v, (int, float)) else f"{'-':>10}"
        rows.append(f"{k:<{width}}  {fmt(b)}  {fmt(t)}")
    if "test" in result:
        for k, v in result["test"].items():
            rows.append(f"{'test ' + k:<{width}}  {'':>10}  {v:10.4f}")
    tp, bp = result["trainable_params"], result["base_params"]
    rows.append(f"trainable params: {tp:,} ({100.0 * tp / max(bp, 1):.3f}% of {bp:,} base)")
    rows.append(f"steps: {result['steps']}  train time: {result['train_wall_s']:.1f}s  "
                f"total time: {result['wall_s']:.1f}s  compilations: {result['compilations']}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- eval / export


def restore_trained(cfg, pretrained: Any = None, which: str = "latest") -> tuple[Session, Any]:
    """A session and its trained trainable tree, from the run's checkpoints.

    ``which``: ``"latest"`` (last checkpoint) or ``"best"`` (kept by ``train.best_metric``).
    """
    from peft_jax.train.checkpoint import DeltaCheckpointer

    s = setup(cfg, pretrained)
    folder = os.path.join(cfg.workdir, "best" if which == "best" else "checkpoints")
    ckpt = DeltaCheckpointer(folder)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {folder}: train first "
                                    f"(peft-jax train --config ... --workdir {cfg.workdir})")
        state, _ = ckpt.restore(s.abstract_state(), s.meta_base)
    finally:
        ckpt.close()
    return s, state.trainable


def evaluate_experiment(cfg, split: Optional[str] = None, which: str = "latest") -> dict:
    """Metrics of a trained run on ``split`` (default: ``config.task.eval_split``)."""
    s, trainable = restore_trained(cfg, which=which)
    enc = None
    if split and split != cfg.task.eval_split:
        enc = encode_split(s.exp, load_examples(s.exp, split))
    return s.evaluate(trainable, enc)


def export_experiment(cfg, fmt: str, out: str, which: str = "latest") -> str:
    """Write a trained delta: ``npy`` (prompts by dotted path), ``hf-peft`` (adapter_config.json
    + adapter_model.safetensors), ``merged`` (a HF model folder with LoRA/IA3 folded in), or
    ``delta`` (peft_jax's own safetensors + metadata)."""
    from peft_jax.peft import delta_io

    s, trainable = restore_trained(cfg, which=which)
    tr = jax.device_get(trainable)
    delta = tr["peft"]
    exp = s.exp
    if fmt == "npy":
        delta_io.export_prompt_npy(delta, out)
    elif fmt == "delta":
        delta_io.save_delta(out, tr, base_id=exp.base_id, base_hash=exp.base_hash,
                            methods=exp.methods, overwrite=True)
    elif fmt == "hf-peft":
        from peft_jax.peft.hf_peft import export_method
        methods = [m for m in exp.methods]
        if len(methods) != 1:
            raise ConfigError(f"hf-peft export holds one method; this run has {cfg.peft.methods}")
        export_method(out, {k: v for k, v in delta.items() if k != "head"}, methods[0],
                      hf_module_name=_hf_names(exp))
    elif fmt == "merged":
        from peft_jax.models.registry import save_pretrained
        from peft_jax.peft import IA3, LoRA, merge_ia3, merge_lora
        from peft_jax.peft.partition import assemble
        base = assemble(jax.device_get(s.frozen), tr)["params"]
        for m in exp.methods:
            if isinstance(m, LoRA):
                base = merge_lora(base, delta, m)
            elif isinstance(m, IA3):
                base = merge_ia3(base, delta, m)
            else:
                raise ConfigError(f"merged export folds LoRA / IA3 only; {type(m).__name__} "
                                  "cannot be folded into the base weights")
        save_pretrained(exp.pre, out, base=base)
    else:
        raise ConfigError(f"export format {fmt!r}; choose npy, hf-peft, merged or delta")
    return out


def _hf_names(exp: Experiment) -> Callable[[str], str]:
    fn = exp.pre.module.hf_module_name
    if exp.pre.module.__name__.endswith(".bert"):
        return lambda p: fn(p, exp.pre.config.model_type)
    if exp.pre.module.__name__.endswith(".t5"):
        return lambda p: fn(p, exp.pre.config)
    return fn


def parameter_report(cfg) -> str:
    """Trainable / total parameters per method and module, and optimizer-state bytes."""
    from peft_jax.peft.report import param_report

    s = setup(cfg)
    tr = jax.device_get(s.state.trainable)
    return param_report(s.exp.pre.base, tr["peft"], base_patterns(cfg), tx=s.tx).table()
