"""Data-free statistics: Gaussian moments, BatchNorm priors, the back-solve from the next
BatchNorm, and the input prior read off the first layer."""

import math

import nets
import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.evidence.priors import InputPrior, MomentPropagation, gaussian_moments, infer_input_prior, relu_moments
from onnxprune.pipeline import analyse


def test_quadrature_is_exact_for_polynomials():
    m, v = np.array([0.5, -2.0]), np.array([0.25, 4.0])
    mean, var = gaussian_moments(lambda z: z**2, m, v)
    np.testing.assert_allclose(mean, m**2 + v, rtol=1e-9)
    np.testing.assert_allclose(var, 2 * v**2 + 4 * m**2 * v, rtol=1e-9)


def test_relu_of_a_gaussian_matches_the_closed_form():
    b, g = np.array([0.3, -1.0, 2.0]), np.array([1.0, 0.5, 0.7])
    mean, var = relu_moments(b, g**2)
    quad_mean, _ = gaussian_moments(lambda z: np.maximum(z, 0), b, g**2)
    np.testing.assert_allclose(quad_mean, mean, atol=1e-3)  # the kink costs quadrature accuracy
    phi = np.exp(-0.5 * (b / g) ** 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(b / g / math.sqrt(2)))
    np.testing.assert_allclose(mean, b * cdf + g * phi, rtol=1e-6)
    second = (b**2 + g**2) * cdf + b * g * phi
    np.testing.assert_allclose(var, second - (b * cdf + g * phi) ** 2, rtol=1e-5)


def _conv_bn_conv_bn(mu_true: np.ndarray):
    """x -> Conv(8) -> BN -> Relu -> Conv(16) -> BN2 whose running mean says E[relu] = mu_true."""
    model = nets.from_text(
        "net (float[1,3,8,8] x, float[8,3,3,3] w1, float[8] bn_scale, float[8] bn_b, float[8] bn_mean, float[8] bn_var,"
        " float[16,8,3,3] w2, float[16] b2, float[16] bn2_scale, float[16] bn2_b, float[16] bn2_mean, float[16] bn2_var)"
        " => (float[1,16,8,8] y) {\n  c = Conv<pads=[1,1,1,1]>(x, w1)\n"
        "  n = BatchNormalization(c, bn_scale, bn_b, bn_mean, bn_var)\n  r = Relu(n)\n"
        "  c2 = Conv<pads=[1,1,1,1]>(r, w2, b2)\n  y = BatchNormalization(c2, bn2_scale, bn2_b, bn2_mean, bn2_var)\n}")
    analysis = analyse(model)
    consts = {t.name: t for t in analysis.graph.tensors().values() if isinstance(t, gs.Constant)}
    w2 = np.asarray(consts["w2"].values, np.float64)
    consts["bn2_mean"].values = (w2.sum(axis=(2, 3)) @ mu_true + np.asarray(consts["b2"].values)).astype(np.float32)
    return analysis


def test_consumer_input_means_are_solved_back_from_the_next_batchnorm():
    mu_true = np.linspace(0.1, 0.8, 8)
    analysis = _conv_bn_conv_bn(mu_true)
    moments = MomentPropagation(analysis.graph, analysis.shapes, InputPrior())
    assert moments.refined >= 1
    np.testing.assert_allclose(moments.get("r", 1).mean, mu_true, atol=0.02)  # the ridge pulls a little
    # The BatchNorm output itself follows its prior: mean beta, variance gamma^2.
    bn = next(n for n in analysis.graph.nodes if n.op == "BatchNormalization")
    np.testing.assert_allclose(moments.get("n", 1).mean, np.asarray(bn.inputs[2].values), rtol=1e-6)


def test_input_prior_is_fitted_to_the_first_batchnorm():
    analysis = analyse(nets.resnet())
    conv = next(n for n in analysis.graph.nodes if n.op == "Conv")
    bn = conv.outputs[0].outputs[0]
    w_sum = np.asarray(conv.inputs[1].values, np.float64).reshape(8, -1).sum(axis=1)
    bn.inputs[3].values = (w_sum * 0.3).astype(np.float32)  # an input of mean 0.3
    prior = infer_input_prior(analysis.graph)
    assert prior.fitted and abs(prior.mean - 0.3) < 1e-6
    clipped = prior.within(0.0, 1.0)
    sample = clipped.sample((4, 3, 16, 16), np.random.default_rng(0))
    assert sample.min() >= 0 and sample.max() <= 1


def test_uniform_prior_without_a_fit():
    prior = InputPrior().within(-1.0, 3.0)
    assert not prior.fitted and prior.mean == 1.0 and abs(prior.var - 16 / 12) < 1e-12
