"""The persistent XLA compilation cache: on by default for every ``peft-jax`` command.

A second run of the same job loads its compiled programs (train step, predict, init)
from disk instead of compiling them again; compilation is usually the largest part of
the time to the first step.

Where (:func:`resolve`):

- ``--compile-cache DIR`` on any command (before a ``--``), else the environment variable
  ``PEFT_JAX_COMPILE_CACHE=DIR``; ``off`` (or ``0``, ``none``, ``false``) disables it;
- default: ``$XDG_CACHE_HOME/peft_jax/jax_cache`` (``~/.cache/peft_jax/jax_cache``).

Inside it, one subfolder per host CPU (:func:`cpu_tag`: architecture and instruction-set
flags), so machines sharing a home directory never load each other's CPU code.

Safe across versions: JAX keys every entry on the program (its StableHLO), the jax and
jaxlib versions, the backend's platform version, the XLA flags, the devices and the
compile options, so an upgrade or other flags compile afresh instead of loading a stale
executable. Entries are kept for programs that took at least :data:`MIN_COMPILE_S` to
compile; the folder is capped at :data:`MAX_BYTES` (least recently used entries go). It
holds executables: like the virtualenv, it must be writable by you only. JAX's own
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` / ``JAX_COMPILATION_CACHE_MAX_SIZE``
environment variables, when set, win; the folder is set by the options above.

:func:`enable` changes this process's ``jax.config`` only, never ``os.environ``: the
processes a command starts (sweep cells, launchers) get the setting through the environment
:func:`child_environ` builds for them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from typing import Mapping, Optional

ENV = "PEFT_JAX_COMPILE_CACHE"
OFF = ("off", "0", "none", "false", "no")
MIN_COMPILE_S = 0.1            # programs compiling faster than this are not stored
MAX_BYTES = 4 * 1024 ** 3      # least recently used entries are evicted beyond this


def cpu_tag() -> str:
    """``<machine>-<8 hex>``: the host's architecture and a hash of its CPU model and
    instruction-set flags (``/proc/cpuinfo`` where there is one)."""
    text = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines()
                     if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        text = "\n".join(dict.fromkeys(lines))   # the first core's lines (all cores agree)
    except OSError:
        pass
    return f"{platform.machine() or 'cpu'}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def user_cache_root(environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_CACHE_HOME/peft_jax`` (``~/.cache/peft_jax`` without XDG_CACHE_HOME): the
    user cache of compiled programs and converted models."""
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "peft_jax")


def default_root(environ: Mapping[str, str] = os.environ) -> str:
    """``<user cache root>/jax_cache``."""
    return os.path.join(user_cache_root(environ), "jax_cache")


def resolve(setting: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The cache folder for ``setting`` (``--compile-cache``; None: ``$PEFT_JAX_COMPILE_CACHE``,
    else the default root), with the host's :func:`cpu_tag` subfolder; None: disabled."""
    value = setting if setting is not None else environ.get(ENV)
    if value is not None and value.strip().lower() in OFF + ("",):
        return None
    root = os.path.expanduser(value) if value else default_root(environ)
    return os.path.join(os.path.abspath(root), cpu_tag())


def enable(setting: Optional[str] = None) -> Optional[str]:
    """Turn the cache on (or off) in this process's ``jax.config``; returns the folder (None:
    off). The environment is left as it is (children: :func:`child_environ`)."""
    import jax

    folder = resolve(setting)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(
        os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_COMPILE_S)))
    jax.config.update("jax_compilation_cache_max_size", int(
        os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", MAX_BYTES)))
    return folder


def child_environ(environ: Mapping[str, str] = os.environ) -> dict:
    """A copy of ``environ`` for a ``peft-jax`` process started from this one: its
    :data:`ENV` names this process's cache root (or ``off``), so it caches where we do."""
    env = dict(environ)
    if sys.modules.get("jax") is None:      # no jax here: nothing was configured
        return env
    folder = current_dir()
    if folder is None:
        env[ENV] = "off"
    else:
        env[ENV] = os.path.dirname(folder) if os.path.basename(folder) == cpu_tag() else folder
    return env


def current_dir() -> Optional[str]:
    """The folder jax caches compiled programs in (None: no persistent cache)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or None
