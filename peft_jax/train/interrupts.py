"""SIGINT / SIGTERM during training: finish the step, checkpoint, exit with a retry code.

Inside the training loop (:class:`StopSignals`) the first SIGINT (Ctrl-C) or SIGTERM (a
scheduler's preemption notice: SLURM before the time limit or on preemption, a TPU VM
maintenance event, Kubernetes) only sets a flag: the loop finishes the running step,
writes a checkpoint and returns ``status="preempted"``; ``peft-jax train`` then prints
:func:`interrupted_message` and exits with :data:`EXIT_INTERRUPTED`. A second SIGINT
raises ``KeyboardInterrupt`` at once (the previous checkpoint stays restorable).

``EXIT_INTERRUPTED = 143`` (128 + SIGTERM): the status a shell, SLURM and Kubernetes
report for a process ended by SIGTERM, so the retry rules a cluster already has for
preempted jobs (``podFailurePolicy`` ``onExitCodes: [143]``, a SLURM epilogue or wrapper
that requeues on 143, a TPU-pod supervisor loop ``while rc == 143``) apply unchanged, and
it is the code ``peft-jax fewshot`` already used for interrupted seeds. Rerunning the same
command resumes from the checkpoint.
"""

from __future__ import annotations

import signal
import threading

EXIT_INTERRUPTED = 143
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupted_message(step: int) -> str:
    return (f"interrupted (or preempted) at step {step}; a checkpoint was written; "
            "rerun the same command to resume")


class StopSignals:
    """Context manager: SIGINT/SIGTERM set ``requested`` (the signal's name in ``signal``)
    instead of stopping the process; a second SIGINT raises ``KeyboardInterrupt``.
    Only installs handlers in the main thread (a no-op elsewhere)."""

    def __init__(self):
        self.requested = False
        self.signal = ""
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
