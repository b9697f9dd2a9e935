"""The load/save boundary: the only place that reads or writes model files.

Loading turns every way a model can be broken on disk into a :class:`UserError` with one
actionable line; saving is atomic, so an interrupted or failed run never leaves a
half-written output behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import uses_external_data

from onnxprune.errors import UserError

logger = logging.getLogger(__name__)

#: Oldest default-domain opset the coupling rules are written against.
MIN_OPSET = 7
#: Protobuf cannot serialise a single message above 2 GiB: bigger models go to external data.
_PROTO_LIMIT = 2**31 - 2**20


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model with its external data, refusing anything malformed or unsafe."""
    return load_model_info(path)[0]


def load_model_info(path: str | os.PathLike) -> tuple[onnx.ModelProto, bool]:
    """:func:`load_model`, and whether the file kept its weights in external data."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError):
        raise UserError(f"{path}: not an ONNX model, or a truncated one (protobuf cannot parse it)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it: {exc.strerror}") from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path}: not an ONNX model (no graph found; is it truncated or another format?)")
    external = _check_external_data(model, path.parent.resolve())
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read its external data: {exc}") from None
    _check_opset(model, path)
    return model, external


def _check_external_data(model: onnx.ModelProto, base: Path) -> bool:
    """Refuse external-data locations that escape the model's folder (a path traversal)."""
    found = False
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        found = True
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise UserError(
                f"tensor '{tensor.name}' points its external data at '{location}', outside the "
                f"model's folder {base}: refusing to read it"
            )
        if not target.exists():
            raise UserError(f"tensor '{tensor.name}': external data file '{location}' is missing")
    return found


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` atomically: to temporary files in the target folder, then rename.

    ``external_data=None`` picks external data only when the model is too large for one
    protobuf. Returns the paths written (the model, and its ``.data`` file if any).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise UserError(f"{path}: the folder {folder} does not exist")
    if external_data is None:
        external_data = model.ByteSize() > _PROTO_LIMIT
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=folder))
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            # onnx rewrites the tensors it externalises in place: save a copy, not the caller's.
            onnx.save_model(
                _copy(model), str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                location=data_name, size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(tmp_model))
        written = [path]
        if (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, folder / data_name)
            written.append(folder / data_name)
        os.replace(tmp_model, path)
        return written
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()
