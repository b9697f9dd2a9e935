"""The load/save boundary: the only place that reads or writes model files.

Loading turns every way a model can be broken on disk into a :class:`UserError` with one
actionable line, and normalises what is valid but awkward (:mod:`onnxprune.ir.validate`:
model-local functions inlined, sparse initializers made dense, nodes sorted). Saving goes
through :mod:`onnxprune.writer`: temporary files beside the target, renamed into place, so an
interrupted or failed run never leaves a half-written output behind. External data is read
once into the tensors (a large model's, within a holding block, into held arrays:
:mod:`onnxprune.ir.held`) and written straight from them, never through a copy of the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from onnxprune.errors import UserError
from onnxprune.ir import held, runtime
from onnxprune.ir.runtime import copy_without, serialized_size, tensor_nbytes, without_initializers
from onnxprune.ir.validate import all_tensors, check_structure, expected_bytes
from onnxprune.writer import Transaction

logger = logging.getLogger(__name__)

#: Oldest default-domain opset the coupling rules are written against.
MIN_OPSET = 7
#: Protobuf cannot serialise a single message above 2 GiB: bigger models go to external data.
_PROTO_LIMIT = 2**31 - 2**20
#: Tensors at least this large go to the external data file when a model is saved with one.
_EXTERNAL_THRESHOLD = 1024
#: Offsets in the external data file are multiples of this (lets readers map it page-wise).
_ALIGN = 4096


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model with its external data, refusing anything malformed or unsafe."""
    return load_model_info(path)[0]


def load_model_info(path: str | os.PathLike, hold: bool = False) -> tuple[onnx.ModelProto, list[Path]]:
    """:func:`load_model`, and the external data files it read (empty when none: falsy). With
    ``hold``, inside a :func:`~onnxprune.ir.held.holding` block, a large model's big external
    initializers are read into held arrays instead of the protobuf (see :mod:`onnxprune.ir.held`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, TypeError):
        raise UserError(f"{path}: not an ONNX model, or a truncated one (protobuf cannot parse it)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it: {exc.strerror}") from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path}: not an ONNX model (no graph found; is it truncated or another format?)")
    files = _load_external_data(model, path.parent.resolve(), hold and held.active())
    _check_opset(model, path)
    check_structure(model, str(path))
    return model, files


def _load_external_data(model: onnx.ModelProto, base: Path, hold: bool = False) -> list[Path]:
    """Read every tensor's external data into it (each byte once), refusing locations that
    escape the model's folder (a path traversal, through ``..``, an absolute path or a
    symlink), missing or short files and malformed entries. Returns the files read. With
    ``hold``, the big initializers of a model large enough for lean sessions are read into held
    arrays instead."""
    files: dict[Path, int] = {}
    entries = []
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        target, offset, length = _external_entry(tensor, base)
        if target not in files:
            files[target] = target.stat().st_size
        size = files[target]
        if offset > size:
            raise UserError(f"tensor '{tensor.name}': external data offset {offset} is past the end of "
                            f"'{target.name}' ({size} bytes)")
        if length is None:
            length = size - offset
            need = expected_bytes(tensor)
            if need is not None and need != length:
                raise UserError(f"tensor '{tensor.name}': its external data in '{target.name}' holds {length} bytes "
                                f"from offset {offset}, its shape needs {need}")
        if offset + length > size:
            raise UserError(f"tensor '{tensor.name}': external data '{target.name}' is {size} bytes, shorter "
                            f"than offset {offset} + length {length}: truncated?")
        entries.append((tensor, target, offset, length))
    main = list(model.graph.initializer)  # alive while ids are compared: protobuf caches the wrappers
    to_hold = _to_hold({id(t) for t in main}, entries) if hold else set()
    for tensor, target, offset, length in entries:
        with open(target, "rb") as f:
            f.seek(offset)
            if id(tensor) in to_hold:
                array = np.empty(tuple(tensor.dims), helper.tensor_dtype_to_np_dtype(tensor.data_type))
                if f.readinto(memoryview(array.reshape(-1)).cast("B")) != length:
                    raise UserError(f"tensor '{tensor.name}': external data '{target.name}' changed while it was read")
            else:
                tensor.raw_data = f.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        if id(tensor) in to_hold:
            held.hold(tensor, array)
    return list(files)


def _to_hold(main: set[int], entries: list) -> set[int]:
    """The tensors to hold (by id): the main graph's initializers (``main``) of
    ``LEAN_TENSOR_BYTES`` or more whose bytes are a numpy array's, when they add up to
    ``LEAN_SESSION_BYTES`` (smaller models load as they always did). A tensor whose data does
    not fit its shape is left to the check that names it."""
    big = {id(tensor): length for tensor, _, _, length in entries
           if id(tensor) in main and held.holdable(tensor.data_type) and length >= runtime.LEAN_TENSOR_BYTES
           and length == expected_bytes(tensor)}
    return set(big) if sum(big.values()) >= runtime.LEAN_SESSION_BYTES else set()


def _external_entry(tensor: onnx.TensorProto, base: Path) -> tuple[Path, int, int | None]:
    """Where a tensor's external data lives: (file, offset, length or None), checked."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise UserError(f"tensor '{tensor.name}' keeps its data externally but names no file (empty location)")
    target = (base / location).resolve()
    if os.path.isabs(location) or not target.is_relative_to(base):
        raise UserError(
            f"tensor '{tensor.name}' points its external data at '{location}', outside the "
            f"model's folder {base}: refusing to read it"
        )
    if not target.exists():
        raise UserError(f"tensor '{tensor.name}': external data file '{location}' is missing")
    if not target.is_file():
        raise UserError(f"tensor '{tensor.name}': external data '{location}' is not a regular file")
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise UserError(f"tensor '{tensor.name}': external data offset/length are not integers: "
                        f"{info.get('offset')!r}, {info.get('length')!r}") from None
    if offset < 0 or (length is not None and length < 0):
        raise UserError(f"tensor '{tensor.name}': negative external data offset or length ({offset}, {length})")
    return target, offset, length


def _check_opset(model: onnx.ModelProto, path: Path) -> None:
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise UserError(f"{path}: the model imports no default-domain opset")
    if default[0] < MIN_OPSET:
        raise UserError(f"{path}: opset {default[0]} is too old (onnxprune supports opset {MIN_OPSET} and newer)")
    newest = onnx.defs.onnx_opset_version()
    if default[0] > newest:
        raise UserError(
            f"{path}: opset {default[0]} is newer than this onnx package supports ({newest}); upgrade onnx"
        )


def keep_ir_version(model: onnx.ModelProto, version: int) -> None:
    """In place: give a written model the input's IR version. IR 3 lists every initializer as a
    graph input too (graph_inputs() still sees only the real ones)."""
    if version >= model.ir_version or version < 3:
        return
    listed = {v.name for v in model.graph.input}
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer if t.name not in listed)
    model.ir_version = version


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               transaction: Transaction | None = None) -> list[Path]:
    """Write ``model`` atomically: to temporary files beside the target, then rename.

    ``external_data=None`` picks external data only when the model is too large for one
    protobuf. Returns the paths written (the model, and its ``.data`` file if any). The model
    is left as it came. Given a ``transaction``, the files join it and are renamed into place
    when the caller commits it (with the run's other files); the paths are returned anyway.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{path}: the folder {folder} does not exist")
    if external_data is None:
        external_data = serialized_size(model) > _PROTO_LIMIT
    with Transaction() if transaction is None else contextlib.nullcontext(transaction) as tx:
        written = [path]
        if external_data:
            data_name = path.name + ".data"
            data_tmp = tx.temporary(folder / data_name)
            model_tmp = tx.temporary(path)
            if _save_with_external_data(model, model_tmp, data_tmp, data_name):
                written.append(folder / data_name)
            else:
                tx.discard(data_tmp)
        else:
            model_tmp = tx.temporary(path)
            whole = held.materialised(model) if held.held_tensors(model) else model
            with open(model_tmp, "wb") as f:
                f.write(whole.SerializeToString())
        if transaction is None:
            tx.commit()  # the data file first: the model never points at a missing one
    return written


def _save_with_external_data(model: onnx.ModelProto, model_file: Path, data_file: Path, location: str) -> int:
    """Write the main graph's initializers of at least ``_EXTERNAL_THRESHOLD`` bytes (and its
    held ones, straight from their arrays) to ``data_file`` and the rest of the model to
    ``model_file``, pointing at ``location``; the model is not changed and not copied (one
    tensor's bytes at a time). Returns how many tensors went to the data file."""
    skeleton = without_initializers(model, {t.name for t in model.graph.initializer})
    moved = 0
    with open(data_file, "wb") as f:
        for tensor in model.graph.initializer:
            kept = held.is_held(tensor)
            if (not kept and not tensor.HasField("raw_data")) or tensor_nbytes(tensor) < _EXTERNAL_THRESHOLD:
                skeleton.graph.initializer.add().CopyFrom(held.unheld(tensor) if kept else tensor)
                continue
            placeholder = skeleton.graph.initializer.add()
            placeholder.CopyFrom(held.header(tensor) if kept else copy_without(tensor, "raw_data"))
            offset = -f.tell() % _ALIGN + f.tell()
            f.seek(offset)
            length = f.write(np.ascontiguousarray(held.held_array(tensor)).data if kept else tensor.raw_data)
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = placeholder.external_data.add()
                entry.key, entry.value = key, value
            moved += 1
    with open(model_file, "wb") as f:
        f.write(skeleton.SerializeToString())
    return moved
