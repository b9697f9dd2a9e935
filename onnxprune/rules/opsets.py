"""What changes with the opset, as data the rules look up instead of ``if opset >= N`` branches.

ONNX revises an op by moving a list parameter from an attribute to an input (Split's sizes
at opset 13) or by changing what an attribute means (Softmax's axis at 13). Each such fact is
an :class:`OpsetTable`: the opset each version of the op starts at, mapped to that version's
facts. A rule asks ``TABLE.at(graph.opset)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class OpsetTable(Generic[T]):
    """Facts per op version, keyed by the opset the version starts at."""

    def __init__(self, versions: dict[int, T]):
        if not versions:
            raise ValueError("an opset table needs at least one version")
        self._versions = dict(sorted(versions.items()))

    def at(self, opset: int) -> T:
        """The facts of the newest version not after ``opset`` (the oldest one below it)."""
        since = max((v for v in self._versions if v <= opset), default=next(iter(self._versions)))
        return self._versions[since]


@dataclass(frozen=True)
class Placement:
    """Where an op version takes a list parameter: input ``slot``, or attribute ``attribute``."""

    slot: int | None = None
    attribute: str | None = None

    @property
    def is_input(self) -> bool:
        return self.slot is not None


@dataclass(frozen=True)
class SoftmaxAxes:
    """How Softmax, LogSoftmax and Hardmax read ``axis``: its default, and whether the op
    normalises over every axis from it on (the input coerced to 2-D) or over that axis alone."""

    default: int
    through_last: bool


SOFTMAX_AXES: OpsetTable[SoftmaxAxes] = OpsetTable({
    1: SoftmaxAxes(default=1, through_last=True),
    13: SoftmaxAxes(default=-1, through_last=False),
})

#: (op type, parameter) -> where each version of the op takes it.
PARAMETERS: dict[tuple[str, str], OpsetTable[Placement]] = {
    ("Split", "split"): OpsetTable({1: Placement(attribute="split"), 13: Placement(slot=1)}),
}


def placement(op: str, parameter: str, opset: int) -> Placement:
    return PARAMETERS[op, parameter].at(opset)
