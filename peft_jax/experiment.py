"""The runner's public API at its historical import path; the implementation lives in
:mod:`peft_jax.runner`, split by concern (see its docstring)."""

from peft_jax.runner import *  # noqa: F401,F403
from peft_jax.runner import __all__  # noqa: F401
