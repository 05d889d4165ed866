"""Fault injection for tests: ``PEFT_JAX_FAULT`` makes ``peft-jax train`` kill itself.

The chaos and resume tests use it to stop a real training process at chosen or random
moments (after a step, inside an asynchronous checkpoint save) and check that rerunning
the same command resumes to the same result bit for bit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional


def fault_hook(workdir: str) -> Optional[Callable[[int], None]]:
    """Test hook, ``PEFT_JAX_FAULT``: ``kill@N`` / ``sigterm@N`` / ``sigint@N`` signal the
    process after step N; ``kill@N+T`` SIGKILLs it T seconds after step N (from a timer:
    any moment, e.g. inside an asynchronous save); ``killsave@N`` SIGKILLs it while orbax
    writes step N's checkpoint (as soon as its temporary folder appears)."""
    spec = os.environ.get("PEFT_JAX_FAULT")
    if not spec:
        return None
    kind, _, at = spec.partition("@")
    at, _, delay = at.partition("+")
    sig = {"kill": signal.SIGKILL, "killsave": signal.SIGKILL, "sigterm": signal.SIGTERM,
           "sigint": signal.SIGINT}[kind]
    ckpt_dir = os.path.join(workdir, "checkpoints")

    def kill_during_save() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
            if any(n.startswith(f"{at}.") and "tmp" in n for n in names):
                break
            time.sleep(0.0005)
        os.kill(os.getpid(), sig)

    def hook(step: int) -> None:
        if step != int(at):
            return
        if kind == "killsave":
            threading.Thread(target=kill_during_save, daemon=True).start()
        elif delay:
            timer = threading.Timer(float(delay), os.kill, (os.getpid(), sig))
            timer.daemon = True  # a run that ends first is not kept alive to be killed
            timer.start()
        else:
            os.kill(os.getpid(), sig)

    return hook
