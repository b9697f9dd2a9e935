"""Every pruning method by name (``--method``); ``make bench`` runs each one registered here."""

from __future__ import annotations

from onnxprune.passes.autodfp import AutoDfp
from onnxprune.passes.methods import Magnitude, Method, Random
from onnxprune.passes.progressive import Paoding, Srdfp

METHODS: dict[str, type[Method]] = {m.name: m for m in (Magnitude, Random, Paoding, Srdfp, AutoDfp)}
