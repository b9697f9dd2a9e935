"""Weights held out of the protobuf: a large model's big initializers as numpy arrays, once.

A ModelProto copies every byte it is given, and every read of a bytes field copies them again
(``tensor.raw_data`` is a new ``bytes`` object each time), so a model whose weights sit in its
protobuf cannot share them with the graph onnxprune edits or with the sessions that run it.
Within a :func:`holding` block (the CLI's prune command opens one), a model read with large
external data keeps its big initializers *held*: the TensorProto keeps its name, type and dims,
and its external data names a key into the block's table, where the array is. Importing the
graph gives its constants those arrays, sessions feed them as inputs, an export asked to hold
(the rewrite's) holds its big constants in turn, and saving streams them to the data file.

A held tensor's location is no file name: anything that tries to read it as one (onnx,
onnxruntime) fails loudly instead of reading something else. The table goes with the block, so
a held model is saved inside it. Held arrays are read-only: the analysed graph, the sessions
and the original model share them.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import InternalError

#: The location a held tensor names (never a file).
HELD_LOCATION = "<onnxprune: held in memory>"
_KEY = "onnxprune-held"
#: The tensor's own ``data_location`` before it was held ("" when the field was not set).
_WAS = "onnxprune-data-location"
#: Element types whose raw bytes are a numpy array's (little-endian, as ONNX stores them).
HOLDABLE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                      onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                      onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                      onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL})

_tables: list[dict[str, np.ndarray]] = []
_keys = itertools.count()


@contextmanager
def holding() -> Iterator[None]:
    """A block within which models may hold their weights; the arrays are released at its end."""
    table: dict[str, np.ndarray] = {}
    _tables.append(table)
    try:
        yield
    finally:
        _tables.remove(table)
        table.clear()


def active() -> bool:
    """Whether a :func:`holding` block is open (outside one, nothing is held)."""
    return bool(_tables)


def hold(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """In place: ``tensor`` (its name, type and dims already set, no data) stands for ``array``
    in the innermost block. ``array`` becomes read-only."""
    if not _tables:
        raise InternalError(f"tensor '{tensor.name}' held outside a holding block")
    key = str(next(_keys))
    array.flags.writeable = False
    _tables[-1][key] = array
    was = str(tensor.data_location) if tensor.HasField("data_location") else ""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for name, value in (("location", HELD_LOCATION), (_KEY, key), (_WAS, was)):
        entry = tensor.external_data.add()
        entry.key, entry.value = name, value


def is_held(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(e.key == _KEY for e in tensor.external_data)


def held_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The array a held tensor stands for (read-only; not a copy)."""
    key = next(e.value for e in tensor.external_data if e.key == _KEY)
    for table in reversed(_tables):
        if key in table:
            return table[key]
    raise InternalError(f"tensor '{tensor.name}' is held, but not by an open block (a bug)")


def holdable(data_type: int) -> bool:
    """Whether a tensor of this element type can be held: its raw bytes are a numpy array's
    (a little-endian machine reads them as ONNX stores them)."""
    return data_type in HOLDABLE and sys.byteorder == "little"


def array_of(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values: a held tensor's array (not a copy), else the protobuf's (a copy)."""
    return held_array(tensor) if is_held(tensor) else numpy_helper.to_array(tensor)


def held_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The main graph's held initializers."""
    return [t for t in model.graph.initializer if is_held(t)]


def header(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A held tensor as it was before it was held, without its data: what it serialises to is
    that tensor's bytes but the ``raw_data`` field."""
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    del out.external_data[:]
    out.ClearField("data_location")
    if info.get(_WAS):
        out.data_location = int(info[_WAS])
    return out


def unheld(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor a held one stands for, its bytes in the protobuf (a copy of them)."""
    out = header(tensor)
    out.raw_data = np.ascontiguousarray(held_array(tensor)).tobytes()
    return out


def materialised(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose held tensors carry their bytes (for writing one protobuf)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if is_held(tensor):
            tensor.CopyFrom(unheld(tensor))
    return copy
