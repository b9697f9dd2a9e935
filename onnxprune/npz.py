"""Reading .npz archives of arrays, and checking an array against a model input's shape, with
one-line :class:`UserError` messages that say what to fix (``eval``'s labelled data and
``--calibration``'s unlabelled inputs share them)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from onnxprune.errors import UserError


def read_npz(path: str | Path, example: str, what: str = "data file") -> dict[str, np.ndarray]:
    """Every array in the .npz archive at ``path``, by name. ``example`` shows how to write one
    (``numpy.savez(path, x=inputs, y=labels)``): the errors for a missing file, a single .npy
    array and an unreadable file end with it; ``what`` names the file in them."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist")
    single = UserError(f"{p} is a single .npy array; save the arrays together with {example}")
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise single
        with loaded as archive:
            return {k: archive[k] for k in archive.files}
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{p} is not a readable .npz archive ({exc}); write it with {example}") from None


def check_shape(name: str, dims: tuple[int | None, ...] | list[int | None], shape: tuple[int, ...],
                what: str = "the data") -> None:
    """Raise a UserError unless ``shape`` (samples first) has the rank of the model input
    ``name`` with dimensions ``dims`` and equals it on every fixed axis after the first (the
    model's batch axis may be fixed while the first axis counts samples)."""
    dims = list(dims)
    want = "[" + ", ".join(str(d) if d else "N" if i == 0 else "?" for i, d in enumerate(dims)) + "]"
    if len(dims) != len(shape):
        hint = ""
        if len(dims) == len(shape) + 1:
            hint = " (add the missing axis, e.g. a channel axis with x[:, None])"
        raise UserError(f"the model input {name!r} has rank {len(dims)} {want} but {what} has "
                        f"rank {len(shape)} {list(shape)}{hint}")
    bad = [i for i, d in enumerate(dims) if i > 0 and d and d != shape[i]]
    if bad:
        raise UserError(f"the model input {name!r} expects shape {want} but {what} has shape "
                        f"{list(shape)} (axis {bad[0]} differs)")
