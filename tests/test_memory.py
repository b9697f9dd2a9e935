"""What keeps a large model's memory down: corrections that keep only the slices they change."""

import numpy as np

from onnxprune.plan import Corrections


class _Const:
    def __init__(self, values):
        self.name, self.values = "w", values


def test_corrections_keep_the_slices_that_changed_only():
    w = _Const(np.arange(24, dtype=np.float32).reshape(4, 6))
    w.values[1, 2] = -0.0
    corrections = Corrections()
    new = w.values.copy()
    new[:, 4] += 1
    new[1, 2] = 0.0  # a sign bit is a change: the rewrite writes what was computed, bit for bit
    corrections.write(w, new, axis=1)
    patch = corrections.patches["w"]
    assert patch.axis == 1 and patch.index.tolist() == [2, 4] and patch.values.shape == (4, 2)
    assert corrections.read(w).tobytes() == new.tobytes()
    corrections.write(w, w.values.copy(), axis=1)
    assert not corrections and corrections.read(w) is w.values
    corrections.write(w, new.astype(np.float64))  # another type: kept whole
    assert corrections.patches["w"].axis is None and corrections.read(w).dtype == np.float64
