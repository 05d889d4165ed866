"""The full experiment config schema with defaults; configs/*.py start from it.

Every key a run understands is here, so an override of a key that is not here is a typo
(and fails, naming the key). ``validate`` checks enumerations and combinations before any
model is loaded or compiled.
"""

from __future__ import annotations

import ml_collections

from peft_jax import peft as _methods  # noqa: F401  (registers every method)
from peft_jax.config import ConfigError, check_choice
from peft_jax.peft.method import REGISTRY, BuildContext, OptionError, method_class

FORMATS = ("classification", "regression", "verbalizer", "text_to_text")
HEAD_FORMATS = ("classification", "regression")
POOLINGS = ("cls", "cls_before_pooler", "mean", "first_last_avg", "last_token")

# Keys that were renamed or removed: using one is an error naming the replacement.
RENAMED = {
    "peft.lora.rslora": "config.peft.lora.use_rslora",
    "peft.head.kind": "nothing: the head's kind follows config.task.format "
                      "(classification | regression); config.peft.head.hidden adds "
                      "RoBERTa's dense + tanh layer",
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.workdir = "runs/run"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "minilm"            # known name, HF folder, or .gguf file
    c.model.dtype = "float32"          # compute dtype: float32 | bfloat16 (deltas stay fp32)
    c.model.pooling = "mean"           # for classification/regression heads
    c.model.dropout_impl = "hash"      # dropout masks: hash (one fused kernel) | jax (threefry bits)
    c.model.remat = "none"             # recompute layers in the backward: none | full | dots
    c.model.param_dtype = "auto"       # frozen-base storage: auto (the checkpoint's) | float32 | bfloat16
    c.model.quantize = "none"          # frozen base: none | int8 (weight-only, absmax per group)
    c.model.quantize_group = 64        # int8: input rows per scale (0 = one per output channel)
    c.model.scan_layers = False        # one nn.scan over the blocks (compile time flat in depth)

    c.task = ml_collections.ConfigDict()
    c.task.name = "sst2"               # a registered task (peft_jax.data) or "file"
    c.task.format = "classification"  # classification | regression | verbalizer | text_to_text
    c.task.eval_mode = "both"          # text_to_text: rank (score every class's target) |
                                       # generate (greedy + exact match) | both
    c.task.train_split = "train"
    c.task.eval_split = "dev"
    c.task.test_split = ""             # evaluated once at the end when set
    c.task.max_length = 128
    c.task.max_train_examples = 0      # 0 = all
    c.task.max_eval_examples = 0      # 0 = all (else a fixed subset: the same for every seed)
    c.task.max_test_examples = 0      # 0 = all (else a fixed subset: the same for every seed)
    c.task.demonstrations = ""        # verbalizer format: "" | random | similarity (LM-BFF: one
                                       # labelled example per class concatenated to every input)
    c.task.demo_pool = ""             # split the demonstrations come from; "" = train_split
    c.task.demo_embedder = "minilm"   # similarity demonstrations: sentence encoder (name/folder)
    c.task.extra_train = ""           # JSONL of extra training rows (pseudo-labelled: "label";
                                       # distillation: "soft_label" [C] probabilities)
    c.task.mixture = ""               # multi-task: "mr:all,cr:all" tasks (same label set) mixed
                                       # into the training examples
    c.task.mixture_mode = "proportional"  # proportional | temperature | equal
    c.task.mixture_cap = 0            # examples-proportional cap per task (0 = none)
    c.task.mixture_temperature = 1.0
    c.task.mixture_examples = 0       # size of the mixed training list (0 = sum of capped sizes)
    c.task.template = ""               # verbalizer: "" = the task's default template;
                                       # text_to_text: "" = T5's "<task> <field>: <text>" format
    c.task.label_words = ""            # "great,terrible" (one per class, in label order); "" = default
    c.task.file = ml_collections.ConfigDict()   # a user's dataset (task.name = "file")
    c.task.file.train = ""             # paths per split (.tsv / .csv / .jsonl)
    c.task.file.dev = ""
    c.task.file.test = ""
    c.task.file.format = ""            # "" = from the extension
    c.task.file.kind = ""              # "" = classification with label_names, else regression;
                                       # text2text: label_field holds the target text
    c.task.file.header = False
    c.task.file.columns = "text,label"  # headerless tsv/csv column names
    c.task.file.text_fields = "text"
    c.task.file.label_field = "label"
    c.task.file.label_names = ""       # "negative,positive"; "" = regression scores
    c.task.file.template = ""
    c.task.file.label_words = ""
    c.task.file.encoding = "utf-8"      # text encoding of the files (e.g. latin-1); bytes that do
                                       # not decode are an error naming file:line

    c.peft = ml_collections.ConfigDict()
    c.peft.methods = "lora"            # comma list of registered methods, e.g. "prompt,lora"
    # one group per registered method: config.peft.<name>.<option> (peft_jax.peft.method)
    for name, cls in sorted(REGISTRY.items()):
        if cls.options():
            c.peft[name] = cls.config_defaults()

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adamw"        # adamw | adafactor | sgd
    c.optim.lr = 1e-3                  # the "default" group (LoRA, adapters, prefixes, base leaves)
    c.optim.head_lr = 0.0              # group "head"; 0 = same as lr
    c.optim.prompt_lr = 0.0            # group "prompt"; 0 = same as lr (Lester et al.: 0.3 with adafactor)
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"      # constant | linear | cosine
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.batch_size = 16
    c.train.grad_accum = 1
    c.train.eval_every = 0
    c.train.log_every = 10
    c.train.ckpt_every = 0
    c.train.ckpt_every_s = 300.0       # also checkpoint when this many seconds passed since the
                                       # last one (0 = off); SIGINT/SIGTERM and the end always do
    c.train.keep = 2                   # checkpoints kept (>= 1)
    c.train.max_update_ratio = 100.0   # refuse a step whose largest update element is above this
                                       # multiple of the largest parameter (min 0.1): an explosion
                                       # (0 = off)
    c.train.best_metric = ""           # e.g. "accuracy": also keep the best checkpoint
    c.train.eval_batch_size = 64
    c.train.prefetch = 2               # device batches prepared ahead by a thread (0 = off)
    c.train.buckets = (32, 64, 128, 256)
    c.train.resume = True
    c.train.overwrite = False          # with resume=False: move an old run in the workdir aside
                                       # (into <workdir>/replaced-<time>/) instead of refusing
    c.train.init_from = ""             # a saved delta folder (intermediate-task fine-tuning):
                                       # leaves with the same path and shape start from it
    c.train.baseline = True            # also evaluate the untrained delta (before training)
    c.train.progress = True

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c


def method_list(cfg) -> list[str]:
    """The names in ``config.peft.methods``, in order."""
    return [m.strip() for m in cfg.peft.methods.split(",") if m.strip()]


def method_context(cfg, **kw) -> BuildContext:
    """A :class:`BuildContext` whose head settings follow ``config.task.format``."""
    kind = "regression" if cfg.task.format == "regression" else "classification"
    return BuildContext(cfg=cfg, head_kind=kind, **kw)


def build_methods(cfg, ctx: BuildContext = None) -> tuple:
    """The method objects of ``config.peft.methods`` (registry lookup, ``from_config``), plus
    the task head the format needs. Errors name the config key."""
    ctx = ctx or method_context(cfg)
    names = method_list(cfg)
    if cfg.task.format in HEAD_FORMATS and "head" not in names:
        names.append("head")
    out = []
    for name in names:
        try:
            cls = method_class(name)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        section = cfg.peft[name] if name in cfg.peft else {}
        try:
            out.append(cls.from_config(section, ctx))
        except OptionError as e:
            raise ConfigError(option_error_message(e)) from None
    return tuple(out)


def option_error_message(e: OptionError) -> str:
    return f"config.peft.{e.method}.{e.field}={e.value!r}: {e.problem}"


def _positive(cfg, *keys: str, allow_zero: bool = False) -> None:
    """Each dotted ``key`` of ``cfg`` must be > 0 (>= 0 with ``allow_zero``)."""
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node < 0 or (node == 0 and not allow_zero):
            raise ConfigError(f"config.{key}={node!r} must be "
                              + ("zero or positive" if allow_zero else "positive"))


def check_mesh(cfg, n_devices: int) -> dict:
    """``config.mesh`` resolved on ``n_devices`` devices (``{axis: size}``): sizes >= 1 or one
    -1 (the remaining devices); at most ``n_devices`` in all (a smaller mesh uses the first
    devices, e.g. a one-device reference run); the global batch divisible by data x fsdp."""
    sizes = {k: cfg.mesh[k] for k in cfg.mesh}
    for k, v in sizes.items():
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise ConfigError(f"config.mesh.{k}={v!r}: a mesh size is a positive integer or -1 "
                              "(the remaining devices)")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"config.mesh: only one size may be -1 (got {', '.join(free)})")
    fixed = 1
    for v in sizes.values():
        fixed *= v if v != -1 else 1
    if free:
        if n_devices % fixed:
            raise ConfigError(f"config.mesh={dict(sizes)}: {n_devices} device(s) do not divide "
                              f"into the fixed sizes (product {fixed})")
        sizes[free[0]] = n_devices // fixed
    elif fixed > n_devices:
        raise ConfigError(f"config.mesh={dict(sizes)} needs {fixed} devices; there are "
                          f"{n_devices}")
    shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
    if cfg.train.batch_size % shards:
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"config.mesh.data x config.mesh.fsdp = {shards}")
    return sizes


def validate(cfg, n_devices: int = 0) -> None:
    """Enumerations, ranges and combinations; raises ConfigError naming the key.
    ``n_devices`` (> 0): also check ``config.mesh`` on that many devices (:func:`check_mesh`)."""
    for old, new in RENAMED.items():
        node = cfg
        for part in old.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None:
            raise ConfigError(f"config.{old}: this key was replaced by {new}")
    check_choice(cfg, "task.format", FORMATS)
    check_choice(cfg, "model.dtype", ("float32", "bfloat16"))
    check_choice(cfg, "model.pooling", POOLINGS)
    check_choice(cfg, "model.dropout_impl", ("hash", "jax"))
    check_choice(cfg, "model.remat", ("none", "full", "dots"))
    check_choice(cfg, "model.param_dtype", ("auto", "float32", "bfloat16"))
    check_choice(cfg, "model.quantize", ("none", "int8"))
    check_choice(cfg, "optim.optimizer", ("adamw", "adafactor", "sgd"))
    check_choice(cfg, "optim.schedule", ("constant", "linear", "cosine"))
    check_choice(cfg, "task.demonstrations", ("", "random", "similarity"))
    check_choice(cfg, "task.mixture_mode", ("proportional", "temperature", "equal"))
    check_choice(cfg, "task.eval_mode", ("both", "rank", "generate"))
    check_choice(cfg, "task.file.kind", ("", "classification", "regression", "text2text"))
    if cfg.task.demonstrations and cfg.task.format != "verbalizer":
        raise ConfigError(f"config.task.demonstrations={cfg.task.demonstrations!r} needs "
                          f"config.task.format='verbalizer' (got {cfg.task.format!r})")
    names = method_list(cfg)
    if not names:
        raise ConfigError("config.peft.methods is empty; choose from " + ", ".join(sorted(REGISTRY)))
    for name in names:
        try:
            cls = method_class(name)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        if cls.exclusive and set(names) - {name, "head"}:
            raise ConfigError(f"config.peft.methods: {name!r} trains every base weight; "
                              f"combining it with {[n for n in names if n != name]} makes no sense")
        if name == "head" and cfg.task.format not in HEAD_FORMATS:
            raise ConfigError(f"config.peft.methods: 'head' needs config.task.format "
                              f"classification or regression (got {cfg.task.format!r}); "
                              "the verbalizer and text_to_text formats score label words "
                              "without a head")
        if name in cfg.peft:   # the options alone (what needs the tokenizer comes later)
            try:
                cls(**cls.kwargs_from_config(cfg.peft[name]))
            except OptionError as e:
                # prompt inits resolve token ids from the tokenizer later (a positive length
                # may then still be too short for class_labels: checked with the task)
                if not (name == "prompt" and e.field in ("init", "length", "text")
                        and cfg.peft.prompt.length >= 1):
                    raise ConfigError(option_error_message(e)) from None
    if len(set(names)) != len(names):
        raise ConfigError(f"config.peft.methods={cfg.peft.methods!r} names a method twice")
    if cfg.train.batch_size <= 0:
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} must be positive")
    if cfg.train.grad_accum <= 0:
        raise ConfigError(f"config.train.grad_accum={cfg.train.grad_accum} must be positive")
    if not isinstance(cfg.model.quantize_group, int) or cfg.model.quantize_group < 0:
        raise ConfigError(f"config.model.quantize_group={cfg.model.quantize_group!r} must be an "
                          "integer >= 0 (input rows per int8 scale; 0 = one per output channel)")
    if cfg.model.quantize != "none" and any(method_class(n).exclusive for n in names):
        raise ConfigError(f"config.model.quantize={cfg.model.quantize!r}: an int8 base is frozen; "
                          "full fine-tuning needs float weights (config.model.quantize='none')")
    if cfg.model.scan_layers:   # every scanned layer is one module: no per-layer selection
        for name in (n for n in names if n in cfg.peft):
            for field, value in cfg.peft[name].items():
                if isinstance(value, str) and "layer_" in value:
                    raise ConfigError(
                        f"config.peft.{name}.{field}={value!r} selects layers by index, which "
                        "config.model.scan_layers=True cannot do; match module names or set "
                        "config.model.scan_layers=False")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"config.train.grad_accum={cfg.train.grad_accum}")
    if cfg.train.keep < 1:
        raise ConfigError(f"config.train.keep={cfg.train.keep}: at least 1 checkpoint must be kept "
                          "(training always checkpoints, to resume after an interruption)")
    if cfg.train.steps <= 0:
        raise ConfigError(f"config.train.steps={cfg.train.steps} must be positive")
    _positive(cfg, "optim.lr", "task.max_length", "train.log_every", "train.eval_batch_size")
    _positive(cfg, "optim.head_lr", "optim.prompt_lr", "optim.weight_decay", "optim.warmup_steps",
              "optim.clip_norm", "train.eval_every", "train.ckpt_every", "train.ckpt_every_s",
              "train.max_update_ratio", "train.prefetch", allow_zero=True)
    if cfg.task.format == "verbalizer":
        for key, template in (("task.template", cfg.task.template),
                              ("task.file.template", cfg.task.file.template)):
            if template and template.count("{mask}") != 1:
                raise ConfigError(f"config.{key}={template!r}: the verbalizer format needs "
                                  "exactly one {mask} (the answer slot), e.g. "
                                  "\"{sentence} It was {mask}.\"")
    if n_devices > 0:
        check_mesh(cfg, n_devices)
    if cfg.task.name == "file" and not (cfg.task.file.train or cfg.task.file.dev or cfg.task.file.test):
        raise ConfigError("config.task.name='file' needs config.task.file.train/dev/test paths")


def file_task_config(cfg) -> dict:
    """``config.task.file`` -> the dict ``peft_jax.data.task_from_config`` takes."""
    f = cfg.task.file
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    out = {"name": "file", "files": {k: getattr(f, k) for k in ("train", "dev", "test") if getattr(f, k)},
           "header": bool(f.header), "text_fields": split(f.text_fields), "label_field": f.label_field}
    if f.format:
        out["format"] = f.format
    if f.kind:
        out["kind"] = f.kind
    if not f.header:
        out["columns"] = split(f.columns)
    if f.label_names:
        out["label_names"] = split(f.label_names)
    if f.template:
        out["template"] = f.template
    if f.label_words:
        out["verbalizer"] = [w.split("|") for w in split(f.label_words)]
    out["encoding"] = f.encoding
    return out
