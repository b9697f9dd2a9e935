"""Calibration sets from image files (``onnxprune calib``): decode, resize, normalise, stack.

A deployer who has a few production images but not the model's training code should not have
to write the ``--calibration`` archive by hand. :func:`build` turns image files into the array
one image input of the model takes, samples on the first axis:

1. **decode** (Pillow, for PNG, JPEG and the like; ``.npy`` arrays ``[H, W]`` or ``[H, W, C]``
   without it) into pixel values, colour converted to what the input takes (RGB, BGR, gray);
2. **resize** to the input's height and width: stretched, or (``fit="pad"``) scaled to fit
   with the aspect ratio kept, placed top-left and padded with ``pad_value`` (a text line
   cropped for an OCR recogniser, a page for a layout model). The filter is an antialiased
   bilinear one, separable, in numpy: the same numbers with or without Pillow, whatever its
   version;
3. **normalise**: ``(pixel * scale - mean) / std``, per channel;
4. **lay out** as the input wants (channels first or last) and cast to its type.

Files are shuffled (seeded) before the first ``limit`` are taken, because
``--calibration`` holds out the *last* quarter for the fidelity check: sorted files from
class folders would hold out one class.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.errors import UserError, first_line

#: Suffixes a folder is searched for (any file named on the command line is tried whatever it
#: is called).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            ".pbm", ".npy"})
PILLOW_HINT = "pip install pillow (or pip install 'onnxprune[images]')"


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes one sample of the input."""

    height: int
    width: int
    channels: str = "rgb"     # "rgb", "bgr" or "gray"
    layout: str = "nchw"      # "nchw", "nhwc", or "nhw" (a gray input without a channel axis)
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    fit: str = "stretch"      # "stretch" or "pad"
    pad_value: float = 0.0    # a pixel value, before normalisation


def depth(channels: str) -> int:
    """Channels a sample has in ``channels`` order ("rgb", "bgr" or "gray")."""
    return 1 if channels == "gray" else 3


@dataclass(frozen=True)
class InputLayout:
    """What the model's image input says about itself: layout, depth and size where fixed."""

    layout: str
    depth: int | None
    height: int | None
    width: int | None


def input_layout(name: str, dims: Sequence[int | None] | None, layout: str | None = None) -> InputLayout:
    """Where the channel axis of input ``name`` is (``layout`` overrides a guess: channels
    first unless only the last axis holds 1 or 3), its depth and its fixed height and width."""
    if dims is None:
        raise UserError(f"the model input {name!r} declares no shape; onnxprune calib cannot tell how to lay "
                        "the images out (write the .npz yourself: numpy.savez(path, **{input_name: samples}))")
    dims = list(dims)
    if len(dims) == 3:
        if layout not in (None, "nhw"):
            raise UserError(f"the model input {name!r} has rank 3 {_shown(dims)}: a gray image without a channel "
                            f"axis, not {layout}")
        return InputLayout("nhw", 1, dims[1], dims[2])
    if len(dims) != 4:
        raise UserError(f"the model input {name!r} has rank {len(dims)} {_shown(dims)}; onnxprune calib builds "
                        "image inputs of rank 4 ([N, C, H, W] or [N, H, W, C]) or 3 ([N, H, W])")
    if layout == "nhw":
        raise UserError(f"the model input {name!r} has rank 4 {_shown(dims)}; --layout nhw is for rank 3")
    if layout is None:
        first, last = dims[1] in (1, 3), dims[3] in (1, 3)
        layout = "nhwc" if last and not first else "nchw"
    if layout == "nchw":
        return InputLayout(layout, dims[1], dims[2], dims[3])
    return InputLayout(layout, dims[3], dims[1], dims[2])


def _shown(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def collect(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and those under each folder named (recursively, by suffix: see
    :data:`IMAGE_SUFFIXES`), each once, sorted within its folder."""
    found, seen = [], set()
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UserError(f"{p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif p.is_file():
            inside = [p]
        else:
            raise UserError(f"{p} does not exist")
        for f in inside:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    if not found:
        raise UserError("no image files given")
    return found


def read_image(path: Path, channels: str) -> np.ndarray:
    """The image at ``path`` as float32 pixels ``[H, W, depth]`` in ``channels`` order; a
    UserError (for the caller to skip or report) when it cannot be read."""
    if path.suffix.lower() == ".npy":
        try:
            img = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{path}: not a readable .npy array ({exc})") from None
        if img.ndim == 2:
            img = img[..., None]
        if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or not np.issubdtype(img.dtype, np.number) \
                or np.issubdtype(img.dtype, np.complexfloating):
            raise UserError(f"{path}: a .npy image must be a numeric [H, W] or [H, W, 1|3|4] array, "
                            f"got {img.dtype} {list(img.shape)}")
        img = img[..., :3].astype(np.float32)
        if not np.isfinite(img).all():
            raise UserError(f"{path}: holds NaN or infinite values")
    else:
        img = _decode(path)
    if channels == "gray":
        if img.shape[2] == 3:  # ITU-R 601 luma, as Pillow's "L" conversion
            img = img @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
        return img
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img[..., ::-1] if channels == "bgr" else img


def _decode(path: Path) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError(f"reading {path.suffix or 'image'} files needs Pillow: {PILLOW_HINT} "
                        "(or save the images as .npy arrays)") from None
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # deep gray: its own values
                arr = np.asarray(im, dtype=np.float32)[..., None]
            elif im.mode in ("L", "1"):
                arr = np.asarray(im.convert("L"), dtype=np.float32)[..., None]
            else:  # palette, alpha, CMYK, YCbCr...: RGB
                arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: not an image Pillow can read ({first_line(exc)})") from None
    return arr


def _filter(size_in: int, size_out: int) -> np.ndarray:
    """The ``[out, in]`` weights of an antialiased bilinear resize along one axis: a triangle
    as wide as the scale when shrinking (every input pixel counts), one pixel when growing;
    pixel centres aligned (``(i + 0.5) * in / out``)."""
    scale = size_in / size_out
    support = max(scale, 1.0)
    centres = (np.arange(size_out) + 0.5) * scale
    taps = np.arange(size_in) + 0.5
    w = np.clip(1.0 - np.abs(taps[None, :] - centres[:, None]) / support, 0.0, None)
    total = w.sum(axis=1, keepdims=True)
    nearest = np.clip(np.floor(centres).astype(int), 0, size_in - 1)
    empty = total[:, 0] == 0  # cannot happen with these supports; kept exact if it does
    w[empty, nearest[empty]] = 1.0
    total[empty] = 1.0
    return (w / total).astype(np.float32)


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``img`` [H, W, C] resized to ``[height, width, C]`` (see :func:`_filter`)."""
    h, w, c = img.shape
    if (h, w) == (height, width):
        return img
    rows, cols = _filter(h, height), _filter(w, width)
    out = np.einsum("oh,hwc->owc", rows, img, optimize=True)
    return np.einsum("pw,owc->opc", cols, out, optimize=True)


def fitted(img: np.ndarray, pre: Preprocess) -> np.ndarray:
    """``img`` at the input's size: stretched, or scaled to fit (aspect kept), top-left, padded."""
    if pre.fit == "stretch":
        return resize(img, pre.height, pre.width)
    h, w, c = img.shape
    s = min(pre.height / h, pre.width / w)
    nh, nw = max(1, min(pre.height, round(h * s))), max(1, min(pre.width, round(w * s)))
    out = np.full((pre.height, pre.width, c), pre.pad_value, np.float32)
    out[:nh, :nw] = resize(img, nh, nw)
    return out


def normalised(img: np.ndarray, pre: Preprocess) -> np.ndarray:
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    return (img * np.float32(pre.scale) - mean) / std


def sample(img: np.ndarray, pre: Preprocess) -> np.ndarray:
    """One decoded image as one sample of the input (no sample axis)."""
    x = normalised(fitted(img, pre), pre)
    if pre.layout == "nchw":
        return np.ascontiguousarray(x.transpose(2, 0, 1))
    if pre.layout == "nhw":
        return x[..., 0]
    return x


@dataclass
class Built:
    """The stacked samples, the files they came from, in order, and the files skipped (why)."""

    array: np.ndarray
    used: list[Path]
    skipped: list[tuple[Path, str]]


def build(files: Sequence[Path], pre: Preprocess, dtype: np.dtype, limit: int,
          seed: int | None = 0, progress=None) -> Built:
    """Up to ``limit`` of ``files`` (shuffled with ``seed``; None keeps their order) as one
    array ``[N, ...]`` of ``dtype``; unreadable files are skipped and listed; a UserError when
    none is left. Integer inputs take the values rounded and clipped to the type's range."""
    order = list(files)
    if seed is not None:
        order = [order[k] for k in np.random.default_rng(seed).permutation(len(order))]
    samples, used, skipped = [], [], []
    for path in order:
        if len(samples) >= limit:
            break
        try:
            samples.append(sample(read_image(path, pre.channels), pre))
            used.append(path)
        except UserError as exc:
            if "needs Pillow" in str(exc):
                raise
            skipped.append((path, str(exc)))
        if progress is not None:
            progress(len(samples) + len(skipped), min(len(order), limit + len(skipped)))
    if not samples:
        first = f": {skipped[0][1]}" if skipped else ""
        raise UserError(f"none of the {len(order)} files could be read{first}")
    x = np.stack(samples)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    elif dtype == np.bool_:
        x = x != 0
    return Built(x.astype(dtype), used, skipped)


def per_channel(values: str, depth: int, what: str) -> tuple[float, ...]:
    """``--mean``/``--std`` text: one number for every channel, or one per channel."""
    try:
        found = tuple(float(v) for v in values.split(","))
    except ValueError:
        raise UserError(f"{what}: expected comma-separated numbers, got '{values}'") from None
    if len(found) not in (1, depth):
        raise UserError(f"{what}: expected 1 or {depth} values for a {depth}-channel input, got {len(found)}")
    if not all(math.isfinite(v) for v in found):
        raise UserError(f"{what}: expected finite numbers, got '{values}'")
    return found
