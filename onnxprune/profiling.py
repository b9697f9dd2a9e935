"""Where a prune spends its time: wall seconds per stage, as a tree.

Code marks its expensive parts with ``with stage("distill"):``; stages nest, and each one's
entry counts only the time not spent in a stage below it (so the entries add up to the
whole). ``bench/profile.py`` and ``onnxprune ... -v`` print the tree. Recording is always on:
it costs two clock reads per stage, and stages are coarse (a session, a run, a fit).

:func:`track_memory` (off by default; ``bench/bigmodel.py`` turns it on) also records each
stage's peak resident memory: at every stage boundary the kernel's high-water mark is read and
reset (Linux ``/proc/self/clear_refs``), so the peak of a stage is its own, not an earlier
stage's. Resetting it also resets what ``getrusage`` reports for this process: the profile's
``peak_rss[()]`` is the whole run's peak instead.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class _Frame:
    path: tuple[str, ...]
    start: float
    inner: float = 0.0


@dataclass
class Profile:
    """Exclusive seconds and call counts per stage path (``("plan", "distill", "run")``)."""

    seconds: dict[tuple[str, ...], float] = field(default_factory=dict)
    calls: dict[tuple[str, ...], int] = field(default_factory=dict)
    #: Peak resident bytes while each stage ran, its inner stages included (``()``: the whole
    #: profile); only with :func:`track_memory`.
    peak_rss: dict[tuple[str, ...], int] = field(default_factory=dict)

    def total(self) -> float:
        return sum(self.seconds.values())

    def by_leaf(self) -> dict[str, float]:
        """Seconds per stage name wherever it ran (all ``run`` entries together, ...)."""
        out: dict[str, float] = {}
        for path, s in self.seconds.items():
            out[path[-1]] = out.get(path[-1], 0.0) + s
        return out

    def paths(self) -> list[tuple[str, ...]]:
        """Every stage path, parents before children, in the order of :meth:`rows`."""
        return sorted({path[:i] for path in self.seconds for i in range(1, len(path) + 1)})

    def rows(self) -> list[tuple[str, int, float, float]]:
        """(indented name, calls, exclusive seconds, inclusive seconds) in tree order."""
        inclusive: dict[tuple[str, ...], float] = {}
        for path, s in self.seconds.items():
            for i in range(1, len(path) + 1):
                inclusive[path[:i]] = inclusive.get(path[:i], 0.0) + s
        return [("  " * (len(p) - 1) + p[-1], self.calls.get(p, 0), self.seconds.get(p, 0.0), inclusive[p])
                for p in self.paths()]


_stack: list[_Frame] = []
_current = Profile()
_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"
#: Whether stage boundaries read (and reset) the resident high-water mark.
_tracking = False


def track_memory(on: bool = True) -> bool:
    """Record each stage's peak resident memory from now on (``on``); whether this system
    can (Linux, with a resettable high-water mark)."""
    global _tracking
    _tracking = False
    if on and _high_water() is not None and _reset_high_water():
        _tracking = True
    return _tracking


def _high_water() -> int | None:
    try:
        with open(_STATUS) as f:
            line = next((line for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None


def _reset_high_water() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _mark_memory() -> None:
    """The peak since the last boundary belongs to every stage open now (and to the whole)."""
    peak = _high_water() or 0
    path = _stack[-1].path if _stack else ()
    for i in range(len(path) + 1):
        _current.peak_rss[path[:i]] = max(_current.peak_rss.get(path[:i], 0), peak)
    _reset_high_water()


@contextmanager
def stage(name: str):
    """Time the block under ``name``, nested in the enclosing stage."""
    if _tracking:
        _mark_memory()
    parent = _stack[-1].path if _stack else ()
    frame = _Frame((*parent, name), time.perf_counter())
    _stack.append(frame)
    try:
        yield
    finally:
        if _tracking:
            _mark_memory()
        _stack.pop()
        elapsed = time.perf_counter() - frame.start
        _current.seconds[frame.path] = _current.seconds.get(frame.path, 0.0) + elapsed - frame.inner
        _current.calls[frame.path] = _current.calls.get(frame.path, 0) + 1
        if _stack:
            _stack[-1].inner += elapsed


def reset() -> Profile:
    """Start a new profile; returns the one recorded so far."""
    global _current
    if _tracking:
        _mark_memory()
    done, _current = _current, Profile()
    return done


def current() -> Profile:
    """The profile being recorded (with :func:`track_memory`, its peaks up to now)."""
    if _tracking:
        _mark_memory()
    return _current


#: Who hears about progress within a stage (the CLI's bars): ``listener(label, done, total)``.
_listener = None


@contextmanager
def reporting(listener):
    """Send :func:`advance` calls to ``listener`` (None: nowhere) within the block."""
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous


def advance(label: str, done: int, total: int) -> None:
    """Progress of a long loop (distillation steps, ...), for whoever listens."""
    if _listener is not None:
        _listener(label, done, total)
