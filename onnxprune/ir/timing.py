"""Timing onnxruntime runs, and the one-op chains latency calibration times.

Runs are interleaved (one run of each session in turn) and summarised by their median: load
from other processes then falls on every session alike, and one slow run moves nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.ir.runtime import Session

#: The opset the calibration chains are written in.
CHAIN_OPSET = 17


def interleaved_medians(runs: Sequence[tuple[Session, dict[str, np.ndarray]]], seconds: float,
                        least: int = 5, repeat: int = 3) -> list[float]:
    """Median seconds of one run of each (session, feed), the sessions taking turns until
    ``seconds`` have passed and each was timed at least ``least`` times. A turn is one untimed
    run, then ``repeat`` timed ones: the untimed run pays for what the last session left behind
    (its worker threads still spinning, its data in the caches)."""
    times: list[list[float]] = [[] for _ in runs]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times[0]) < least:
        for (sess, feed), spent in zip(runs, times):
            sess.run(None, feed)
            for _ in range(repeat):
                t0 = time.perf_counter()
                sess.run(None, feed)
                spent.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


@dataclass(frozen=True)
class OpChain:
    """``length`` copies of one op, each reading the last one's output (and its own weight,
    of ``weight`` shape, when it has one; ``binary`` ops read the last output twice): a
    chain keeps its shape, so the per-run cost of the session separates from the op's."""

    op: str
    shape: tuple[int, ...]
    length: int = 1
    weight: tuple[int, ...] | None = None
    binary: bool = False
    attrs: dict = field(default_factory=dict, hash=False, compare=False)
    #: Extra constant inputs after the weight (LayerNormalization's bias).
    extra: tuple[tuple[int, ...], ...] = ()

    def model(self, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        nodes, inits, last = [], [], "x"
        for i in range(self.length):
            inputs = [last, last] if self.binary else [last]
            for j, shape in enumerate(((self.weight,) if self.weight else ()) + self.extra):
                name = f"w{i}_{j}"
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32),
                                                     name))
                inputs.append(name)
            nodes.append(helper.make_node(self.op, inputs, [f"y{i}"], **self.attrs))
            last = f"y{i}"
        graph = helper.make_graph(nodes, f"{self.op}_chain",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.shape))],
                                  [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", CHAIN_OPSET)])
        return model, {"x": rng.standard_normal(self.shape).astype(np.float32)}


__all__ = ["CHAIN_OPSET", "OpChain", "interleaved_medians"]
