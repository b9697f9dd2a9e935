"""onnxruntime sessions: the one place they are made (and where their time is counted)."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from onnxprune.profiling import stage

#: An onnxruntime session; modules outside ``ir`` name the type through this alias.
Session = ort.InferenceSession


class _ProfiledSession(ort.InferenceSession):
    """A session whose runs count as the ``run`` stage of whatever stage called them."""

    def run(self, output_names, input_feed, run_options=None):
        with stage("run"):
            return super().run(output_names, input_feed, run_options)


def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    """A CPU session over ``model``, quiet; ``threads`` intra-op threads (0: onnxruntime's choice)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    with stage("session"):
        return _ProfiledSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
