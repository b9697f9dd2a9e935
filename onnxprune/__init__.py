"""onnxprune: data-free structured pruning of ONNX models.

    >>> import onnxprune
    >>> pruned, report = onnxprune.prune("model.onnx", ratio=0.4)
"""

from onnxprune.errors import FidelityError, InternalError, OnnxPruneError, UserError

__version__ = "0.1.0"
__all__ = ["prune", "analyse", "OnnxPruneError", "UserError", "FidelityError", "InternalError", "__version__"]


def __getattr__(name: str):
    """``prune`` and ``analyse`` load the pipeline (onnx, onnxruntime, graphsurgeon) on first
    use, so that the command line's ``--help`` and argument errors do not pay for it."""
    if name in ("prune", "analyse"):
        from onnxprune import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'onnxprune' has no attribute '{name}'")
