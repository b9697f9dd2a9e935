"""Per-op coupling rules. Importing this package registers every rule in ``coupling.RULES``."""

from onnxprune.rules import elementwise, layout, linear, norms  # noqa: F401
