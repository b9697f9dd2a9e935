"""Realistic inputs and task-level fidelity for the third-party models of bench/thirdparty.py.

No photographs or recordings ship with the packages, so the inputs are made here, as close to
each model's real use as numpy and Pillow (a wheel unpacked under build/thirdparty/pylib, not
installed) allow: text lines and document pages rendered with the DejaVu fonts, captcha-like
images, real files' bytes for the file-type classifier, and a synthetic voiced signal for the
voice-activity nets. Each model's fidelity is measured the way its users read its outputs:
decoded text for OCR, matched boxes for detectors, mask IoU for the text-segmentation map,
top-1 agreement for classifiers, and the output cosine everywhere.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

FONTS = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))
LINES = ["Invoice 2024-117 total 349.90", "The quick brown fox jumps", "onnxprune data-free pruning",
         "Room 12B, 3rd floor", "Tel: +44 20 7946 0958", "Batch size 64, lr 0.001"]
CAPTCHAS = ["x7Kp2", "m3Qz8", "B9rT4", "w2Hf6", "J5nD1", "q8Lc3"]
IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


def _pil():
    from PIL import Image, ImageDraw, ImageFont  # the unpacked wheel: see bench/thirdparty.py
    return Image, ImageDraw, ImageFont


def _font(size: int, k: int = 0):
    _, _, ImageFont = _pil()
    return ImageFont.truetype(FONTS[k % len(FONTS)], size) if FONTS else ImageFont.load_default()


def text_line(text: str, height: int, width: int, k: int = 0) -> np.ndarray:
    """A dark text line on a light background, [height, width, 3] uint8, left-aligned like a crop."""
    Image, ImageDraw, _ = _pil()
    font = _font(int(height * 0.62), k)
    probe = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    box = probe.textbbox((0, 0), text, font=font)
    canvas = Image.new("RGB", (box[2] + 8, height), (235 - 6 * k, 232, 228))
    ImageDraw.Draw(canvas).text((4, (height - box[3]) // 2), text, fill=(20 + 5 * k, 20, 30), font=font)
    scale = min(1.0, width / canvas.width)
    canvas = canvas.resize((max(1, int(canvas.width * scale)), height))
    out = Image.new("RGB", (width, height), (235 - 6 * k, 232, 228))
    out.paste(canvas, (0, 0))
    return np.asarray(out)


def page(height: int, width: int, k: int = 0) -> np.ndarray:
    """A document page: a title, paragraphs, a ruled table, a figure box; [h, w, 3] uint8."""
    Image, ImageDraw, _ = _pil()
    img = Image.new("RGB", (width, height), (250, 250, 247))
    d = ImageDraw.Draw(img)
    y = int(height * 0.05)
    d.text((int(width * 0.1), y), "Quarterly Report " + str(2020 + k), fill=(0, 0, 0), font=_font(width // 18, 1))
    y += width // 10
    rng = np.random.default_rng(k)
    for _ in range(4 + k % 2):
        for _ in range(3):
            words = " ".join(LINES[int(i)].split()[0] for i in rng.integers(0, len(LINES), 5))
            d.text((int(width * 0.08), y), words, fill=(30, 30, 30), font=_font(width // 34))
            y += width // 26
        y += width // 40
    x0, x1 = int(width * 0.1), int(width * 0.9)
    for r in range(5):
        d.line([(x0, y + r * width // 24), (x1, y + r * width // 24)], fill=(0, 0, 0), width=1)
        for c in range(4):
            d.text((x0 + c * (x1 - x0) // 4 + 4, y + r * width // 24 + 2), f"{r * 7 + c * 3}.{c}",
                   fill=(0, 0, 0), font=_font(width // 40))
    y += 5 * width // 24 + width // 20
    if y < height - width // 5:
        d.rectangle([x0, y, x0 + width // 3, y + width // 5], outline=(0, 0, 0), fill=(180, 200, 220))
    return np.asarray(img)


def captcha(text: str, height: int, width: int, k: int = 0) -> np.ndarray:
    """Spread, jittered characters on a noisy background, [h, w, 3] uint8."""
    Image, ImageDraw, _ = _pil()
    rng = np.random.default_rng(k)
    base = rng.integers(190, 250, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(base)
    d = ImageDraw.Draw(img)
    step = width // (len(text) + 1)
    for i, ch in enumerate(text):
        d.text((step // 2 + i * step + int(rng.integers(-5, 5)), height // 3 + int(rng.integers(-20, 20))), ch,
               fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=_font(height // 4, i))
    for _ in range(4):
        d.line([tuple(int(v) for v in rng.integers(0, width, 2)), tuple(int(v) for v in rng.integers(0, height, 2))],
               fill=(90, 90, 90), width=1)
    return np.asarray(img)


def chw(img: np.ndarray, mean, std, scale: float = 1 / 255, bgr: bool = False) -> np.ndarray:
    x = img[..., ::-1] if bgr else img
    x = (x.astype(np.float32) * scale - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(np.float32)


def rotate(img: np.ndarray, quarter: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(img, quarter))


def resized(img: np.ndarray, height: int, width: int) -> np.ndarray:
    Image, _, _ = _pil()
    return np.asarray(Image.fromarray(img).resize((width, height)))


# -- inputs per model ----------------------------------------------------------------------------
def ocr_rec_inputs(h=48, w=320):
    return [{"x": chw(text_line(t, h, w, k), 0.5, 0.5, bgr=True)} for k, t in enumerate(LINES)]


def ocr_cls_inputs(h=48, w=192):
    out = []
    for k, t in enumerate(LINES[:4]):
        line = text_line(t, h, w, k)
        out += [{"x": chw(line, 0.5, 0.5, bgr=True)}, {"x": chw(rotate(line, 2), 0.5, 0.5, bgr=True)}]
    return out


def ocr_det_inputs(h=640, w=640):
    return [{"x": chw(page(h, w, k), *IMAGENET, bgr=True)} for k in range(3)]


def orientation_inputs(name="x"):
    return [{name: chw(resized(rotate(page(448, 448, k), q), 224, 224), *IMAGENET)} for k in range(2) for q in range(4)]


def layout_inputs():
    return [{"image": chw(page(800, 608, k), *IMAGENET)} for k in range(3)]


def ddddocr_inputs(w=200):
    out = []
    for k, t in enumerate(CAPTCHAS):
        gray = captcha(t, 64, w, k).mean(axis=2, dtype=np.float32)
        out.append({"input1": ((gray / 255.0 - 0.5) / 0.5)[None, None].astype(np.float32)})
    return out


def ddddocr_det_inputs():
    return [{"images": captcha(t, 416, 416, k).astype(np.float32).transpose(2, 0, 1)[None].copy()}
            for k, t in enumerate(CAPTCHAS[:4])]


def yolov8_inputs(size=320):
    out = []
    for k in range(3):
        img = page(size * 2, size * 2, k).copy()
        img[size // 2: size, size // 3: size] = captcha("ab", size - size // 2, size - size // 3, k)
        out.append({"images": chw(resized(img, size, size), 0.0, 1.0)})
    return out


def magika_inputs():
    """Real files' bytes as Magika v3 reads them: the first and the last 1024 bytes after stripping
    whitespace, padded with token 256."""
    roots = [Path(np.__file__).parent, Path(os.__file__).parent, Path("/usr/share/fonts"), Path("/etc")]
    picked, seen = [], set()
    for root in roots:
        for p in sorted(root.rglob("*"))[:4000]:
            if p.is_file() and p.suffix not in seen and p.stat().st_size > 200:
                seen.add(p.suffix)
                picked.append(p)
            if len(picked) >= 24:
                break
    rows = []
    for p in picked:
        data = p.read_bytes()[:65536].strip()
        beg = np.full(1024, 256, np.int32)
        end = np.full(1024, 256, np.int32)
        head, tail = np.frombuffer(data[:1024], np.uint8), np.frombuffer(data[-1024:], np.uint8)
        beg[:len(head)] = head
        end[1024 - len(tail):] = tail
        rows.append({"bytes": np.concatenate([beg, end])[None]})
    return rows


def vad_inputs(names: tuple[str, ...], chunk: int = 576, batch_state: bool = True):
    """Chunks of a synthetic voiced signal (a 140 Hz glottal pulse train through two formant
    resonances, syllable envelope) and of background noise, at 16 kHz, with a zero state."""
    rng = np.random.default_rng(0)
    t = np.arange(chunk) / 16000
    out = []
    for k in range(6):
        if k % 2 == 0:
            f0 = 120 + 20 * k
            voiced = sum(np.sin(2 * np.pi * f0 * h * t) / h * (1.0 + 2.0 * np.exp(-((f0 * h - 700) / 200) ** 2))
                         for h in range(1, 30))
            x = 0.3 * voiced / np.abs(voiced).max() + 0.005 * rng.normal(size=chunk)
        else:
            x = 0.02 * rng.normal(size=chunk)
        feed = {names[0]: x.astype(np.float32)[None]}
        if "state" in names:
            feed["state"] = np.zeros((2, 1, 128), np.float32)
        if "sr" in names:
            feed["sr"] = np.array(16000, np.int64)
        out.append(feed)
    return out


# -- task-level comparison ------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def ctc_greedy(probs: np.ndarray) -> tuple[int, ...]:
    idx = probs.argmax(-1).ravel() if probs.ndim >= 2 else probs.ravel()
    out, last = [], -1
    for i in idx.tolist():
        if i != last and i != 0:
            out.append(i)
        last = i
    return tuple(out)


def edit_distance(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, thr: float = 0.45):
    order, keep = np.argsort(-scores), []
    for i in order:
        if all(labels[i] != labels[j] or iou(boxes[i], boxes[j]) < thr for j in keep):
            keep.append(i)
    return [(boxes[i], int(labels[i])) for i in keep[:300]]


def matched(ref: list, got: list, thr: float = 0.5) -> int:
    used, hits = set(), 0
    for box, label in ref:
        best = max(((iou(box, b), j) for j, (b, lab) in enumerate(got) if lab == label and j not in used),
                   default=(0.0, -1))
        if best[0] >= thr:
            used.add(best[1])
            hits += 1
    return hits


def yolov8_boxes(out: np.ndarray, conf: float = 0.25):
    p = out[0].T  # [anchors, 4 + classes]
    scores, labels = p[:, 4:].max(1), p[:, 4:].argmax(1)
    sel = scores > conf
    cx, cy, w, h = p[sel, :4].T
    return nms(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), scores[sel], labels[sel])


def yolox_boxes(out: np.ndarray, size: int = 416, conf: float = 0.1):
    grids, strides = [], []
    for s in (8, 16, 32):
        n = size // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xv, yv], 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    g, s = np.concatenate(grids), np.concatenate(strides)
    p = out[0].astype(np.float64)
    xy, wh = (p[:, :2] + g) * s, np.exp(np.clip(p[:, 2:4], -10, 10)) * s
    scores = p[:, 4] * p[:, 5:].max(1)
    sel = scores > conf
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[sel]
    return nms(boxes, scores[sel], p[sel, 5:].argmax(1))


def picodet_boxes(outs: list[np.ndarray], size=(800, 608), conf: float = 0.5):
    """PicoDet's four levels: class scores [1, n, 10] and distance bins [1, n, 4 * 8]."""
    boxes, scores, labels = [], [], []
    for level, stride in enumerate((8, 16, 32, 64)):
        sc, reg = outs[level][0], outs[level + 4][0]
        h, w = -(-size[0] // stride), -(-size[1] // stride)
        yv, xv = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        centers = (np.stack([xv, yv], 2).reshape(-1, 2) + 0.5) * stride
        bins = reg.reshape(-1, 4, 8)
        bins = np.exp(bins - bins.max(-1, keepdims=True))
        dist = (bins / bins.sum(-1, keepdims=True) @ np.arange(8)) * stride
        sel = sc.max(1) > conf
        boxes.append(np.concatenate([centers - dist[:, :2], centers + dist[:, 2:]], 1)[sel])
        scores.append(sc.max(1)[sel])
        labels.append(sc.argmax(1)[sel])
    return nms(np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels), 0.5)


# -- calibration sets: unlabelled inputs of the same kind, none of them one the fidelity is read on --
#: Words the calibration text is drawn from (the evaluation lines are LINES: fresh lines, the same kind of text).
WORDS = ("Order Receipt Account Total Amount Date Street Road Phone Email Paid Due Net Tax Qty Unit Price Item "
         "Code Ref Page Section Table Figure Model Data Layer Channel Report North South Station Office Hotel "
         "Ticket Seat Gate Flight Train Delivery Customer Service Number Balance Credit Card Name City").split()
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"


def calibration_line(rng: np.random.Generator) -> str:
    parts = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(2, 5)))]
    parts.insert(int(rng.integers(0, len(parts) + 1)), str(rng.integers(1, 99999)))
    return " ".join(parts)


def _stack(feeds: list[dict]) -> dict[str, np.ndarray]:
    """Single-sample feeds ([1, ...] each) as one array per input, samples on the first axis."""
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


# The images first (uint8 [h, w, 3], as a user's files would hold them), then the arrays the
# model takes: bench/thirdparty.py --from-images writes the images as PNG files and builds the
# arrays with `onnxprune calib` and the flags of CALIBRATION_IMAGES instead.
def ocr_rec_calibration_images(count: int, h=48, w=320):
    rng = np.random.default_rng(1000)
    return [text_line(calibration_line(rng), h, w, k % 6) for k in range(count)]


def ocr_rec_calibration(count: int, h=48, w=320):
    return _stack([{"x": chw(img, 0.5, 0.5, bgr=True)} for img in ocr_rec_calibration_images(count, h, w)])


def ocr_cls_calibration_images(count: int, h=48, w=192):
    rng = np.random.default_rng(1001)
    lines = [text_line(calibration_line(rng), h, w, k % 6) for k in range(count)]
    return [rotate(line, 2 * (k % 2)) for k, line in enumerate(lines)]


def ocr_cls_calibration(count: int, h=48, w=192):
    return _stack([{"x": chw(img, 0.5, 0.5, bgr=True)} for img in ocr_cls_calibration_images(count, h, w)])


def orientation_calibration_images(count: int):
    return [rotate(page(448, 448, 100 + k), k % 4) for k in range(count)]


def orientation_calibration(count: int, name="x"):
    return _stack([{name: chw(resized(img, 224, 224), *IMAGENET)} for img in orientation_calibration_images(count)])


def ocr_det_calibration_images(count: int, h=640, w=640):
    return [page(h, w, 100 + k) for k in range(count)]


def ocr_det_calibration(count: int, h=640, w=640):
    return _stack([{"x": chw(img, *IMAGENET, bgr=True)} for img in ocr_det_calibration_images(count, h, w)])


def layout_calibration_images(count: int):
    return [page(800, 608, 100 + k) for k in range(count)]


def layout_calibration(count: int):
    return _stack([{"image": chw(img, *IMAGENET)} for img in layout_calibration_images(count)])


def _captcha_text(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(ALPHABET), 5))


def ddddocr_calibration_images(count: int, w=200):
    rng = np.random.default_rng(1002)
    return [captcha(_captcha_text(rng), 64, w, 100 + k) for k in range(count)]


def ddddocr_calibration(count: int, w=200):
    out = []
    for img in ddddocr_calibration_images(count, w):
        gray = img.mean(axis=2, dtype=np.float32)
        out.append({"input1": ((gray / 255.0 - 0.5) / 0.5)[None, None].astype(np.float32)})
    return _stack(out)


def ddddocr_det_calibration_images(count: int):
    rng = np.random.default_rng(1003)
    return [captcha(_captcha_text(rng), 416, 416, 100 + k) for k in range(count)]


def ddddocr_det_calibration(count: int):
    return _stack([{"images": img.astype(np.float32).transpose(2, 0, 1)[None]}
                   for img in ddddocr_det_calibration_images(count)])


def yolov8_calibration_images(count: int, size=320):
    out = []
    for k in range(count):
        img = page(size * 2, size * 2, 100 + k).copy()
        img[size // 2: size, size // 3: size] = captcha("cd", size - size // 2, size - size // 3, 100 + k)
        out.append(img)
    return out


def yolov8_calibration(count: int, size=320):
    return _stack([{"images": chw(resized(img, size, size), 0.0, 1.0)} for img in yolov8_calibration_images(count, size)])


CALIBRATION = {ocr_rec_inputs: ocr_rec_calibration, ocr_cls_inputs: ocr_cls_calibration,
               orientation_inputs: orientation_calibration, ocr_det_inputs: ocr_det_calibration,
               layout_inputs: layout_calibration, ddddocr_inputs: ddddocr_calibration,
               ddddocr_det_inputs: ddddocr_det_calibration, yolov8_inputs: yolov8_calibration}
#: The same sets as image files: their images, and the `onnxprune calib` flags that make of
#: them what each model takes (its preprocessing, as its package documents it).
CALIBRATION_IMAGES = {
    ocr_rec_inputs: (ocr_rec_calibration_images, ["--size", "48,320", "--norm", "pm1", "--channels", "bgr"]),
    ocr_cls_inputs: (ocr_cls_calibration_images, ["--size", "48,192", "--norm", "pm1", "--channels", "bgr"]),
    orientation_inputs: (orientation_calibration_images, ["--size", "224,224", "--norm", "imagenet"]),
    ocr_det_inputs: (ocr_det_calibration_images, ["--size", "640,640", "--norm", "imagenet", "--channels", "bgr"]),
    layout_inputs: (layout_calibration_images, ["--size", "800,608", "--norm", "imagenet"]),
    ddddocr_inputs: (ddddocr_calibration_images, ["--size", "64,200", "--norm", "pm1", "--channels", "gray"]),
    ddddocr_det_inputs: (ddddocr_det_calibration_images, ["--size", "416,416", "--norm", "raw"]),
    yolov8_inputs: (yolov8_calibration_images, ["--size", "320,320", "--norm", "unit"]),
}
