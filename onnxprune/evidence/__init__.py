"""The evidence layer: what onnxprune knows about a model's behaviour without data.

Input priors and data-free moment propagation (:mod:`.priors`), inputs distilled from
BatchNorm statistics (:mod:`.distill`), channel statistics measured on synthetic inputs with
least-squares estimates (:mod:`.statistics`), and probe models that measure ablations on the
output layer in one batched run (:mod:`.probes`). It depends on the dependency graph and the
IR, never on the pipeline or the methods.
"""
