"""An opt-in calibration set: unlabelled inputs the user has, used instead of synthetic ones.

onnxprune is data-free by default. ``--calibration FILE.npz`` (``prune(..., calibration=)``)
replaces the synthetic inputs everywhere they are used: the progressive methods' probes, the
channel statistics least-squares reconstruction fits, and the fidelity check. The set is split
once, by position: the last quarter of the samples (at least 1, at most 64) is held out for
the fidelity check and nothing plans with it; planning uses the rest.

A request for fewer samples than a part holds takes an evenly spaced subset with a seeded
offset; a request for more takes the whole part, never repeating a sample (a repeated sample
would sit in both folds of the statistics' cross-validation and make it over-confident).

Numpy only: the arrays are checked against :class:`onnxprune.ir.InputSpec`-like records
(``name``, ``dims`` with None where dynamic, ``dtype``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from onnxprune.errors import UserError
from onnxprune.npz import check_shape, read_npz

#: The held-out share of a calibration set, and its bounds in samples.
HELD_OUT_SHARE, HELD_OUT_MAX = 0.25, 64
EXAMPLE = "numpy.savez(path, **{input_name: samples})"


class Spec(Protocol):
    name: str
    dims: tuple[int | None, ...] | None
    dtype: np.dtype


class CalibrationSet(dict):
    """Arrays by graph input name (first axis: samples), checked against the model, and where
    they came from (``origin``: the file's name, or "arrays passed in")."""

    def __init__(self, arrays: Mapping[str, np.ndarray], origin: str = "arrays passed in"):
        super().__init__(arrays)
        self.origin = origin

    @property
    def samples(self) -> int:
        return len(next(iter(self.values())))

    @property
    def held_out_count(self) -> int:
        return int(np.clip(int(self.samples * HELD_OUT_SHARE), 1, HELD_OUT_MAX))

    def part(self, held_out: bool) -> range:
        """The sample indices planning uses, or the held-out ones (the last quarter)."""
        cut = self.samples - self.held_out_count
        return range(cut, self.samples) if held_out else range(cut)

    def take(self, count: int, seed: int, held_out: bool = False) -> tuple[dict[str, np.ndarray], str]:
        """Up to ``count`` samples of one part, and what they are: an evenly spaced subset
        (seeded offset) when the part holds more, the whole part when it holds fewer."""
        pool = np.asarray(self.part(held_out))
        if count < len(pool):
            offset = np.random.default_rng([seed, 2, int(held_out)]).random()
            pool = pool[np.floor((np.arange(count) + offset) * len(pool) / count).astype(int)]
        arrays = {name: values[pool] for name, values in self.items()}
        total = f"{self.origin}'s {self.samples} samples"
        if held_out:
            return arrays, f"{len(pool)} of the last {len(self.part(True))} of {total}, never used for planning"
        return arrays, f"{len(pool)} of the first {len(self.part(False))} of {total} (the last {self.held_out_count} held out)"

def load_calibration(path: str | Path, specs: Sequence[Spec]) -> CalibrationSet:
    """Read and check a calibration .npz: one array per graph input, named after it (or a
    single array under any name for a single-input model), samples on the first axis."""
    p = Path(path)
    arrays = read_npz(p, EXAMPLE, what="calibration file")
    return check_calibration(arrays, specs, p.name)


def check_calibration(arrays: Mapping[str, np.ndarray], specs: Sequence[Spec],
                      origin: str = "arrays passed in") -> CalibrationSet:
    """The arrays matched to ``specs`` by name, checked (rank, fixed dimensions after the first,
    dtype, finite values, sample counts) and cast to each input's dtype, or a UserError."""
    where = f"calibration {origin}"
    if not arrays:
        raise UserError(f"{where} holds no arrays; write one per model input with {EXAMPLE}")
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise UserError(f"{where}: array(s) {unknown} match no model input; the inputs are {names}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(f"{where} has no array for input(s) {missing}; name each array after its input")
    checked = {s.name: _checked(np.asarray(arrays[s.name]), s, where) for s in specs}
    counts = {name: len(values) for name, values in checked.items()}
    if len(set(counts.values())) > 1:
        raise UserError(f"{where}: the inputs have different sample counts {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise UserError(f"{where} has zero samples")
    if count < 2:
        raise UserError(f"{where} has 1 sample; at least 2 are needed (one is held out for the fidelity check)")
    return CalibrationSet(checked, origin)


def _checked(values: np.ndarray, spec: Spec, where: str) -> np.ndarray:
    numeric = values.dtype != object and (np.issubdtype(values.dtype, np.number) or values.dtype == bool)
    if not numeric or np.issubdtype(values.dtype, np.complexfloating):
        raise UserError(f"{where}: input {spec.name!r} must be a numeric array, got dtype {values.dtype}")
    if values.ndim == 0:
        raise UserError(f"{where}: input {spec.name!r} is a scalar; put samples on the first axis")
    if spec.dims is not None:
        check_shape(spec.name, spec.dims, values.shape, f"{where}")
    floating = np.issubdtype(values.dtype, np.floating)
    if floating and not np.issubdtype(spec.dtype, np.floating):
        raise UserError(f"{where}: input {spec.name!r} is {spec.dtype} but the file holds {values.dtype} data")
    if floating and not np.isfinite(values).all():
        raise UserError(f"{where}: input {spec.name!r} holds NaN or infinite values")
    return values.astype(spec.dtype, copy=False)
