"""Per-op coupling rules. Importing this package registers every rule in ``coupling.RULES``."""

from onnxprune.rules import (  # noqa: F401
    attention,
    contrib,
    elementwise,
    layout,
    linear,
    norms,
    quantized,
    reshape,
    shape_expr,
)
