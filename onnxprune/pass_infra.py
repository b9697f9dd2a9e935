"""A small pass infrastructure: a pass maps a value (a graph, a pruning job) to a value of the
same kind and says whether it changed it.

Passes are data: a :class:`PassManager` runs a list of them, to a fixed point if asked, with a
bounded number of rounds (an unbounded fixed-point loop hides bugs as hangs). Calling a pass
runs its :meth:`Pass.requires` check, then :meth:`Pass.call`, then :meth:`Pass.ensures`; a
broken pre- or postcondition is a typed error naming the pass, and a failure inside a manager
names the passes that ran before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

from onnxprune.errors import InternalError, OnnxPruneError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class PreconditionError(InternalError):
    """A pass was handed something it does not accept (a bug in the pass order)."""


class PostconditionError(InternalError):
    """A pass broke what it promises about its result (a bug in the pass)."""


@dataclass
class PassResult(Generic[T]):
    value: T
    modified: bool


class Pass(Generic[T]):
    """One transformation. Subclasses implement :meth:`call`, and may check :meth:`requires`
    and :meth:`ensures` (raise, or return a message saying what is wrong)."""

    def call(self, value: T) -> PassResult[T]:  # pragma: no cover - interface
        raise NotImplementedError

    def requires(self, value: T) -> str | None:
        """What is wrong with the input, or None."""
        return None

    def ensures(self, value: T) -> str | None:
        """What is wrong with the result, or None."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, value: T) -> PassResult[T]:
        problem = self.requires(value)
        if problem:
            raise PreconditionError(f"{self.name}: precondition failed: {problem}")
        result = self.call(value)
        problem = self.ensures(result.value)
        if problem:
            raise PostconditionError(f"{self.name}: postcondition failed: {problem}")
        logger.debug("%s: modified=%s", self.name, result.modified)
        return result


#: Passes over graphsurgeon graphs (lowering, cleanup).
GraphPass = Pass


class PassManager(Pass[T]):
    """Run ``passes`` in order; with ``fixed_point`` repeat until nothing changes."""

    def __init__(self, passes: list[Pass[T]], *, fixed_point: bool = False, max_rounds: int = 16):
        self.passes = passes
        self.fixed_point = fixed_point
        self.max_rounds = max_rounds

    def call(self, value: T) -> PassResult[T]:
        any_change = False
        for _ in range(self.max_rounds if self.fixed_point else 1):
            changed = False
            for k, p in enumerate(self.passes):
                try:
                    result = p(value)
                except OnnxPruneError:
                    raise
                except Exception as exc:
                    ran = ", ".join(q.name for q in self.passes[:k]) or "none"
                    raise InternalError(f"{p.name} failed (passes before it: {ran}): {exc!r}") from exc
                value, changed = result.value, changed or result.modified
            any_change |= changed
            if not changed:
                return PassResult(value, any_change)
        if self.fixed_point:
            raise InternalError(f"passes did not reach a fixed point in {self.max_rounds} rounds")
        return PassResult(value, any_change)
