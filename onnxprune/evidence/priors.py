"""Data-free activation statistics: per-channel means and variances propagated from priors.

Without data, the best evidence of what a trained network's activations look like is in the
network itself: a BatchNormalization output follows, on the data the network was trained
on, a distribution with mean ``beta`` and standard deviation ``|gamma|`` per channel (its
running statistics normalised the input). From there, moments go forward through
activations (Gaussian expectations by Gauss-Hermite quadrature), affine layers (means
exactly, variances assuming independent channels), pooling, residual sums and
concatenations. Before the first normalisation, the input prior is used.

Moments are tracked along one axis per tensor, the channel axis (1 for images, the last
axis for MLPs and token sequences). Compensation replaces a removed channel by its mean.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(64)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()
_erf = np.vectorize(math.erf, otypes=[float])


@dataclass
class Moments:
    axis: int
    mean: np.ndarray
    var: np.ndarray


@dataclass
class InputPrior:
    """What a synthetic input looks like: uniform on a known range (``--input-range``), or a
    normal distribution with the mean and deviation inferred from the first layer."""

    mean: float = 0.0
    std: float = 1.0
    low: float | None = None
    high: float | None = None
    source: str = "default N(0, 1)"

    fitted: bool = False

    @classmethod
    def uniform(cls, low: float, high: float) -> InputPrior:
        return cls((low + high) / 2, (high - low) / math.sqrt(12), low, high, f"--input-range {low:g},{high:g}")

    def within(self, low: float, high: float) -> InputPrior:
        """This prior clipped to a known range; a range alone when nothing was fitted."""
        if not self.fitted:
            return InputPrior.uniform(low, high)
        return InputPrior(self.mean, self.std, low, high, f"{self.source}, within [{low:g}, {high:g}]", True)

    @property
    def var(self) -> float:
        return self.std**2

    def sample(self, shape, rng: np.random.Generator) -> np.ndarray:
        if self.low is not None and self.high is not None and not self.fitted:
            return rng.uniform(self.low, self.high, shape)
        x = self.mean + self.std * _noise(shape, rng)
        return np.clip(x, self.low, self.high) if self.low is not None else x


def _noise(shape, rng: np.random.Generator) -> np.ndarray:
    """Standard noise; for images, a sum of octaves of blocky noise (unit variance), because
    natural images are spatially correlated and white noise drives deep layers off-distribution."""
    if len(shape) != 4 or min(shape[2:]) < 8:
        return rng.standard_normal(shape)
    n, c, h, w = shape
    total = np.zeros(shape)
    scales = [s for s in (1, 2, 4, 8) if min(h, w) >= 2 * s]
    for s in scales:
        small = rng.standard_normal((n, c, -(-h // s), -(-w // s)))
        total += small.repeat(s, axis=2).repeat(s, axis=3)[:, :, :h, :w]
    return total / math.sqrt(len(scales))


def infer_input_prior(graph: gs.Graph) -> InputPrior:
    """Read the input's mean and deviation off the first Conv/Gemm when a BatchNorm follows it.

    The BN's running mean is what the layer's output averaged to on real data, so a least
    squares fit of ``W @ mean_in + b = running_mean`` recovers the input's mean; its running
    variance gives the scale, assuming neighbouring inputs are strongly correlated (images).
    """
    for tensor in graph.inputs:
        for node in tensor.outputs:
            if node.op not in ("Conv", "Gemm") or not isinstance(node.inputs[1], gs.Constant):
                continue
            bns = [n for n in node.outputs[0].outputs if n.op == "BatchNormalization"]
            if len(bns) != 1 or not all(isinstance(t, gs.Constant) for t in bns[0].inputs[1:5]):
                continue
            w = np.asarray(node.inputs[1].values, np.float64)
            if node.op == "Gemm" and node.attrs.get("transB", 0) == 0:
                w = w.T
            w_sum = w.reshape(w.shape[0], -1).sum(axis=1)
            if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
                continue
            bias = np.asarray(node.inputs[2].values, np.float64) if len(node.inputs) > 2 and \
                isinstance(node.inputs[2], gs.Constant) else np.zeros(w.shape[0])
            running_mean = np.asarray(bns[0].inputs[3].values, np.float64)
            running_var = np.asarray(bns[0].inputs[4].values, np.float64)
            denom = float(w_sum @ w_sum)
            if denom <= 0:
                continue
            mean = float(w_sum @ (running_mean - bias)) / denom
            std = math.sqrt(max(float(running_var @ w_sum**2) / float(w_sum**2 @ w_sum**2), 1e-12))
            return InputPrior(mean, std, source=f"fitted to '{bns[0].name}' statistics", fitted=True)
    return InputPrior()


def _gelu(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _hard_sigmoid(alpha, beta):
    return lambda x: np.clip(alpha * x + beta, 0, 1)


def _activation(node: gs.Node):
    a = node.attrs
    table = {
        "Relu": lambda x: np.maximum(x, 0),
        "LeakyRelu": lambda x: np.where(x > 0, x, a.get("alpha", 0.01) * x),
        "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
        "HardSigmoid": _hard_sigmoid(a.get("alpha", 0.2), a.get("beta", 0.5)),
        "HardSwish": lambda x: x * np.clip(x / 6 + 0.5, 0, 1),
        "Tanh": np.tanh,
        "Gelu": _gelu,
        "Erf": _erf,
        "Elu": lambda x: np.where(x > 0, x, a.get("alpha", 1.0) * (np.exp(np.minimum(x, 0)) - 1)),
        "Softplus": lambda x: np.logaddexp(0, x),
        "Exp": lambda x: np.exp(np.minimum(x, 30)),
        "Abs": np.abs,
        "Neg": np.negative,
        "Identity": lambda x: x,
        "Dropout": lambda x: x,
        "Cast": lambda x: x,
    }
    return table.get(node.op)


def gaussian_moments(fn, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[f(z)] and Var[f(z)] for z ~ N(mean, var), per channel."""
    z = mean[:, None] + np.sqrt(np.maximum(var, 0))[:, None] * _NODES[None, :]
    fz = fn(z)
    m1 = fz @ _WEIGHTS
    m2 = (fz**2) @ _WEIGHTS
    return m1, np.maximum(m2 - m1**2, 0)


def relu_moments(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed form for ReLU of N(mean, var): m*Phi(m/s) + s*phi(m/s), and the second moment."""
    s = np.sqrt(np.maximum(var, 1e-24))
    a = mean / s
    pdf = np.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + _erf(a / math.sqrt(2)))
    first = mean * cdf + s * pdf
    second = (mean**2 + s**2) * cdf + mean * s * pdf
    return first, np.maximum(second - first**2, 0)


class MomentPropagation:
    """Per-tensor channel moments of a lowered graph, computed once in topological order."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int, ...]], prior: InputPrior):
        self.shapes = shapes
        self.moments: dict[str, Moments] = {}
        for tensor in graph.inputs:
            shape = shapes.get(tensor.name)
            if shape and len(shape) >= 2:
                axis = 2 if len(shape) == 3 else 1  # tokens carry features last, images channels first
                n = shape[axis]
                self.moments[tensor.name] = Moments(axis, np.full(n, prior.mean), np.full(n, prior.var))
        for node in graph.nodes:
            try:
                self._visit(node)
            except (KeyError, IndexError, ValueError, TypeError) as exc:  # unknown territory: no moments
                logger.debug("moments stop at %s (%s): %r", node.name, node.op, exc)
        self.refined = self._refine_from_next_norms(graph)

    def _refine_from_next_norms(self, graph: gs.Graph, ridge: float = 1e-3) -> int:
        """Solve a tensor's channel means back from the BatchNorms behind its consumers.

        A Conv or Gemm reading tensor ``a`` and feeding a BatchNorm satisfies, on the data
        the network was trained on, ``W_sum @ E[a] + b = running_mean``: as many equations as
        the layer has outputs. Their least-squares solution (pulled towards the forward
        estimate where under-determined) replaces the forward estimate, which drifts through
        max pooling and nonlinearities.
        """
        refined = 0
        tensors = graph.tensors()
        for name, m in list(self.moments.items()):
            tensor = tensors.get(name)
            if tensor is None or m.axis != 1:
                continue
            rows, targets = [], []
            for node in tensor.outputs:
                eq = self._norm_equations(node, tensor, len(m.mean))
                if eq is not None:
                    rows.append(eq[0])
                    targets.append(eq[1])
            if not rows:
                continue
            a, t = np.concatenate(rows), np.concatenate(targets)
            scale = max(float(np.abs(a).max()), 1e-12)
            lam = ridge * scale**2 * a.shape[0]
            lhs = a.T @ a + lam * np.eye(a.shape[1])
            mean = np.linalg.solve(lhs, a.T @ t + lam * m.mean)
            self.moments[name] = Moments(m.axis, mean, m.var)
            refined += 1
        return refined

    @staticmethod
    def _norm_equations(node: gs.Node, tensor: gs.Tensor, channels: int):
        if node.op not in ("Conv", "Gemm") or node.inputs[0] is not tensor or not isinstance(node.inputs[1], gs.Constant):
            return None
        users = node.outputs[0].outputs
        if len(users) != 1 or users[0].op != "BatchNormalization":
            return None
        bn = users[0]
        if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
            return None
        w = np.asarray(node.inputs[1].values, np.float64)
        if node.op == "Gemm":
            if node.attrs.get("transA", 0):
                return None
            w_sum = w if node.attrs.get("transB", 0) else w.T
            w_sum = w_sum * float(node.attrs.get("alpha", 1.0))
        else:
            group = int(node.attrs.get("group", 1))
            per = w.shape[1]
            rows = w.shape[0] // group
            w_sum = np.zeros((w.shape[0], channels))
            sums = w.reshape(w.shape[0], per, -1).sum(axis=2)
            for g in range(group):
                w_sum[g * rows:(g + 1) * rows, g * per:(g + 1) * per] = sums[g * rows:(g + 1) * rows]
        if w_sum.shape[1] != channels:
            return None
        bias = np.zeros(w_sum.shape[0])
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            bias = np.asarray(node.inputs[2].values, np.float64).reshape(-1) * (
                float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0)
        return w_sum, np.asarray(bn.inputs[3].values, np.float64) - bias

    def get(self, name: str, axis: int) -> Moments | None:
        m = self.moments.get(name)
        return m if m is not None and m.axis == axis else None

    # -- per-op propagation ----------------------------------------------------------------
    def _visit(self, node: gs.Node) -> None:
        op = node.op
        ins = [self.moments.get(t.name) if isinstance(t, gs.Variable) else None for t in node.inputs]
        out = node.outputs[0] if node.outputs else None
        if out is None:
            return
        if op == "BatchNormalization":
            gamma, beta = (np.asarray(node.inputs[i].values, np.float64) for i in (1, 2))
            self.moments[out.name] = Moments(1, beta.copy(), gamma**2)
        elif op == "Conv" and ins[0] is not None and ins[0].axis == 1:
            self.moments[out.name] = self._conv(node, ins[0])
        elif op in ("Gemm", "MatMul") and ins[0] is not None:
            moments = self._linear(node, ins[0])
            if moments is not None:
                self.moments[out.name] = moments
        elif op == "Relu" and ins[0] is not None:
            mean, var = relu_moments(ins[0].mean, ins[0].var)
            self.moments[out.name] = Moments(ins[0].axis, mean, var)
        elif _activation(node) is not None and ins[0] is not None:
            mean, var = gaussian_moments(_activation(node), ins[0].mean, ins[0].var)
            self.moments[out.name] = Moments(ins[0].axis, mean, var)
        elif op == "Clip" and ins[0] is not None:
            lo = self._scalar(node, 1, node.attrs.get("min", -np.inf))
            hi = self._scalar(node, 2, node.attrs.get("max", np.inf))
            mean, var = gaussian_moments(lambda x: np.clip(x, lo, hi), ins[0].mean, ins[0].var)
            self.moments[out.name] = Moments(ins[0].axis, mean, var)
        elif op in ("Add", "Sub", "Mul", "Div", "Sum"):
            self._arithmetic(node, ins)
        elif op in ("GlobalAveragePool", "AveragePool", "Pad", "Resize", "Upsample", "Dropout", "Identity"):
            if ins[0] is not None:
                self.moments[out.name] = ins[0]
        elif op in ("MaxPool", "GlobalMaxPool") and ins[0] is not None:
            # The max of a window of correlated values sits above their mean: a crude half sigma.
            sd = np.sqrt(ins[0].var)
            self.moments[out.name] = Moments(ins[0].axis, ins[0].mean + 0.5 * sd, ins[0].var * 0.5)
        elif op == "Concat":
            self._concat(node, ins)
        elif op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze") and ins[0] is not None:
            self._reshape(node, ins[0])
        elif op == "Transpose" and ins[0] is not None:
            perm = list(node.attrs["perm"])
            self.moments[out.name] = Moments(perm.index(ins[0].axis), ins[0].mean, ins[0].var)
        elif op == "LayerNormalization":
            gamma = np.asarray(node.inputs[1].values, np.float64).ravel()
            beta = (np.asarray(node.inputs[2].values, np.float64).ravel() if len(node.inputs) > 2
                    else np.zeros_like(gamma))
            rank = len(self.shapes[out.name])
            self.moments[out.name] = Moments(rank - 1, beta, gamma**2)

    @staticmethod
    def _scalar(node, slot, default):
        if len(node.inputs) > slot and isinstance(node.inputs[slot], gs.Constant):
            return float(np.asarray(node.inputs[slot].values).ravel()[0])
        return default

    def _conv(self, node: gs.Node, x: Moments) -> Moments:
        w = np.asarray(node.inputs[1].values, np.float64)
        group = int(node.attrs.get("group", 1))
        c_out, per = w.shape[0], w.shape[1]
        w_sum = w.reshape(c_out, per, -1).sum(axis=2)
        w_sq = (w.reshape(c_out, per, -1) ** 2).sum(axis=2)
        rows = c_out // group
        mean, var = np.zeros(c_out), np.zeros(c_out)
        for g in range(group):
            sl, cols = slice(g * rows, (g + 1) * rows), slice(g * per, (g + 1) * per)
            mean[sl] = w_sum[sl] @ x.mean[cols]
            var[sl] = w_sq[sl] @ x.var[cols]
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            mean += np.asarray(node.inputs[2].values, np.float64)
        return Moments(1, mean, var)

    def _linear(self, node: gs.Node, x: Moments) -> Moments | None:
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            return None
        w = np.asarray(w.values, np.float64)
        rank = len(self.shapes[node.inputs[0].name])
        if node.op == "Gemm":
            if node.attrs.get("transA", 0) or x.axis != 1:
                return None
            w = w.T if node.attrs.get("transB", 0) else w
        elif x.axis != rank - 1 or w.ndim != 2:
            return None
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        mean, var = alpha * (x.mean @ w), alpha**2 * (x.var @ w**2)
        if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            bias = np.asarray(node.inputs[2].values, np.float64)
            mean = mean + float(node.attrs.get("beta", 1.0)) * np.broadcast_to(bias.reshape(-1)[-len(mean):]
                                                                               if bias.size > 1 else bias, mean.shape)
        return Moments(x.axis if node.op == "MatMul" else 1, mean, var)

    def _per_channel_const(self, tensor: gs.Constant, axis: int, rank: int, n: int) -> np.ndarray | None:
        values = np.asarray(tensor.values, np.float64)
        if values.size == 1:
            return np.full(n, float(values.ravel()[0]))
        a = axis - (rank - values.ndim)
        if a < 0 or values.shape[a] != n or values.size != n:
            return None
        return values.reshape(-1)

    def _arithmetic(self, node: gs.Node, ins: list[Moments | None]) -> None:
        out = node.outputs[0]
        known = [m for m in ins if m is not None]
        if not known:
            return
        axis = known[0].axis
        rank = len(self.shapes[out.name])
        n = len(known[0].mean)
        terms = []
        for tensor, m in zip(node.inputs, ins):
            if m is not None:
                if m.axis != axis or len(m.mean) != n:
                    return
                terms.append((m.mean, m.var, False))
            elif isinstance(tensor, gs.Constant):
                c = self._per_channel_const(tensor, axis, rank, n)
                if c is None:
                    return
                terms.append((c, np.zeros(n), True))
            else:
                return
        op = node.op
        if op in ("Add", "Sum"):
            mean, var = sum(t[0] for t in terms), sum(t[1] for t in terms)
        elif op == "Sub":
            mean, var = terms[0][0] - terms[1][0], terms[0][1] + terms[1][1]
        elif op == "Mul":
            (m1, v1, _), (m2, v2, _) = terms
            mean = m1 * m2
            var = (v1 + m1**2) * (v2 + m2**2) - mean**2
        elif op == "Div" and terms[1][2]:
            mean, var = terms[0][0] / terms[1][0], terms[0][1] / terms[1][0] ** 2
        else:
            return
        self.moments[out.name] = Moments(axis, mean, np.maximum(var, 0))

    def _concat(self, node: gs.Node, ins: list[Moments | None]) -> None:
        out = node.outputs[0]
        rank = len(self.shapes[out.name])
        cat = int(node.attrs.get("axis", 0)) % rank
        if any(m is None or m.axis != cat for m in ins):
            return
        self.moments[out.name] = Moments(cat, np.concatenate([m.mean for m in ins]),
                                         np.concatenate([m.var for m in ins]))

    def _reshape(self, node: gs.Node, x: Moments) -> None:
        from onnxprune.rules.layout import reshape_link
        out = node.outputs[0]
        link = reshape_link(self.shapes[node.inputs[0].name], self.shapes[out.name], x.axis, True)
        if isinstance(link, str):
            return
        other_axis, here, there = link
        order = np.argsort(there)
        self.moments[out.name] = Moments(other_axis, x.mean[here[order]], x.var[here[order]])
