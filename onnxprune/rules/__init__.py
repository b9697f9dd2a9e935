"""Per-op coupling rules. Importing this package registers every rule in ``coupling.RULES``."""

from onnxprune.rules import (  # noqa: F401
    attention,
    contrib,
    control_flow,
    elementwise,
    layout,
    linear,
    norms,
    quantized,
    recurrent,
    reshape,
    shape_expr,
)
