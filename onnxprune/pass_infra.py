"""A small pass infrastructure: a pass maps a graph to a graph and says whether it changed it.

Passes are data: a :class:`PassManager` runs a list of them, to a fixed point if asked, with a
bounded number of rounds (an unbounded fixed-point loop hides bugs as hangs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxprune.errors import InternalError

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool


class GraphPass:
    """One transformation of a graph. Subclasses implement :meth:`call`."""

    def call(self, graph: gs.Graph) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def requires(self, graph: gs.Graph) -> None:
        """Raise if the graph does not meet this pass's preconditions."""

    def ensures(self, graph: gs.Graph) -> None:
        """Raise if the pass broke its postconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        self.requires(graph)
        result = self.call(graph)
        self.ensures(result.graph)
        logger.debug("%s: modified=%s", type(self).__name__, result.modified)
        return result


class PassManager(GraphPass):
    """Run ``passes`` in order; with ``fixed_point`` repeat until nothing changes."""

    def __init__(self, passes: list[GraphPass], *, fixed_point: bool = False, max_rounds: int = 16):
        self.passes = passes
        self.fixed_point = fixed_point
        self.max_rounds = max_rounds

    def call(self, graph: gs.Graph) -> PassResult:
        any_change = False
        for _ in range(self.max_rounds if self.fixed_point else 1):
            changed = False
            for p in self.passes:
                result = p(graph)
                graph, changed = result.graph, changed or result.modified
            any_change |= changed
            if not changed:
                return PassResult(graph, any_change)
        if self.fixed_point:
            raise InternalError(f"passes did not reach a fixed point in {self.max_rounds} rounds")
        return PassResult(graph, any_change)
