"""Hugging Face PEFT interop: export a delta as an HF PEFT adapter folder and import one.

An HF PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads).
Tensor names, as peft 0.21 writes them (adapter name removed):

==========  ===================================================  =============================
method      HF tensor                                            ours
==========  ===================================================  =============================
LoRA        ``base_model.model.<module>.lora_A.weight [r, in]``  ``<path>/lora_a [in, r]``
            ``base_model.model.<module>.lora_B.weight [out, r]`` ``<path>/lora_b [r, out]``
prompt      ``prompt_embeddings [P, d]``                         ``<prompt_path>/prompt [P, d]``
prefix      ``prompt_embeddings [P, 2 L h_kv dh]`` (layer i:      ``<attn i>/prefix_key``,
            key = block 2i, value = block 2i+1)                  ``prefix_value [P, h_kv, dh]``
IA3         ``base_model.model.<module>.ia3_l`` ``[out, 1]``     ``<path>/ia3_scale [out]``
            (feed-forward modules: ``[1, in]``, input scaling)   (``[in]``)
==========  ===================================================  =============================

``<module>`` is ``module_prefix + hf_module_name(path)``, where ``hf_module_name`` is the
model family's mapping (``bert.hf_module_name``, ``llama.hf_module_name``) and
``module_prefix`` the extra prefix of the HF class the adapter is for (``""`` for
``BertModel`` and ``*ForCausalLM``; ``"bert."`` for ``BertForSequenceClassification``).
Prefix-tuning MLP reparameterizations are exported folded (HF stores the materialized
``prompt_embeddings`` too): pass a delta with per-layer ``prefix_key/value``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from peft_jax.models.hf_io import CheckpointError
from peft_jax.peft.delta_io import atomic_folder, flatten_delta, unflatten_delta
from peft_jax.peft.partition import leaf_paths

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HF_PREFIX = "base_model.model."
KINDS = ("lora", "prompt", "prefix", "ia3")
PEFT_TYPES = {"lora": "LORA", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ia3": "IA3"}
DEFAULT_FEEDFORWARD = r".*/mlp/down"

ModuleNameFn = Callable[[str], str]


def _peft_version() -> str:
    try:
        from importlib.metadata import version
        return version("peft")
    except Exception:
        return "0.21.0"


def _natural_key(path: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def module_paths(base: Any) -> list[str]:
    """Every module path of a base pytree (all proper prefixes of leaf paths)."""
    out = set()
    for p, _ in leaf_paths(base):
        keys = p.split("/")[:-1]
        for i in range(1, len(keys) + 1):
            out.add("/".join(keys[:i]))
    return sorted(out, key=_natural_key)


def _leaves_named(delta: Any, pred) -> dict[str, np.ndarray]:
    return {p: np.asarray(x) for p, x in flatten_delta(delta).items() if pred(p.split("/")[-1])}


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


# ----------------------------------------------------------------------------- export


def _lora_tensors(delta, hf_module_name, module_prefix):
    """HF tensors and ``[(hf module name, our path, rank)]`` of the LoRA leaves."""
    a = _leaves_named(delta, lambda n: n == "lora_a")
    b = _leaves_named(delta, lambda n: n == "lora_b")
    if not a:
        raise ValueError("export lora: the delta has no 'lora_a' leaf")
    tensors, mods = {}, []
    for pa in sorted(a, key=_natural_key):
        mod = _parent(pa)
        pb = (mod + "/" if mod else "") + "lora_b"
        if pb not in b:
            raise ValueError(f"export lora: {pa!r} has no matching {pb!r}")
        la, lb = a[pa], b[pb]
        if la.ndim != 2 or lb.ndim != 2 or la.shape[1] != lb.shape[0]:
            raise ValueError(f"export lora: {mod!r}: lora_a {la.shape} and lora_b {lb.shape} "
                             "are not [in, r] and [r, out]")
        name = module_prefix + hf_module_name(mod)
        tensors[f"{HF_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(la.T)
        tensors[f"{HF_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lb.T)
        mods.append((name, mod, int(la.shape[1])))
    return tensors, mods


def _most_common(values):
    vals = list(values)
    return max(sorted(set(vals), key=str), key=vals.count)


def _patterns(names_values) -> tuple[Any, dict]:
    """Default (most common value) and HF ``*_pattern`` dict (exact, escaped names) of the rest."""
    default = _most_common(v for _, v in names_values)
    return default, {re.escape(n): v for n, v in names_values if v != default}


def _prompt_tensor(delta):
    prompts = _leaves_named(delta, lambda n: n == "prompt")
    if len(prompts) != 1:
        raise ValueError(f"export prompt: expected exactly one 'prompt' leaf, found "
                         f"{sorted(prompts)}")
    (path, p), = prompts.items()
    if p.ndim != 2:
        raise ValueError(f"export prompt: {path!r} has shape {p.shape}, expected [P, d]")
    return p


def _prefix_tensor(delta):
    keys = _leaves_named(delta, lambda n: n == "prefix_key")
    vals = _leaves_named(delta, lambda n: n == "prefix_value")
    if not keys:
        hint = (" (it has a 'prefix_reparam' MLP: export materialize(delta) instead)"
                if any("prefix_reparam" in p for p, _ in leaf_paths(delta)) else "")
        raise ValueError("export prefix: the delta has no per-layer 'prefix_key' leaves" + hint)
    blocks, shape = [], None
    for pk in sorted(keys, key=_natural_key):
        pv = _parent(pk) + "/prefix_value" if "/" in pk else "prefix_value"
        if pv not in vals:
            raise ValueError(f"export prefix: {pk!r} has no matching {pv!r}")
        k, v = keys[pk], vals[pv]
        if k.ndim != 3 or k.shape != v.shape or (shape is not None and k.shape != shape):
            raise ValueError(f"export prefix: {pk!r} has shape {k.shape} (value {v.shape}); "
                             f"expected [P, h_kv, head_dim] alike in every layer ({shape})")
        shape = k.shape
        blocks += [k.reshape(k.shape[0], -1), v.reshape(v.shape[0], -1)]
    return np.concatenate(blocks, axis=1), len(keys), shape


_SEQ2SEQ_PREFIX = (
    "prefix tuning for encoder-decoder (T5, task_type='SEQ_2_SEQ_LM') adapters is not "
    "supported by HF PEFT export/import: HF duplicates the flat prefix for two transformer "
    "submodules and gives decoder self-attention layer i the blocks 4i, 4i+1 of that doubled "
    "list (so layers i and i + num_layers/2 share one prefix); an independent per-layer delta "
    "cannot be written in that layout. Keep the delta in peft_jax's own format.")


def _ia3_tensors(delta, hf_module_name, module_prefix, feedforward):
    scales = _leaves_named(delta, lambda n: n == "ia3_scale")
    if not scales:
        raise ValueError("export ia3: the delta has no 'ia3_scale' leaf")
    ff_rx = re.compile(feedforward)
    tensors, targets, ff = {}, [], []
    for p in sorted(scales, key=_natural_key):
        mod, s = _parent(p), scales[p]
        if s.ndim != 1:
            raise ValueError(f"export ia3: {p!r} has shape {s.shape}, expected a vector")
        name = module_prefix + hf_module_name(mod)
        is_ff = bool(ff_rx.fullmatch(mod))
        tensors[f"{HF_PREFIX}{name}.ia3_l"] = s[None, :] if is_ff else s[:, None]
        targets.append(name)
        if is_ff:
            ff.append(name)
    return tensors, targets, ff


def export_hf_peft(folder: str, delta: Any, kind: str, *,
                   hf_module_name: Optional[ModuleNameFn] = None, module_prefix: str = "",
                   lora_alpha: Any = None, use_rslora: bool = False,
                   lora_dropout: float = 0.0, feedforward: str = DEFAULT_FEEDFORWARD,
                   task_type: Optional[str] = None, num_layers: Optional[int] = None,
                   num_attention_heads: Optional[int] = None,
                   base_model_name_or_path: Optional[str] = None,
                   overwrite: bool = True) -> str:
    """Write the ``kind`` part of ``delta`` as an HF PEFT adapter folder; returns ``folder``.

    lora: needs ``hf_module_name`` and ``lora_alpha`` (a number, or a function of our module
    path; HF scale: alpha/r, or alpha/sqrt(r) with ``use_rslora``). Modules whose rank or
    alpha differ from the most common one go to HF's ``rank_pattern``/``alpha_pattern``
    under their exact (escaped) module name. prompt/prefix: ``task_type`` (HF's
    ``PeftModel`` only applies prompts with one: ``"FEATURE_EXTRACTION"``, ``"CAUSAL_LM"``,
    ``"SEQ_CLS"``, ...);
    ``num_layers``/``num_attention_heads`` are filled by HF from the model config when
    None. ia3: ``feedforward`` is the regex (on our module path) of modules scaled at
    their input (HF ``feedforward_modules``).
    """
    from safetensors.numpy import save_file

    if kind not in KINDS:
        raise ValueError(f"export kind={kind!r}; allowed: {list(KINDS)}")
    if kind in ("lora", "ia3") and hf_module_name is None:
        raise ValueError(f"export {kind}: pass the model family's hf_module_name")
    cfg: dict[str, Any] = {"peft_type": PEFT_TYPES[kind], "peft_version": _peft_version(),
                           "task_type": task_type, "inference_mode": True,
                           "base_model_name_or_path": base_model_name_or_path,
                           "revision": None, "modules_to_save": None}
    if kind == "lora":
        if lora_alpha is None:
            raise ValueError("export lora: lora_alpha is required (it fixes the scale)")
        tensors, mods = _lora_tensors(delta, hf_module_name, module_prefix)
        alpha_of = lora_alpha if callable(lora_alpha) else (lambda _p: lora_alpha)
        r, rank_pattern = _patterns([(n, r) for n, _, r in mods])
        alpha, alpha_pattern = _patterns([(n, float(alpha_of(p))) for n, p, _ in mods])
        cfg.update(r=int(r), lora_alpha=float(alpha), lora_dropout=float(lora_dropout),
                   use_rslora=bool(use_rslora), target_modules=[n for n, _, _ in mods],
                   bias="none", fan_in_fan_out=False, init_lora_weights=True, use_dora=False,
                   lora_bias=False, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                   layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    elif kind == "prompt":
        p = _prompt_tensor(delta)
        tensors = {"prompt_embeddings": p}
        cfg.update(num_virtual_tokens=int(p.shape[0]), token_dim=int(p.shape[1]),
                   num_transformer_submodules=1, num_layers=num_layers,
                   num_attention_heads=num_attention_heads, prompt_tuning_init="RANDOM",
                   prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                   tokenizer_kwargs=None)
    elif kind == "prefix":
        if task_type == "SEQ_2_SEQ_LM":
            raise NotImplementedError(_SEQ2SEQ_PREFIX)
        emb, n_layers, (n_tok, h_kv, dh) = _prefix_tensor(delta)
        if num_layers is not None and num_layers != n_layers:
            raise ValueError(f"export prefix: num_layers={num_layers} but the delta has "
                             f"prefixes in {n_layers} attention modules")
        tensors = {"prompt_embeddings": emb}
        cfg.update(num_virtual_tokens=int(n_tok), token_dim=int(h_kv * dh),
                   num_layers=int(n_layers), num_attention_heads=int(h_kv),
                   encoder_hidden_size=int(h_kv * dh), prefix_projection=False,
                   num_transformer_submodules=1)
    else:
        tensors, targets, ff = _ia3_tensors(delta, hf_module_name, module_prefix, feedforward)
        cfg.update(target_modules=targets, feedforward_modules=ff, fan_in_fan_out=False,
                   init_ia3_weights=True, exclude_modules=None)

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

    atomic_folder(folder, write, overwrite, CONFIG_FILE)
    return folder


# ----------------------------------------------------------------------------- import


def read_adapter(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of an HF PEFT adapter folder (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    cpath, wpath = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(cpath):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (not an HF PEFT adapter folder)")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cpath}: invalid JSON ({e})") from None
    if not os.path.isfile(wpath):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise CheckpointError(f"{folder}: only adapter_model.bin (pickle) found; peft_jax "
                                  "never unpickles. Re-save with safe_serialization=True")
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(wpath)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath}: cannot read safetensors file ({e})") from None
    return cfg, tensors


def _reverse_names(paths: Iterable[str], hf_module_name: ModuleNameFn,
                   module_prefix: str) -> dict[str, str]:
    out = {}
    for p in paths:
        try:
            out[module_prefix + hf_module_name(p)] = p
        except ValueError:
            continue
    return out


def _refuse(cfg: Mapping, cpath: str, field: str, ok) -> None:
    if field in cfg and not ok(cfg[field]):
        raise CheckpointError(f"{cpath}: {field}={cfg[field]!r} is not supported by peft_jax "
                              "import")


def _module_of(key: str, suffix: str, names: Mapping[str, str], where: str) -> str:
    if not key.startswith(HF_PREFIX) or not key.endswith(suffix):
        raise CheckpointError(f"{where}: unexpected tensor {key!r}")
    hf = key[len(HF_PREFIX): -len(suffix)]
    if hf not in names:
        close = [n for n in names if n.split(".")[-1] == hf.split(".")[-1]][:5]
        raise CheckpointError(f"{where}: tensor {key!r} is for module {hf!r}, which this model "
                              f"does not have (similar: {close})")
    return names[hf]


def _hf_pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """HF PEFT's ``get_pattern_key`` rule: first key with ``(.*\\.)?(key)$`` matching."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _lora_method(info: Mapping) -> Any:
    """The ``peft_jax.peft.lora.LoRA`` config equivalent to an imported adapter."""
    from peft_jax.peft.lora import LoRA

    mods = info["modules"]
    targets = "(" + "|".join(re.escape(m) for m in mods) + ")"
    return LoRA(targets=targets, rank=info["r"], alpha=info["lora_alpha"],
                dropout=info["lora_dropout"], use_rslora=info["use_rslora"],
                rank_pattern={re.escape(m): info["ranks"][m] for m in mods
                              if info["ranks"][m] != info["r"]},
                alpha_pattern={re.escape(m): info["alphas"][m] for m in mods
                               if info["alphas"][m] != info["lora_alpha"]})


def import_hf_peft(folder: str, *, base: Any = None,
                   hf_module_name: Optional[ModuleNameFn] = None, module_prefix: str = "",
                   prompt_path: str = "prompt",
                   attention_paths: Optional[Sequence[str]] = None) -> tuple[dict, dict]:
    """Read an HF PEFT adapter folder into ``(delta, info)``.

    LoRA / IA3 need ``base`` (to enumerate our module paths) and ``hf_module_name``;
    prompt tuning places the prompt at ``prompt_path``; prefix tuning needs
    ``attention_paths`` (our attention modules in layer order). ``info`` has ``kind``,
    the adapter config, and for LoRA ``r``, ``lora_alpha``, ``use_rslora``, ``scale``,
    ``lora_dropout``, ``modules`` (our paths), for IA3 ``feedforward`` (our paths).
    """
    cfg, tensors = read_adapter(folder)
    cpath, wpath = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    ptype = cfg.get("peft_type")
    kinds = {v: k for k, v in PEFT_TYPES.items()}
    if ptype not in kinds:
        raise CheckpointError(f"{cpath}: peft_type={ptype!r} is not supported; supported: "
                              f"{sorted(kinds)}")
    kind = kinds[ptype]
    _refuse(cfg, cpath, "modules_to_save", lambda v: not v)
    flat: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"kind": kind, "config": cfg}

    if kind in ("lora", "ia3"):
        if base is None or hf_module_name is None:
            raise ValueError(f"import {kind}: pass base= (our module paths) and hf_module_name=")
        names = _reverse_names(module_paths(base), hf_module_name, module_prefix)

    if kind == "lora":
        for field, ok in (("use_dora", lambda v: not v), ("lora_bias", lambda v: not v),
                          ("fan_in_fan_out", lambda v: not v), ("bias", lambda v: v == "none")):
            _refuse(cfg, cpath, field, ok)
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        rank_pattern = dict(cfg.get("rank_pattern") or {})
        alpha_pattern = dict(cfg.get("alpha_pattern") or {})
        ranks, alphas = {}, {}
        for key in sorted(tensors):
            if key.endswith(".lora_A.weight"):
                mod = _module_of(key, ".lora_A.weight", names, wpath)
                hf = key[len(HF_PREFIX): -len(".lora_A.weight")]
                kb = key[: -len(".lora_A.weight")] + ".lora_B.weight"
                if kb not in tensors:
                    raise CheckpointError(f"{wpath}: {key!r} has no matching {kb!r}")
                a, b = tensors[key], tensors[kb]
                want = int(_hf_pattern_value(rank_pattern, hf, r))
                if a.ndim != 2 or b.ndim != 2 or a.shape[0] != want or b.shape[1] != want:
                    raise CheckpointError(f"{wpath}: {key!r} {a.shape} / {kb!r} {b.shape} do "
                                          f"not have the rank {want} given by {CONFIG_FILE}")
                flat[f"{mod}/lora_a"] = np.ascontiguousarray(a.T)
                flat[f"{mod}/lora_b"] = np.ascontiguousarray(b.T)
                ranks[mod] = want
                alphas[mod] = float(_hf_pattern_value(alpha_pattern, hf, alpha))
            elif not key.endswith(".lora_B.weight"):
                raise CheckpointError(f"{wpath}: unexpected tensor {key!r} in a LoRA adapter")
        rs = bool(cfg.get("use_rslora", False))
        mods = sorted(ranks, key=_natural_key)
        info.update(r=r, lora_alpha=alpha, use_rslora=rs, ranks=ranks, alphas=alphas,
                    scales={m: alphas[m] / (np.sqrt(ranks[m]) if rs else ranks[m]) for m in mods},
                    lora_dropout=float(cfg.get("lora_dropout") or 0.0), modules=mods)
        info["method"] = _lora_method(info)
    elif kind == "ia3":
        _refuse(cfg, cpath, "fan_in_fan_out", lambda v: not v)
        ff = []
        for key in sorted(tensors):
            mod = _module_of(key, ".ia3_l", names, wpath)
            t = tensors[key]
            if t.ndim != 2 or 1 not in t.shape:
                raise CheckpointError(f"{wpath}: {key!r} has shape {t.shape}, expected "
                                      "[out, 1] or [1, in]")
            flat[f"{mod}/ia3_scale"] = np.ascontiguousarray(t.reshape(-1))
            if t.shape[0] == 1 and t.shape[1] != 1:
                ff.append(mod)
        info.update(feedforward=sorted(ff, key=_natural_key),
                    modules=sorted((_parent(p) for p in flat), key=_natural_key))
        from peft_jax.peft.ia3 import IA3
        alt = lambda ms: "(" + "|".join(re.escape(m) for m in ms) + ")" if ms else ""
        info["method"] = IA3(targets=alt(info["modules"]), feedforward=alt(info["feedforward"]))
    else:
        if "prompt_embeddings" not in tensors:
            raise CheckpointError(f"{wpath}: missing tensor 'prompt_embeddings'")
        emb = tensors["prompt_embeddings"]
        n_tok = int(cfg["num_virtual_tokens"])
        if kind == "prompt":
            if emb.ndim != 2 or emb.shape[0] < n_tok:
                raise CheckpointError(f"{wpath}: prompt_embeddings has shape {emb.shape}, "
                                      f"config num_virtual_tokens={n_tok}")
            # seq2seq adapters store one prompt per transformer submodule; the encoder's first
            flat[prompt_path] = np.ascontiguousarray(emb[:n_tok])
            from peft_jax.peft.prompt import PromptTuning
            info["method"] = PromptTuning(length=n_tok, placement="prefix")
        else:
            if cfg.get("task_type") == "SEQ_2_SEQ_LM" or cfg.get("num_transformer_submodules") == 2:
                raise NotImplementedError(f"{cpath}: " + _SEQ2SEQ_PREFIX)
            # prefix_projection=True adapters are saved materialized too (HF runs the MLP
            # at save time), so both read the same way.
            n_layers, h = int(cfg["num_layers"]), int(cfg["num_attention_heads"])
            dh = int(cfg["token_dim"]) // h
            if attention_paths is None or len(attention_paths) != n_layers:
                raise ValueError(f"import prefix: pass attention_paths for the {n_layers} "
                                 f"layers (got {None if attention_paths is None else len(attention_paths)})")
            if emb.shape != (n_tok, 2 * n_layers * h * dh):
                raise CheckpointError(f"{wpath}: prompt_embeddings has shape {emb.shape}, "
                                      f"config implies {(n_tok, 2 * n_layers * h * dh)}")
            blocks = emb.reshape(n_tok, 2 * n_layers, h, dh)
            for i, path in enumerate(attention_paths):
                flat[f"{path}/prefix_key"] = np.ascontiguousarray(blocks[:, 2 * i])
                flat[f"{path}/prefix_value"] = np.ascontiguousarray(blocks[:, 2 * i + 1])
            from peft_jax.peft.prefix import PrefixTuning
            info["method"] = PrefixTuning(
                length=n_tok, targets="(" + "|".join(re.escape(p) for p in attention_paths) + ")")
        info.update(num_virtual_tokens=n_tok)
    return unflatten_delta(flat), info


def export_method(folder: str, delta: Any, method: Any, *,
                  hf_module_name: Optional[ModuleNameFn] = None, **kwargs) -> str:
    """:func:`export_hf_peft` with the settings read from a peft_jax method config
    (``LoRA``: alpha per module, rsLoRA, dropout; ``IA3``: feedforward; ``PromptTuning``:
    must be placed as a prefix, HF's layout). Other keyword arguments pass through."""
    name = type(method).__name__
    if name == "LoRA":
        return export_hf_peft(folder, delta, "lora", hf_module_name=hf_module_name,
                              lora_alpha=method.alpha_for, use_rslora=method.use_rslora,
                              lora_dropout=method.dropout, **kwargs)
    if name == "IA3":
        return export_hf_peft(folder, delta, "ia3", hf_module_name=hf_module_name,
                              feedforward=method.feedforward, **kwargs)
    if name == "PromptTuning":
        if method.placement != "prefix":
            raise ValueError(f"export PromptTuning: placement={method.placement!r}; HF PEFT "
                             "prompts are always a prefix (placement='prefix')")
        return export_hf_peft(folder, delta, "prompt", **kwargs)
    if hasattr(method, "kv_prefix_length"):
        from peft_jax.peft.prefix import materialize
        return export_hf_peft(folder, materialize(delta), "prefix", **kwargs)
    raise ValueError(f"export_method: no HF PEFT format for method {name}; supported: LoRA, "
                     "IA3, PromptTuning, prefix tuning")
