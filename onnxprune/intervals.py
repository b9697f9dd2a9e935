"""Interval propagation of an ablation's output deviation (paoding-dl's robustness measure).

Removing unit ``u`` changes what its consumers read by a deviation ``delta`` in a box
``[-k*sd, k*sd]`` (``sd`` the deviation the compensation leaves, from the data-free moments).
That box is pushed, per channel and spatial position, to the output layer with sound
interval rules: affine layers split a box into centre and radius (``W c``, ``|W| r``), ReLU's
deviation lies in ``[min(0, lo), max(0, hi)]``, a max pool's between the window's extremes,
and other activations are bounded by their Lipschitz constant. The result is an interval per
output unit; its total width and the entropy of how the width spreads are SRDFP's robustness
objective. Only deviations are propagated (everything else cancels), so one pass per candidate
costs about one forward pass of the layers after the ablation.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)

_LIPSCHITZ = {"Relu": 1.0, "LeakyRelu": 1.0, "Sigmoid": 0.25, "Tanh": 1.0, "HardSigmoid": 0.2,
              "HardSwish": 1.5, "Gelu": 1.13, "Elu": 1.0, "Softplus": 1.0, "Identity": 1.0, "Dropout": 1.0}


class Unsupported(Exception):
    """An op on the path to the output without an interval rule."""


def _conv(x: np.ndarray, w: np.ndarray, node: gs.Node) -> np.ndarray:
    """Plain NCHW convolution (no bias) with numpy, enough for deviation boxes."""
    a = node.attrs
    group = int(a.get("group", 1))
    strides = list(a.get("strides", [1, 1]))
    dil = list(a.get("dilations", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or dil != [1, 1]:
        raise Unsupported("Conv with auto_pad or dilation")
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    n, c = x.shape[:2]
    per_in, per_out = c // group, w.shape[0] // group
    outs = []
    for g in range(group):
        xs = win[:, g * per_in:(g + 1) * per_in]
        ws = w[g * per_out:(g + 1) * per_out]
        outs.append(np.einsum("nchwij,ocij->nohw", xs, ws, optimize=True))
    return np.concatenate(outs, axis=1)


def _pool(x: np.ndarray, node: gs.Node, reduce) -> np.ndarray:
    a = node.attrs
    kh, kw = a["kernel_shape"]
    strides = list(a.get("strides", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    return reduce(win, axis=(-2, -1))


class DeviationIntervals:
    """Propagates deviation boxes through a lowered graph (batched: one box per row)."""

    def __init__(self, graph: gs.Graph, output: str, shapes: dict[str, tuple[int, ...]]):
        self.graph = graph
        self.output = output
        self.shapes = shapes

    def propagate(self, start: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """``start``: tensor name -> (lo, hi) deviation boxes [R, ...]; returns the output's."""
        boxes = dict(start)
        for node in self.graph.nodes:
            if not any(isinstance(t, gs.Variable) and t.name in boxes for t in node.inputs):
                continue
            boxes[node.outputs[0].name] = self._rule(node, boxes)
            if node.outputs[0].name == self.output:
                break
        if self.output not in boxes:
            raise Unsupported("the ablation does not reach the output")
        return boxes[self.output]

    def _rule(self, node: gs.Node, boxes):
        op = node.op
        ins = [boxes.get(t.name) if isinstance(t, gs.Variable) else None for t in node.inputs]
        lo, hi = ins[0] if ins[0] is not None else (None, None)

        def affine(fn):
            c, r = (lo + hi) / 2, (hi - lo) / 2
            return fn(c, False) - fn(r, True), fn(c, False) + fn(r, True)

        if op == "Conv":
            w = np.asarray(node.inputs[1].values, np.float64)
            return affine(lambda v, absolute: _conv(v, np.abs(w) if absolute else w, node))
        if op in ("Gemm", "MatMul"):
            w = np.asarray(node.inputs[1].values, np.float64)
            if op == "Gemm":
                w = (w.T if node.attrs.get("transB", 0) else w) * float(node.attrs.get("alpha", 1.0))
            return affine(lambda v, absolute: v @ (np.abs(w) if absolute else w))
        if op == "BatchNormalization":
            g, _, _, var = (np.asarray(t.values, np.float64) for t in node.inputs[1:5])
            s = (g / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))).reshape(1, -1, *([1] * (lo.ndim - 2)))
            return np.minimum(lo * s, hi * s), np.maximum(lo * s, hi * s)
        if op in _LIPSCHITZ:
            k = _LIPSCHITZ[op]
            if op in ("Identity", "Dropout"):
                return lo, hi
            return k * np.minimum(lo, 0), k * np.maximum(hi, 0)
        if op in ("Add", "Sum", "Sub"):
            boxes_in = [b for b in ins if b is not None]
            if op == "Sub" and ins[1] is not None:
                boxes_in[-1] = (-ins[1][1], -ins[1][0])
            los = [b[0] for b in boxes_in]
            his = [b[1] for b in boxes_in]
            return sum(los), sum(his)
        if op == "Mul":
            other = node.inputs[1] if ins[0] is not None else node.inputs[0]
            if ins[0] is not None and ins[1] is not None:
                raise Unsupported("Mul of two deviating tensors")
            box = ins[0] if ins[0] is not None else ins[1]
            if isinstance(other, gs.Constant):
                k = np.asarray(other.values, np.float64)
                return np.minimum(box[0] * k, box[1] * k), np.maximum(box[0] * k, box[1] * k)
            # a gate in [0, 1] (sigmoid-like): the deviation shrinks toward 0
            return np.minimum(box[0], 0), np.maximum(box[1], 0)
        if op == "Div" and isinstance(node.inputs[1], gs.Constant):
            k = 1 / np.asarray(node.inputs[1].values, np.float64)
            return np.minimum(lo * k, hi * k), np.maximum(lo * k, hi * k)
        if op == "MaxPool":
            return -_pool(-lo, node, np.max), _pool(hi, node, np.max)
        if op == "AveragePool":
            return _pool(lo, node, np.mean), _pool(hi, node, np.mean)
        if op in ("GlobalAveragePool", "ReduceMean"):
            axes = tuple(range(2, lo.ndim))
            return lo.mean(axis=axes, keepdims=True), hi.mean(axis=axes, keepdims=True)
        if op in ("Flatten", "Reshape"):
            n = lo.shape[0]
            return lo.reshape(n, -1), hi.reshape(n, -1)
        if op == "Concat":
            rows = next(b for b in ins if b is not None)[0].shape[0]
            parts = [b if b is not None else (np.zeros((rows, *self.shapes[t.name][1:])),) * 2
                     for t, b in zip(node.inputs, ins)]
            axis = int(node.attrs.get("axis", 0)) % lo.ndim if lo is not None else int(node.attrs.get("axis", 0))
            return (np.concatenate([q[0] for q in parts], axis=axis), np.concatenate([q[1] for q in parts], axis=axis))
        raise Unsupported(f"no interval rule for {op}")


def width_and_entropy(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the L1 size of the output intervals and the entropy of its spread."""
    width = (hi - lo).reshape(len(lo), -1)
    total = width.sum(axis=1)
    share = width / (total[:, None] + 1e-12)
    return total, -(share * np.log(share + 1e-12)).sum(axis=1)
