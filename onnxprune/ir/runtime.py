"""onnxruntime sessions: the one place they are made."""

from __future__ import annotations

import onnx
import onnxruntime as ort

#: An onnxruntime session; modules outside ``ir`` name the type through this alias.
Session = ort.InferenceSession


def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    """A CPU session over ``model``, quiet; ``threads`` intra-op threads (0: onnxruntime's choice)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
