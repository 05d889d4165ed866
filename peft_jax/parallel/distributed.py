"""Multi-host initialization (TPU pod slices, multi-node GPU, or local processes on CPU).

Every host runs the same program. On TPU VMs and SLURM/GPU clusters ``jax.distributed``
discovers the coordinator from the environment; for local CPU tests pass it explicitly.
"""

from __future__ import annotations

import os
from typing import Optional

import jax


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """Initialize ``jax.distributed`` once, if this is a multi-process run.

    Arguments default to env vars ``PEFT_JAX_COORDINATOR``, ``PEFT_JAX_NUM_PROCESSES``,
    ``PEFT_JAX_PROCESS_ID``; with none of them set and no cluster detected it is a no-op
    (single process). On TPU pods / SLURM, call with no arguments and ``auto=True`` env
    (``PEFT_JAX_DISTRIBUTED=auto``) to let JAX detect the cluster.
    """
    coordinator_address = coordinator_address or os.environ.get("PEFT_JAX_COORDINATOR")
    if num_processes is None and "PEFT_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["PEFT_JAX_NUM_PROCESSES"])
    if process_id is None and "PEFT_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["PEFT_JAX_PROCESS_ID"])
    if coordinator_address is None and os.environ.get("PEFT_JAX_DISTRIBUTED") != "auto":
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if coordinator_address is not None:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    # CPU hosts need a collectives implementation; harmless for GPU/TPU backends. (Do not
    # query the backend here: that would initialize it before jax.distributed.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
    return jax.process_index() == 0
