"""Shapes that shape inference cannot know (computed at run time, as exporters emit them),
measured by running the model once or twice on dummy inputs."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from onnxprune.gradient.static import StaticInfo
from onnxprune.ir.runtime import session
from onnxprune.ir.shapes import random_inputs

logger = logging.getLogger(__name__)


def batch_symbol(static: StaticInfo) -> str:
    """The symbolic batch dim of the data input ('N' if it has none)."""
    dims = static.types.get(static.x, (0, None))[1]
    return dims[0] if dims and isinstance(dims[0], str) else "N"


def _incomplete(dims: list | None, sym: str) -> bool:
    return dims is None or any(d is None or (isinstance(d, str) and d != sym) for d in dims)


def _gaps(static: StaticInfo) -> list[str]:
    """Node outputs whose shape is unknown, or has dims other than static ones or the batch."""
    sym = batch_symbol(static)
    return [o for node in static.model.graph.node for o in node.output
            if o and _incomplete(static.types.get(o, (0, None))[1], sym)]


def has_shape_gaps(static: StaticInfo) -> bool:
    """Whether some node output has an unknown shape, or dims other than static or the batch."""
    return bool(_gaps(static))


def _run_exposed(static: StaticInfo, dims: list, dynamic: bool) -> tuple[list[str], list[dict]] | None:
    """The values of the tensors shape inference left gaps in, on random inputs, at batch 2 and
    3 if the batch is dynamic. Only those are outputs: exposing every tensor would hand back
    every activation (resnet50 at 224x224: ~1 GB at batches 2 and 3 together), where a Reshape
    at the head is typically all that is missing. The session runs twice, unoptimised."""
    m = onnx.ModelProto()
    m.CopyFrom(static.model)
    present = {o.name for o in m.graph.output}
    for name in _gaps(static):
        if name not in present:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    rng = np.random.default_rng(0)
    try:
        sess = session(m, once=True)
        names = [o.name for o in sess.get_outputs()]
        runs = []
        for batch in ((2, 3) if dynamic else (dims[0],)):
            feeds = _feeds(static, batch, rng)
            if feeds is None:
                return None
            runs.append(dict(zip(names, sess.run(names, feeds))))
    except Exception as exc:  # noqa: BLE001 - probing is best effort
        logger.debug("shape probe failed: %s", exc)
        return None
    return names, runs


def _feeds(static: StaticInfo, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Seeded dummy values (:func:`~onnxprune.ir.random_inputs`) for every data input at
    ``batch`` (the batch symbol's value): a probe model's masks and merges beside its data
    input, a control scalar at the value it is compared with; None when an input has a dim no
    one knows."""
    sym, shapes = batch_symbol(static), {}
    for value in static.model.graph.input:
        if value.name in static.init:
            continue
        dims = static.types.get(value.name, (0, None))[1]
        if dims is None or not all(isinstance(d, int) or d == sym for d in dims):
            return None
        shapes[value.name] = tuple(batch if d == sym else d for d in dims)
    return random_inputs(static.model, shapes, rng)


def probe_shapes(static: StaticInfo) -> None:
    """Fill the gaps shape inference left in ``static.types`` by running the model on dummy
    inputs with those tensors exposed: batch 2 and 3 tell batch-proportional dims from fixed
    ones."""
    dims = static.types.get(static.x, (0, None))[1]
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return
    dynamic = not isinstance(dims[0], int)
    measured = _run_exposed(static, dims, dynamic)
    if measured is None:
        return
    names, runs = measured
    sym = batch_symbol(static)
    for name in names:
        a = np.asarray(runs[0][name])
        shape = list(a.shape)
        if dynamic:
            other = np.asarray(runs[1][name]).shape
            if len(other) != len(shape):
                continue
            shape = [d if d == e else (sym if d == 2 else f"{sym}*{d // 2}") if d * 3 == e * 2 else None
                     for d, e in zip(shape, other)]
        old = static.types.get(name, (0, None))
        if old[1] is None or len(old[1]) != len(shape) or _incomplete(old[1], sym):
            static.types[name] = (old[0] or helper.np_dtype_to_tensor_dtype(a.dtype), shape)
