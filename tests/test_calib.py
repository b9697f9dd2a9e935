"""onnxprune calib: image files become a --calibration set laid out, sized and normalised as the
model's input takes them; what it writes is what --calibration reads; every bad input is one
line and exit 2 with nothing written."""

import nets
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxprune.cli import main
from onnxprune.images import Preprocess, resize, sample


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _identity_model(path, shape, dtype=TensorProto.FLOAT, inputs=("x",)):
    """A model that hands its input back: float[shape] x => y (several inputs: one output each)."""
    nodes = [helper.make_node("Identity", [n], [f"y{k}"]) for k, n in enumerate(inputs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, dtype, shape) for n in inputs],
                              [helper.make_tensor_value_info(f"y{k}", dtype, shape) for k in range(len(inputs))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _images(folder, sizes, seed=0, mode="RGB"):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = []
    for k, (h, w) in enumerate(sizes):
        depth = (3,) if mode == "RGB" else ()
        img = rng.integers(0, 256, (h, w, *depth), dtype=np.uint8)
        Image.fromarray(img, mode).save(folder / f"img{k:02d}.png")
        pixels.append(img.astype(np.float32))
    return pixels


def test_a_folder_of_images_becomes_the_inputs_nchw_samples(capsys, tmp_path):
    model = _identity_model(tmp_path / "m.onnx", [1, 3, 12, 16])
    pixels = _images(tmp_path / "imgs", [(24, 32), (12, 16), (30, 20)])
    out = tmp_path / "cal.npz"
    code, stdout, stderr = run(capsys, "calib", model, tmp_path / "imgs", "-o", out, "--no-shuffle",
                               "--norm", "imagenet")
    assert code == 0, stderr
    x = np.load(out)["x"]
    assert x.shape == (3, 3, 12, 16) and x.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for got, img in zip(x, pixels):
        ref = np.stack([np.asarray(Image.fromarray(img[..., c], "F").resize((16, 12), Image.BILINEAR))
                        for c in range(3)], axis=-1)  # Pillow's bilinear, channel by channel
        want = ((ref / 255 - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert "3 of 3 found" in stdout and "the last 1 held out" in stdout


def test_nhwc_gray_bgr_and_per_channel_normalisation(capsys, tmp_path):
    pixels = _images(tmp_path / "imgs", [(8, 8)] * 4)
    nhwc = _identity_model(tmp_path / "nhwc.onnx", ["N", 8, 8, 3])
    out = tmp_path / "a.npz"
    code, _, stderr = run(capsys, "calib", nhwc, tmp_path / "imgs", "-o", out, "--no-shuffle", "--channels", "bgr",
                          "--scale", "1", "--mean", "10,20,30", "--std", "2")
    assert code == 0, stderr
    np.testing.assert_allclose(np.load(out)["x"], (np.stack(pixels)[..., ::-1] - [10, 20, 30]) / 2, atol=1e-4)
    gray = _identity_model(tmp_path / "gray.onnx", ["N", 1, 8, 8])
    code, _, stderr = run(capsys, "calib", gray, tmp_path / "imgs", "-o", out, "--no-shuffle", "--norm", "pm1")
    assert code == 0, stderr
    luma = np.stack(pixels) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(np.load(out)["x"][:, 0], (luma / 255 - 0.5) / 0.5, atol=1e-4)


def test_text_lines_keep_their_aspect_and_are_padded_to_the_width(capsys, tmp_path):
    """An OCR recogniser's dynamic width: --size fixes it, --fit pad scales by height."""
    model = _identity_model(tmp_path / "rec.onnx", ["N", 3, 48, "W"])
    _images(tmp_path / "imgs", [(24, 60), (96, 1000)])
    out = tmp_path / "rec.npz"
    code, _, stderr = run(capsys, "calib", model, tmp_path / "imgs", "-o", out, "--no-shuffle", "--size", "48,320",
                          "--fit", "pad", "--pad-value", "127.5", "--norm", "pm1")
    assert code == 0, stderr
    x = np.load(out)["x"]
    assert x.shape == (2, 3, 48, 320)
    assert np.all(x[0, :, :, 120:] == 0) and np.any(x[0, :, :, 119] != 0)  # 24x60 -> 48x120, padded with 0
    assert np.any(x[1, :, :, -1] != 0) and np.all(x[1, :, 31:] == 0)  # 96x1000 -> 31x320 (width-bound)


def test_npy_images_and_integer_inputs(capsys, tmp_path):
    folder = tmp_path / "arrays"
    folder.mkdir()
    rng = np.random.default_rng(1)
    frames = [rng.uniform(0, 255, (10, 10)) for _ in range(3)]
    for k, f in enumerate(frames):
        np.save(folder / f"f{k}.npy", f)
    model = _identity_model(tmp_path / "u8.onnx", ["N", 1, 5, 5], dtype=TensorProto.UINT8)
    out = tmp_path / "u8.npz"
    code, _, stderr = run(capsys, "calib", model, folder, "-o", out, "--no-shuffle")
    assert code == 0, stderr
    x = np.load(out)["x"]
    assert x.dtype == np.uint8 and x.shape == (3, 1, 5, 5)
    want = np.stack([np.clip(np.rint(resize(f[..., None].astype(np.float32), 5, 5)[..., 0]), 0, 255) for f in frames])
    np.testing.assert_array_equal(x[:, 0], want)


def test_shuffled_by_default_and_limited(capsys, tmp_path):
    model = _identity_model(tmp_path / "m.onnx", [1, 1, 4, 4])
    folder = tmp_path / "flat"
    folder.mkdir()
    for k in range(12):
        np.save(folder / f"{k:02d}.npy", np.full((4, 4), float(k)))
    out = tmp_path / "c.npz"
    assert run(capsys, "calib", model, folder, "-o", out, "--limit", "8", "--scale", "1")[0] == 0
    taken = np.load(out)["x"][:, 0, 0, 0]
    assert len(taken) == 8 and len(set(taken)) == 8 and list(taken) != sorted(taken)
    assert run(capsys, "calib", model, folder, "-o", out, "--limit", "8", "--scale", "1")[0] == 0
    np.testing.assert_array_equal(np.load(out)["x"][:, 0, 0, 0], taken)  # seeded
    assert run(capsys, "calib", model, folder, "-o", out, "--no-shuffle", "--scale", "1")[0] == 0
    assert list(np.load(out)["x"][:, 0, 0, 0]) == list(range(12))


def test_what_calib_writes_is_what_prune_reads(capsys, tmp_path):
    """End to end on a BatchNorm ResNet: images -> calib -> prune --calibration."""
    model = tmp_path / "resnet.onnx"
    onnx.save(nets.resnet(), str(model))  # float[1,3,8,8]
    _images(tmp_path / "imgs", [(16, 16)] * 12, seed=2)
    cal, out = tmp_path / "cal.npz", tmp_path / "out.onnx"
    assert run(capsys, "calib", model, tmp_path / "imgs", "-o", cal)[0] == 0
    code, stdout, stderr = run(capsys, model, out, "--ratio", "0.4", "--method", "paoding", "--calibration", cal)
    assert code == 0, stderr
    assert "held-out calibration inputs" in stdout and out.exists()


def test_the_preprocessing_is_one_sample_at_a_time():
    pre = Preprocess(4, 6, channels="rgb", layout="nhwc", scale=0.5, mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 2.0))
    img = np.arange(4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)
    np.testing.assert_allclose(sample(img, pre), (img * 0.5 - [1, 2, 3]) / [1, 1, 2])


def _bad_cases(tmp_path):
    images = tmp_path / "imgs"
    _images(images, [(8, 8)] * 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("not a png")
    m = _identity_model(tmp_path / "m.onnx", [1, 3, 8, 8])
    return images, empty, junk, m


@pytest.mark.parametrize("case, message", [
    ("two_inputs", "2 inputs"),
    ("dynamic", "give --size H,W"),
    ("rank2", "rank 2"),
    ("no_files", "does not exist"),
    ("empty_folder", "holds no image files"),
    ("all_unreadable", "none of the 1 files could be read"),
    ("gray_for_rgb", "takes 3"),
    ("over_the_model", "would overwrite"),
    ("integer_norm", "its pixels go in as they are"),
    ("mean_count", "expected 1 or 3 values"),
    ("zero_std", "--std nonzero"),
    ("size_differs", "differs from the input"),
    ("bad_size", "expected H,W"),
    ("not_a_model", "not an ONNX model"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, case, message):
    images, empty, junk, m = _bad_cases(tmp_path)
    out = tmp_path / "out.npz"
    argv = {
        "two_inputs": [_identity_model(tmp_path / "two.onnx", [1, 3, 8, 8], inputs=("a", "b")), images],
        "dynamic": [_identity_model(tmp_path / "d.onnx", ["N", 3, "H", "W"]), images],
        "rank2": [_identity_model(tmp_path / "r2.onnx", [1, 64]), images],
        "no_files": [m, tmp_path / "missing"],
        "empty_folder": [m, empty],
        "all_unreadable": [m, junk],
        "gray_for_rgb": [m, images, "--channels", "gray"],
        "over_the_model": [m, images, "-o", m],
        "integer_norm": [_identity_model(tmp_path / "u8.onnx", [1, 3, 8, 8], TensorProto.UINT8), images, "--norm", "imagenet"],
        "mean_count": [m, images, "--mean", "1,2"],
        "zero_std": [m, images, "--std", "0"],
        "size_differs": [m, images, "--size", "9,9"],
        "bad_size": [m, images, "--size", "9"],
        "not_a_model": [images / "img00.png", images],
    }[case]
    if "-o" not in argv:
        argv = [*argv, "-o", out]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, stderr = run(capsys, "calib", *argv)
    assert code == 2 and not stdout, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing left behind
