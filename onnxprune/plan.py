"""A pruning plan: plain data saying which units of which group go (and where they merge).

Plans are produced by methods, saved as JSON, inspected, and re-applied to the same model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from onnxprune.errors import UserError

PLAN_VERSION = 1


@dataclass
class GroupPlan:
    group: int
    name: str
    size: int
    remove: list[int]
    #: Reconstruction: removed unit ``remove[i]`` is merged into kept unit ``merge_into[i]``
    #: (-1: not merged) with coefficient ``merge_scale[i]``; ``merge_corr[i]`` is how well the
    #: two correlate (it sets how much variance the merge keeps). Empty lists: no merging.
    merge_into: list[int] = field(default_factory=list)
    merge_scale: list[float] = field(default_factory=list)
    merge_corr: list[float] = field(default_factory=list)
    #: The progressive step that removed ``remove[i]`` (compensation replays in that order).
    steps: list[int] = field(default_factory=list)

    def entries(self) -> list[tuple[int, int, int, float, float]]:
        """(step, unit, merge target or -1, scale, correlation) in the order to apply them."""
        n = len(self.remove)
        into = self.merge_into or [-1] * n
        scale = self.merge_scale or [0.0] * n
        corr = self.merge_corr or [0.0] * n
        steps = self.steps or [0] * n
        return sorted(zip(steps, self.remove, into, scale, corr), key=lambda e: (e[0], e[1]))


@dataclass
class Patch:
    """New values for some slices of a constant: ``values`` replace the slices ``index`` along
    ``axis`` of the analysed array (``axis`` None: ``values`` is the whole array)."""

    axis: int | None
    index: np.ndarray
    values: np.ndarray

    def apply(self, original) -> np.ndarray:
        """A new array: ``original`` with the patch in."""
        if self.axis is None:
            return np.array(self.values, copy=True)
        out = np.array(original, copy=True)
        where = [slice(None)] * out.ndim
        where[self.axis] = self.index
        out[tuple(where)] = self.values
        return out


def _changed_slices(new: np.ndarray, old: np.ndarray, axis: int) -> np.ndarray:
    """The indices along ``axis`` where ``new`` and ``old`` differ in any bit (a -0.0 that became
    0.0 too: the rewriter must write what reconstruction computed, byte for byte)."""
    if new.itemsize in (1, 2, 4, 8):
        bits = np.dtype(f"u{new.itemsize}")
        differ = new.view(bits) != old.view(bits)
    else:  # complex and other wide types: compare their bytes
        differ = (np.ascontiguousarray(new).view(np.uint8).reshape(*new.shape, -1)
                  != np.ascontiguousarray(old).view(np.uint8).reshape(*old.shape, -1)).any(axis=-1)
    others = tuple(i for i in range(new.ndim) if i != axis)
    return np.flatnonzero(differ.any(axis=others) if others else differ)


@dataclass
class Corrections:
    """What reconstruction changes in the kept weights, as data: patches of constants of the
    analysed graph (by tensor name: the slices of consumer weights, biases and BatchNorm
    variances that changed, not whole arrays: a weight is often 100M floats, of which a merge
    changes a few columns) and biases for nodes that had none (by node name). The analysed
    graph never changes; views of it and the rewriter apply these."""

    patches: dict[str, Patch] = field(default_factory=dict)
    biases: dict[str, np.ndarray] = field(default_factory=dict)

    def read(self, tensor) -> np.ndarray:
        """The constant's values as corrected so far (the analysed array itself, not a copy,
        where nothing was corrected: read-only to the caller)."""
        patch = self.patches.get(tensor.name)
        return np.asarray(tensor.values) if patch is None else patch.apply(tensor.values)

    def write(self, tensor, values: np.ndarray, axis: int = -1) -> None:
        """Record ``values`` as the constant's corrected values: the slices along ``axis`` that
        differ from the analysed values (the consumer's input-channel axis for a weight)."""
        original = np.asarray(tensor.values)
        values = np.asarray(values)
        if values.shape != original.shape or values.dtype != original.dtype or values.ndim == 0:
            self.patches[tensor.name] = Patch(None, np.arange(0), np.array(values, copy=True))
            return
        axis %= values.ndim
        changed = _changed_slices(values, original, axis)
        if len(changed):
            self.patches[tensor.name] = Patch(axis, changed, np.take(values, changed, axis=axis))
        else:
            self.patches.pop(tensor.name, None)

    def __bool__(self) -> bool:
        return bool(self.patches or self.biases)


@dataclass
class PruningPlan:
    method: str
    ratio: float
    seed: int
    groups: list[GroupPlan] = field(default_factory=list)
    #: Free-form per-method details (step counts, annealing temperatures...).
    details: dict = field(default_factory=dict)
    #: Whether removed channels are compensated (bias, variance, merges) before slicing.
    compensate: bool = True
    #: How: "pair" (each removed unit merged into its ``merge_into`` unit, Srinivas & Babu) or
    #: "least-squares" (into every kept channel, fitted on synthetic inputs at each step).
    reconstruction: str = "pair"
    #: Whether the rewrite re-estimates the pruned model's BatchNorm statistics on the
    #: planning inputs (:mod:`onnxprune.evidence.recalibration`): set where those inputs
    #: were distilled from the model's BatchNorm statistics or are a calibration set.
    recalibrate: bool = False
    #: With ``recalibrate``: the linear layers are first re-fitted to the original's outputs on
    #: those inputs, layer after layer (:mod:`onnxprune.evidence.refit`), and only the
    #: BatchNorms they do not feed are re-estimated. False in plans saved before it existed,
    #: which replay as they were made.
    refit: bool = False
    #: The compensation, when the method computed it while planning (progressive methods
    #: measure on it); None: computed from the entries above by the reconstruct pass. Not
    #: saved: a replayed plan recomputes the same numbers from its entries.
    corrections: Corrections | None = field(default=None, repr=False, compare=False)

    @property
    def removed_units(self) -> int:
        return sum(len(g.remove) for g in self.groups)

    def to_dict(self) -> dict:
        """The plan as saved: every field but the computed corrections."""
        return {f.name: (getattr(self, f.name) if f.name != "groups" else [asdict(g) for g in self.groups])
                for f in fields(self) if f.name != "corrections"}

    def to_json(self) -> str:
        return json.dumps({"version": PLAN_VERSION, **self.to_dict()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        try:
            data = json.loads(text)
            if data.pop("version", None) != PLAN_VERSION:
                raise ValueError("unknown plan version")
            groups = [GroupPlan(**g) for g in data.pop("groups")]
            return cls(groups=groups, **data)
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"not an onnxprune plan: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise UserError(f"{path}: cannot read the plan: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not an onnxprune plan (not text)") from None
