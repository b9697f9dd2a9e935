"""Shapes that shape inference cannot know (computed at run time, as exporters emit them),
measured by running the model once or twice on dummy inputs."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from onnxprune.gradient.static import StaticInfo
from onnxprune.ir.runtime import session

logger = logging.getLogger(__name__)


def batch_symbol(static: StaticInfo) -> str:
    """The symbolic batch dim of the data input ('N' if it has none)."""
    dims = static.types.get(static.x, (0, None))[1]
    return dims[0] if dims and isinstance(dims[0], str) else "N"


def _incomplete(dims: list | None, sym: str) -> bool:
    return dims is None or any(d is None or (isinstance(d, str) and d != sym) for d in dims)


def has_shape_gaps(static: StaticInfo) -> bool:
    """Whether some node output has an unknown shape, or dims other than static or the batch."""
    sym = batch_symbol(static)
    for node in static.model.graph.node:
        for o in node.output:
            dims = static.types.get(o, (0, None))[1] if o else []
            if _incomplete(dims, sym):
                return True
    return False


def _run_exposed(static: StaticInfo, dims: list, dynamic: bool) -> tuple[list[str], list[dict]] | None:
    """Every tensor's value on random inputs, at batch 2 and 3 if the batch is dynamic."""

    m = onnx.ModelProto()
    m.CopyFrom(static.model)
    present = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for o in node.output:
            if o and o not in present:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                present.add(o)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(static.x_elem))
    rng = np.random.default_rng(0)
    try:
        sess = session(m)
        names = [o.name for o in sess.get_outputs()]
        runs = []
        for batch in ((2, 3) if dynamic else (dims[0],)):
            feed = rng.uniform(0, 1, [batch] + dims[1:]).astype(dtype)
            runs.append(dict(zip(names, sess.run(names, {static.x: feed}))))
    except Exception as exc:  # noqa: BLE001 - probing is best effort
        logger.debug("shape probe failed: %s", exc)
        return None
    return names, runs


def probe_shapes(static: StaticInfo) -> None:
    """Fill the gaps shape inference left in ``static.types`` by running the model on dummy
    inputs with every tensor exposed: batch 2 and 3 tell batch-proportional dims from fixed
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
