"""One writer per workdir: a lock file holding the trainer's pid, host and start time.

``<workdir>/.lock`` (JSON: ``pid``, ``host``, ``started`` (UTC), ``proc_start`` (the
process's start time in clock ticks from ``/proc/<pid>/stat``, to tell a reused pid from
the holder), ``command``) is created atomically (``O_CREAT | O_EXCL``) when a trainer
starts and removed when it ends. A second trainer on the same workdir stops at once with
:class:`WorkdirLocked` naming the holder. A lock whose holder is gone -- same host, and the
pid is not running or now belongs to another process (kill -9, a crash, a reboot) -- is
stale: it is taken over with a message. Takeovers are serialized by ``flock`` on
``<workdir>/.lock.takeover``, so two trainers finding the same stale lock cannot both
take it. A lock held on another host cannot be checked from here: the message names the
host and pid and says how to clear it if that process is gone.

Multi-host runs: only process 0 takes the lock (every host runs the same command on the
same workdir; the others write nothing there but their part of orbax's checkpoint). If
process 0 stops because the workdir is locked, the other processes fail at their first
collective, as with any lost process.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator, Optional

LOCK_NAME = ".lock"
TORN_AFTER_S = 5.0  # an unreadable lock file older than this is stale (a kill mid-write)


class WorkdirLocked(RuntimeError):
    """Another live trainer holds the workdir."""


def _proc_start(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the lock's holder (on this host) still runs."""
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    want, now = holder.get("proc_start"), _proc_start(pid)
    return want is None or now is None or int(want) == now  # pid reused -> gone


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}: {holder.get('command', '?')}")


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign file: treated as a lock of unknown holder


class WorkdirLock:
    """``acquire()`` / ``release()`` (or ``with``) the lock of ``workdir``."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"),
                     "proc_start": _proc_start(os.getpid()),
                     "command": " ".join(sys.argv)}
        self.held = False

    def _payload(self) -> bytes:
        return (json.dumps(self.info, indent=1) + "\n").encode()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload())
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> "WorkdirLock":
        os.makedirs(self.workdir, exist_ok=True)
        deadline = time.time() + 2 * TORN_AFTER_S
        while time.time() < deadline:  # a holder may release between our attempts
            if self._create():
                self.held = True
                return self
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile
            if not holder:  # unreadable: being written right now, or torn by a kill
                try:
                    age = time.time() - os.path.getmtime(self.path)
                except FileNotFoundError:
                    continue
                if age < TORN_AFTER_S:
                    time.sleep(0.2)
                    continue
                holder = {}
            elif holder.get("host") != self.info["host"]:
                raise WorkdirLocked(
                    f"{self.workdir} is in use by another trainer ({_describe(holder)}); a lock "
                    f"held on another host cannot be checked from here: if that process is "
                    f"gone, remove {self.path}")
            if holder and _alive(holder):
                raise WorkdirLocked(f"{self.workdir} is in use by another trainer "
                                    f"({_describe(holder)}); wait for it to finish or use "
                                    "another --workdir")
            if self._take_over(holder):
                self.held = True
                print(f"[peft_jax] took over the stale lock {self.path} ({_describe(holder)}; "
                      "that process is no longer running)", file=sys.stderr, flush=True)
                return self
        raise WorkdirLocked(f"{self.path}: could not take the lock (it keeps changing hands)")

    def _take_over(self, stale: dict) -> bool:
        """Replace the lock if it still holds ``stale`` (under the takeover flock)."""
        with open(self.path + ".takeover", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                if _read(self.path) != stale:
                    return False  # someone else took or released it meanwhile
                tmp = f"{self.path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(self._payload())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                return True
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def release(self) -> None:
        if self.held and _read(self.path) == self.info:
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def workdir_lock(workdir: str, main_process: bool = True) -> Iterator[Optional[WorkdirLock]]:
    """Hold ``workdir``'s lock for the block (only when ``main_process``, see the module
    docstring for multi-host runs)."""
    if not main_process:
        yield None
        return
    with WorkdirLock(workdir) as lock:
        yield lock
