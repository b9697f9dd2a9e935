"""onnxprune: data-free structured pruning of ONNX models.

    >>> import onnxprune
    >>> pruned, report = onnxprune.prune("model.onnx", ratio=0.4)
"""

from onnxprune.errors import FidelityError, InternalError, OnnxPruneError, UserError
from onnxprune.pipeline import analyse, prune

__version__ = "0.1.0"
__all__ = ["prune", "analyse", "OnnxPruneError", "UserError", "FidelityError", "InternalError", "__version__"]
