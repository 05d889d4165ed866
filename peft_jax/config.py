"""Experiment configs: Python files returning an ``ml_collections.ConfigDict``.

``configs/foo.py`` defines ``get_config(arg: str | None = None) -> ConfigDict`` (big_vision /
Flax-examples habit). The command line names it as ``--config configs/foo.py[:arg]`` and
overrides fields with ``--config.a.b=value``. Every override is checked against the
config's own fields: an unknown key fails with the closest allowed names, a value of the
wrong type fails naming the key and the expected type, before anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import ml_collections


class ConfigError(ValueError):
    """An invalid config file, key or value; the message names it."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path.py`` or ``path.py:arg`` -> the (locked) ConfigDict from ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    name = "peft_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{path}: failed to execute config file: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg=None)")
    cfg = module.get_config(arg or None) if arg else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return ml_collections.ConfigDict, got {type(cfg)}")
    cfg.lock()
    return cfg


def parse_value(text: str) -> Any:
    """The text after ``--config.key=`` as a Python literal (else the plain string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # plain string


def _coerce(key: str, old: Any, new: Any) -> Any:
    if old is None or isinstance(old, ml_collections.FieldReference):
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        if isinstance(new, str) and new.lower() in ("true", "false", "1", "0"):
            return new.lower() in ("true", "1")
        raise ConfigError(f"--config.{key}: expected a bool, got {new!r}")
    if isinstance(old, int) and isinstance(new, int) and not isinstance(new, bool):
        return new
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, str):
        return str(new)
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return type(old)(new)
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key}: is a group of fields ({', '.join(sorted(old.keys()))}); "
                          "set one of them")
    if type(old) is type(new):
        return new
    raise ConfigError(f"--config.{key}: expected {type(old).__name__} (like {old!r}), got {new!r}")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str],
                    renamed: Optional[Mapping[str, str]] = None) -> ml_collections.ConfigDict:
    """Apply ``a.b=value`` strings (the part after ``--config.``). ``renamed``: old key ->
    what replaced it (an override of an old key is an error naming the new one)."""
    renamed = renamed or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--config.{item}: expected --config.KEY=VALUE")
        key, _, raw = item.partition("=")
        parts = key.split(".")
        node = cfg
        for i, p in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                if key in renamed:
                    raise ConfigError(f"--config.{key}: this key was replaced by {renamed[key]}")
                where = ".".join(parts[:i]) or "<top>"
                allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(p, allowed, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"--config.{key}: unknown key {p!r} in {where} "
                                  f"(allowed: {', '.join(allowed)}){hint}")
            if i < len(parts) - 1:
                node = node[p]
        leaf = parts[-1]
        value = _coerce(key, node[leaf], parse_value(raw))
        with node.unlocked():
            node[leaf] = value
    return cfg


def check_choice(cfg: Mapping[str, Any], key: str, allowed: Sequence[Any]) -> None:
    """Raise ConfigError if ``cfg[key]`` (dotted) is not one of ``allowed``."""
    node: Any = cfg
    for p in key.split("."):
        node = node[p]
    if node not in allowed:
        raise ConfigError(f"config.{key}={node!r} is not allowed; choose one of {list(allowed)}")


def split_config_args(argv: Sequence[str]) -> tuple[Optional[str], list[str], list[str]]:
    """Split argv into (config spec, ['a.b=v', ...] overrides, remaining args)."""
    spec, overrides, rest = None, [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body and i + 1 < len(argv):
                body = body + "=" + argv[i + 1]
                i += 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return spec, overrides, rest
