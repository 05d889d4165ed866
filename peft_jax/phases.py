"""Time to first step: a command's wall-clock phases since its process started.

A :class:`PhaseClock` cuts the time from its start (by default the process's start, read
from ``/proc``; a clock made inside a running process, e.g. for the next cell of an
in-process sweep, starts when it is made) into consecutive phases, each ended by
:meth:`PhaseClock.mark`::

    imports | config | model_load | data | init | prepare | first_step

(``config``: config checks and the workdir; ``model_load``: task, base weights, methods,
model; ``data``: reading and encoding the splits; ``init``: the delta, optimizer state and
their placement; ``prepare``: checkpoints / resume; ``first_step``: the first training
step, finished on the host). Inside its ``with`` block the clock also records when XLA
compiled (JAX's tracing, lowering and backend-compile time spans, merged so nested spans
count once) and the persistent compilation cache's hits and misses, so each phase says how
much of it was compilation (and, over the whole clock, how much was tracing, lowering and
the backend: XLA's compile, or loading the executable on a cache hit). :meth:`summary` is
the ``phases`` entry of a run's
``result.json``; :meth:`line` the log line.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import jax

from peft_jax import compile_cache

# JAX's compile events -> the part of compilation they time (a persistent-cache hit is the
# backend part: reading and loading the executable)
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "backend"}
CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
                "/jax/compilation_cache/cache_misses": "misses"}


def process_start_time() -> Optional[float]:
    """``time.time()`` at which this process started (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def merged_seconds(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Seconds of ``[t0, t1]`` covered by the union of ``spans`` (``(start, end)`` pairs)."""
    total, reach = 0.0, t0
    for a, b in sorted(spans):
        a, b = max(a, reach), min(b, t1)
        if b > a:
            total += b - a
            reach = b
    return total


class PhaseClock:
    """Consecutive named phases from the process's start (``from_process_start=False`` or
    without ``/proc``: from now), with the compile time inside each (module docstring)."""

    def __init__(self, from_process_start: bool = True):
        now = time.time()
        proc = process_start_time() if from_process_start else None
        self.start = min(proc, now) if proc is not None else now
        # process CPU time (all threads) at the start: 0 from the process's start
        self.cpu_start = 0.0 if proc is not None else time.process_time()
        self.marks: list[tuple[str, float, float]] = []
        self.spans: list[tuple[float, float]] = []
        self.part_spans: dict[str, list[tuple[float, float]]] = {p: [] for p in COMPILE_EVENTS.values()}
        self.cache = {"hits": 0, "misses": 0}
        self._depth = 0

    # listeners (registered while the clock is entered)
    def _span(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.spans.append((start, end))
            self.part_spans[COMPILE_EVENTS[event]].append((start, end))

    def _event(self, event: str, **_) -> None:
        if event in CACHE_EVENTS:
            self.cache[CACHE_EVENTS[event]] += 1

    def __enter__(self) -> "PhaseClock":
        if self._depth == 0:
            jax.monitoring.register_event_time_span_listener(self._span)
            jax.monitoring.register_event_listener(self._event)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            jax.monitoring.unregister_event_time_span_listener(self._span)
            jax.monitoring.unregister_event_listener(self._event)

    def mark(self, name: str) -> None:
        """End the phase ``name`` now (it began where the previous one ended). A name
        marked again extends the phase (its time is added)."""
        self.marks.append((name, time.time(), time.process_time()))

    def elapsed(self) -> float:
        """Seconds since the clock's start."""
        return time.time() - self.start

    def phases(self) -> list[tuple[str, float, float, float]]:
        """``(name, seconds, compile seconds, process CPU seconds)`` per phase, in order,
        repeated names merged."""
        out: dict[str, list[float]] = {}
        t, cpu = self.start, self.cpu_start
        for name, end, cpu_end in self.marks:
            row = out.setdefault(name, [0.0, 0.0, 0.0])
            row[0] += end - t
            row[1] += merged_seconds(self.spans, t, end)
            row[2] += cpu_end - cpu
            t, cpu = end, cpu_end
        return [(n, s, c, p) for n, (s, c, p) in out.items()]

    def summary(self) -> dict:
        """JSON-able: ``{"order": [phase, ...], "seconds": {phase: s}, "compile_s": {phase: s},
        "cpu_s": {phase: s}, "total_s", "compile_parts_s": {"trace", "lower", "backend"},
        "compile_cache": {"dir", "hits", "misses"}}``. ``total_s``: start -> last mark;
        ``order``: the phases in time order (JSON files sort keys); ``cpu_s``: the process's
        CPU time, all threads (a phase's own work apart from waiting on a busy machine);
        ``compile_parts_s``: up to the last mark, as the phases; the cache counts: so far."""
        rows = self.phases()
        end = self.marks[-1][1] if self.marks else self.start
        return {"order": [r[0] for r in rows],
                "seconds": {n: round(s, 3) for n, s, _, _ in rows},
                "compile_s": {n: round(c, 3) for n, _, c, _ in rows},
                "cpu_s": {n: round(p, 3) for n, _, _, p in rows},
                "total_s": round(end - self.start, 3),
                "compile_parts_s": {k: round(merged_seconds(v, self.start, end), 3)
                                    for k, v in self.part_spans.items()},
                "compile_cache": {"dir": compile_cache.current_dir(), **self.cache}}

    def line(self, what: str = "time to first step") -> str:
        """``[peft_jax] time to first step 8.1 s: imports 2.9 | model_load 1.2 | ... |
        first_step 2.8 (compile 2.1); compilation cache DIR: 5 hits, 0 misses``."""
        s = self.summary()
        parts = [f"{n} {sec:.1f}" + (f" (compile {comp:.1f})" if comp >= 0.05 else "")
                 for n, sec, comp, _ in self.phases()]
        cache = s["compile_cache"]
        where = (f"compilation cache {cache['dir']}: {cache['hits']} hits, {cache['misses']} misses"
                 if cache["dir"] else "no compilation cache")
        return f"[peft_jax] {what} {s['total_s']:.1f} s: {' | '.join(parts)}; {where}"
