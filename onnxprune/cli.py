"""Command line: ``onnxprune IN OUT --ratio R``, ``onnxprune inspect IN``, ``onnxprune eval MODEL``,
``onnxprune calib MODEL IMAGES... -o SET.npz``.

User errors print one line and exit 2; a fidelity check below ``--min-cosine`` exits 3 (the
output is written only with ``--keep-failed``); anything else is a bug and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

from onnxprune import __version__
from onnxprune.errors import FidelityError, OnnxPruneError, UserError
from onnxprune.profiling import stage
from onnxprune.writer import (
    Interrupted,
    Transaction,
    check_target,
    handle_signals,
    interrupted_by,
    release_signals,
    remove_live_temporaries,
    same_file,
)

#: --method's choices and what each does (tests/test_cli.py checks them against the registry,
#: which is not imported here: ``--help`` and argument errors must not pay for the pipeline).
METHODS = {
    "auto": "the default: autodfp where grouped convolutions make a third of the prunable groups, "
            "paoding elsewhere (the best measured at equal MACs; the report says which ran)",
    "magnitude": "L2 norm of each channel's weights across its group (baseline)",
    "random": "uniformly random channels, seeded (the floor)",
    "paoding": "PAODING: progressive pair merging decided by measured impact on the output layer",
    "srdfp": "SRDFP: progressive, simulated annealing on robustness of the output deviation",
    "autodfp": "AutoDFP: a Soft Actor-Critic agent picks each group's kept share and merge coefficient",
}


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got '{text}'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got '{text}'") from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"needs LO < HI, got '{text}'")
    return low, high


def _bounded(convert, low, high, kind: str, bounds: str):
    """An argparse type: ``convert(text)`` in [low, high]; ``kind`` and ``bounds`` say what was
    expected when the text does not convert or the value falls outside."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got '{text}'") from None
        if not low <= value <= high:  # an integer is shown as read, a number as written
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {value if convert is int else text}")
        return value
    return parse


def _integer(low: int, high: int, bounds: str):
    """An integer in [low, high]; ``bounds`` says the range in the error."""
    return _bounded(int, low, high, "a positive integer" if low == 1 else "a non-negative integer", bounds)


_seed = _integer(0, 2**63 - 1, "an integer in [0, 2^63)")
_count = _integer(0, 100_000, "an integer in [0, 100000]")
_positive = _integer(1, 2**20, "a positive integer up to 2^20")


def _finite(low: float, high: float):
    """A number in [low, high]."""
    return _bounded(float, low, high, "a number", f"a number in [{low:g}, {high:g}]")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user error
        raise UserError(f"{message} (see {self.prog} --help)")


#: What ``onnxprune IN OUT`` runs (tests/test_cli.py checks it is onnxprune.pipeline.DEFAULT_METHOD).
DEFAULT_METHOD = "auto"
#: The methods that allocate (match the uniform plan's MACs by default).
ALLOCATING = ("auto", "paoding", "srdfp", "autodfp")


def _target(args) -> str:
    """What the budget counts: ``--target`` (a share), else ``--budget`` (the uniform ratio's
    amount), else the method's default (MACs for the methods that allocate)."""
    if args.target and args.budget:
        raise UserError("--budget goes with --ratio; --target already says what to keep")
    if args.target:
        return args.target
    return args.budget or ("macs" if args.method in ALLOCATING else "channels")


def _prune_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune", description="Data-free structured pruning of ONNX models. "
                "Other commands: 'onnxprune inspect IN', 'onnxprune eval MODEL --data D.npz', "
                "'onnxprune calib MODEL IMAGES... -o SET.npz' (a --calibration set from image files).")
    p.add_argument("input", help="the model to prune (.onnx, external data beside it)")
    p.add_argument("output", help="where to write the pruned model")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=_ratio,
                      help="share of each group's channels to remove, in (0, 1) (default 0.4); methods that allocate "
                           "(paoding, srdfp, autodfp) remove at least the MACs this uniform plan removes")
    size.add_argument("--target", metavar="KIND=SHARE",
                      help="instead of --ratio: what to keep, macs=S, params=S or latency=S (S in (0, 1), a share "
                           "of the model's; latency as onnxruntime runs it on this machine, predicted by a cost "
                           "model calibrated here and then measured), e.g. --target macs=0.5")
    p.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD,
                   help="how channels are chosen: " + "; ".join(f"{k}: {d}" for k, d in METHODS.items()))
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                   help="concrete shape for an input with dynamic dimensions (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="protect groups touching nodes whose names match (repeatable)")
    p.add_argument("--round-to", type=_positive, metavar="N",
                   help="keep channel counts multiples of N (default 1; for a latency target the channel block of "
                        "onnxruntime's convolutions on this CPU, 16 with AVX-512, else 8)")
    p.add_argument("--latency-threads", type=_count, default=0, metavar="N",
                   help="latency targets: the onnxruntime intra-op threads to plan for (default 0: all cores); "
                        "the report measures 1 thread and all threads as well")
    p.add_argument("--input-range", type=_range, metavar="LO,HI",
                   help="the range input values live in (synthetic probes stay inside it)")
    p.add_argument("--calibration", metavar="FILE.npz",
                   help="opt-in: unlabelled inputs (one array per model input, named after it, samples on the "
                        "first axis) that replace the synthetic inputs everywhere; the last quarter (at most 64) "
                        "is held out for the fidelity check, planning uses the rest")
    p.add_argument("--step", type=_ratio, metavar="S",
                   help="progressive methods: share of each group removed per step "
                        "(default 0.025; 0.05 for models above 1 GMAC)")
    p.add_argument("--prune-hidden", action="store_true",
                   help="transformers: also prune the residual stream's width (LayerNorm makes it approximate)")
    p.add_argument("--prune-head-dim", action="store_true",
                   help="transformers: prune dimensions inside each attention head instead of whole heads")
    p.add_argument("--budget", choices=["channels", "macs", "params", "latency"],
                   help="with --ratio, what the allocating methods (paoding, srdfp) match of the uniform plan: "
                        "its MACs (their default), its parameters, or its channel count; measured impact "
                        "decides where the cuts go")
    p.add_argument("--alpha", type=_finite(0, 1e6), default=0.5, help="srdfp: weight of the output deviation's spread")
    p.add_argument("--beta", type=_finite(0, 1e6), default=0.5, help="srdfp: weight of the output deviation's entropy")
    p.add_argument("--intervals", action="store_true",
                   help="srdfp: robustness from sound interval propagation of each candidate's deviation "
                        "(paoding-dl's measure) instead of the probes' empirical intervals")
    p.add_argument("--reconstruction", choices=["least-squares", "pair"],
                   help="how removed channels are compensated: from every kept channel by least squares fitted "
                        "on synthetic inputs (default for paoding/srdfp, except under LayerNorm), or merged into "
                        "one look-alike each, as the papers do (magnitude/random: mean and variance only; their "
                        "default)")
    p.add_argument("--no-compensation", action="store_true",
                   help="do not compensate removed channels (bias, variance, merges): the raw baseline")
    p.add_argument("--no-recalibration", action="store_true",
                   help="keep the layers and BatchNorm statistics as compensation left them (by default the "
                        "pruned model's linear layers are re-fitted to the original's outputs, and the BatchNorms "
                        "they do not feed re-estimated, on the planning inputs where those were distilled from "
                        "BatchNorm statistics and reproduce them, or with --calibration)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--check", type=_count, default=8, metavar="N",
                   help="synthetic probes for the fidelity check (default 8, 0 to skip the report)")
    p.add_argument("--min-cosine", type=_finite(-1, 1), metavar="X",
                   help="fail with exit code 3 if the mean output cosine on probes falls below X")
    p.add_argument("--keep-failed", action="store_true", help="write the output even if --min-cosine fails")
    p.add_argument("--report", metavar="R.json", help="write the report (and the plan) as JSON")
    p.add_argument("--save-plan", metavar="P.json", help="write the pruning plan as JSON")
    p.add_argument("--plan", metavar="P.json", help="apply a saved plan instead of planning")
    p.add_argument("--latency", action="store_true", help="also time both models in onnxruntime")
    p.add_argument("--force", action="store_true", help="allow the output to overwrite the input model "
                   "(--report and --save-plan never may)")
    p.add_argument("--dry-run", action="store_true", help="plan and check, write nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    p.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    return p


def _targets(args: argparse.Namespace, reads: list[Path]) -> list[tuple[Path, str]]:
    """Check every file the run will write before any work: writable, not a directory, and
    never one the run reads (the input model, its external data, --plan, --calibration);
    only --force lets the output replace the input model."""
    src, dst = Path(args.input), Path(args.output)
    extra = [Path(p) for p in (args.plan, args.calibration) if p]
    targets: list[tuple[Path, str]] = []
    if not args.dry_run:
        if same_file(dst, src) and not args.force:
            raise UserError(f"output {dst} is the input; pass --force to overwrite it")
        check_target(dst, "output", protect=extra if args.force else [*reads, *extra], suffixes=("", ".data"))
        targets.append((dst, "output"))
    for path, what in ((args.report, "--report"), (args.save_plan, "--save-plan")):
        if not path:
            continue
        path = check_target(path, what, protect=[*reads, *extra])
        for other, name in targets:
            if same_file(path, other) or (name == "output" and same_file(path, Path(f"{other}.data"))):
                raise UserError(f"{what} '{path}' is the same file as {name}")
        targets.append((path, what))
    return targets


def run_prune(argv: list[str]) -> int:
    args = _prune_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    src = Path(args.input)
    _targets(args, [src])
    from onnxprune.ir import holding

    with holding():  # a large model's weights stay in one place, from reading to writing
        return _prune_and_write(args, src)


def _prune_and_write(args, src: Path) -> int:
    from onnxprune.ir import check_runs, input_specs, keep_ir_version, load_model_info, parse_input_shapes

    with stage("load"):
        model, external = load_model_info(src, hold=True)
    _targets(args, [src, *external])
    shapes = parse_input_shapes(args.input_shape)
    with stage("check input"):
        check_runs(model, shapes)

    from onnxprune.evidence.calibration import load_calibration
    from onnxprune.pipeline import prune
    from onnxprune.plan import PruningPlan
    from onnxprune.tables import progress

    calibration = load_calibration(args.calibration, input_specs(model)) if args.calibration else None
    plan = PruningPlan.load(args.plan) if args.plan else None
    with progress() as update:
        try:
            pruned, report = prune(model, args.ratio, method=args.method,
                                   input_shapes=shapes, exclude=args.exclude,
                                   round_to=args.round_to, seed=args.seed, check=args.check,
                                   min_cosine=args.min_cosine, plan=plan, progress=update,
                                   compensate=not args.no_compensation, input_range=args.input_range,
                                   step=args.step,
                                   method_options={"alpha": args.alpha, "beta": args.beta, "intervals": args.intervals}
                                   if args.method == "srdfp" else None, target=_target(args),
                                   reconstruction=args.reconstruction, calibration=calibration,
                                   latency_threads=args.latency_threads, recalibrate=not args.no_recalibration,
                                   options={"prune_hidden": args.prune_hidden, "prune_head_dim": args.prune_head_dim})
            failure = None
        except FidelityError as exc:
            pruned, report, failure = exc.model, exc.report, exc
    latency = None
    if args.latency:
        from onnxprune.fidelity import latency_ratio
        latency = latency_ratio(model, pruned, report.input_shapes)
    _print_report(report, latency)
    keep_ir_version(pruned, model.ir_version)
    del model  # the input's weights are no longer needed: only the pruned model is written
    with stage("write"):
        return _write(args, pruned, report, latency, failure, external)


def _print_report(report, latency) -> None:
    from onnxprune.tables import blocked_table, out, summary_table

    out.print(summary_table(report, latency))
    if report.chosen_by:
        out.print(f"method {report.method}, chosen by {report.chosen_by}", style="dim")
    if report.fidelity and report.calibration:
        out.print(f"fidelity measured on {report.fidelity.probes} {report.fidelity.inputs} (unlabelled: "
                  "`onnxprune eval` measures accuracy)", style="dim")
    elif report.fidelity:
        out.print(f"fidelity measured on {report.fidelity.probes} {report.fidelity.inputs} (not real data: "
                  "`onnxprune eval` measures that)", style="dim")
    for warning in report.warnings:
        out.print(f"warning: {warning}", style="yellow")
    blocked = blocked_table(report)
    if blocked is not None:
        out.print(blocked)


def _write(args, pruned, report, latency, failure, external) -> int:
    """Every file of the run in one transaction: all of them, or none (a fidelity failure
    still writes the report and the plan that explain it, not the model)."""
    from onnxprune.ir import save_model

    with Transaction() as tx:
        if args.report:
            data = report.to_dict()
            if latency:
                data["latency_ms"] = {"before": latency[0], "after": latency[1], "ratio": latency[2]}
            tx.temporary(args.report).write_text(json.dumps(data, indent=1))
        if args.save_plan:
            tx.temporary(args.save_plan).write_text(report.plan.to_json())
        refused = failure is not None and not args.keep_failed
        if not refused and not args.dry_run:
            save_model(pruned, args.output, external_data=bool(external) or None, transaction=tx)
        written = sorted(tx.commit(), key=lambda p: p != Path(args.output))  # the model first
    also = f"; wrote {', '.join(str(p) for p in written)}" if written else ""
    if refused:
        _say(f"onnxprune: {failure}; {'the model was not' if written else 'nothing'} written (use --keep-failed "
             f"to write it){also}", error=True)
        return failure.exit_code
    if args.dry_run:
        _say(f"dry run: {'the model was not' if written else 'nothing'} written{also}")
    else:
        _say(also[2:])
    return failure.exit_code if failure is not None else 0


def run_inspect(argv: list[str]) -> int:
    p = _Parser(prog="onnxprune inspect", description="List every channel group: size, members, "
                "prunable or the reason it is not.")
    p.add_argument("input")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    p.add_argument("--prune-hidden", action="store_true", help="transformers: include the residual stream")
    p.add_argument("--prune-head-dim", action="store_true", help="transformers: dimensions inside heads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from onnxprune.ir import check_runs, load_model_info, parse_input_shapes
    from onnxprune.pipeline import analyse

    model, _ = load_model_info(args.input)
    shapes = parse_input_shapes(args.input_shape)
    check_runs(model, shapes)
    analysis = analyse(model, shapes, {"prune_hidden": args.prune_hidden, "prune_head_dim": args.prune_head_dim})
    groups = analysis.dep.groups
    rows = [{"id": g.id, "name": g.name, "size": g.size, "spaces": len(g.spaces),
             "producers": [n.name for n in g.producers], "members": len(g.nodes),
             "prunable": g.prunable, "why": g.blocked, "reasons": [r.to_dict() for r in g.reasons]}
            for g in groups]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from onnxprune.tables import inspect_table, kinds_table, out

    out.print(inspect_table(args.input, rows))
    kinds = kinds_table(groups)
    if kinds is not None:
        out.print(kinds)
    return 0


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"epsilons are fractions of the input range in (0, 1), got '{text}'")
    return values


def run_eval(argv: list[str]) -> int:
    p = _Parser(prog="onnxprune eval", description="Top-1 accuracy and adversarial robustness (FGSM, PGD) "
                "on labelled data; with --compare, an original and a pruned model side by side.")
    p.add_argument("model")
    p.add_argument("--data", required=True, metavar="D.npz", help="arrays x (inputs) and y (integer labels)")
    p.add_argument("--compare", metavar="PRUNED", help="a pruned model to evaluate beside MODEL")
    p.add_argument("--epsilons", type=_floats, default=[0.01, 0.05, 0.1], metavar="E1,E2,...",
                   help="FGSM strengths as fractions of the input range (default 0.01,0.05,0.1)")
    p.add_argument("--pgd-steps", type=_count, default=10, metavar="N", help="PGD iterations (0 skips PGD)")
    p.add_argument("--pgd-epsilon", type=_finite(0, 1), metavar="E", help="PGD strength (default: the middle epsilon)")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--report", metavar="R.json", help="write the results as JSON")
    args = p.parse_args(argv)
    reads = [Path(p) for p in (args.model, args.data, args.compare) if p]
    if args.report:
        check_target(args.report, "--report", protect=reads)
    from onnxprune.evaluate import compare, evaluate, load_npz
    from onnxprune.ir import load_model_info
    from onnxprune.tables import eval_table, out, progress

    model = load_model_info(args.model)[0]
    x, y = load_npz(args.data, model)
    options = dict(epsilons=args.epsilons, pgd_steps=args.pgd_steps, pgd_epsilon=args.pgd_epsilon,
                   batch_size=args.batch_size)
    with progress() as update:
        def tick(done: int, total: int, label: str) -> None:
            update("evaluating", done, total)
        if args.compare:
            result = compare(model, load_model_info(args.compare)[0], x, y, progress=tick, **options)
            reports, agreement = {"original": result.original, "pruned": result.pruned}, (result.agreement,
                                                                                            result.cosine)
        else:
            result = evaluate(model, x, y, progress=tick, **options)
            reports, agreement = {"model": result}, None
    out.print(eval_table(f"eval: {len(y)} samples of {Path(args.data).name}", reports, agreement))
    if args.report:
        with Transaction() as tx:
            tx.temporary(args.report).write_text(json.dumps(result.to_dict(), indent=1))
            tx.commit()
    return 0


#: ``calib --norm``: (scale, mean, std) that take 8-bit pixels to what common models expect.
NORMS = {
    "unit": (1 / 255, "0", "1"),
    "pm1": (1 / 255, "0.5", "0.5"),
    "imagenet": (1 / 255, "0.485,0.456,0.406", "0.229,0.224,0.225"),
    "raw": (1.0, "0", "1"),
}


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (two integers), got '{text}'") from None
    if not (0 < height <= 2**15 and 0 < width <= 2**15):
        raise argparse.ArgumentTypeError(f"expected a height and width in 1..32768, got '{text}'")
    return height, width


def run_calib(argv: list[str]) -> int:
    p = _Parser(prog="onnxprune calib", description="Build a --calibration set (.npz) for MODEL from image files: "
                "decoded, resized to the model's input, normalised and laid out as it takes them. Files are "
                "shuffled (seeded) before the first --limit are taken, as --calibration holds out the last quarter.")
    p.add_argument("model")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files (PNG, JPEG, BMP... with Pillow; .npy arrays [H,W] or [H,W,C]) or folders of them")
    p.add_argument("-o", "--output", required=True, metavar="SET.npz", help="the calibration file to write")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                   help="the input's shape where the model leaves it open (only H and W are read; --size also does)")
    p.add_argument("--size", type=_size, metavar="H,W", help="height and width (default: the input's, when fixed)")
    p.add_argument("--fit", choices=["stretch", "pad"], default="stretch",
                   help="stretch to H,W (default), or scale to fit keeping the aspect ratio, top-left, padded "
                        "(text lines for OCR)")
    p.add_argument("--pad-value", type=float, default=0.0, metavar="V", help="pixel value of the padding (default 0)")
    p.add_argument("--norm", choices=list(NORMS), default="unit",
                   help="pixels/255 (unit, default), to [-1,1] (pm1), ImageNet mean/std (imagenet), 0..255 (raw)")
    p.add_argument("--scale", type=float, metavar="S", help="pixel multiplier, before --mean and --std (overrides --norm)")
    p.add_argument("--mean", metavar="M[,M,M]", help="subtracted after --scale, one value or one per channel")
    p.add_argument("--std", metavar="S[,S,S]", help="divided by after --mean, one value or one per channel")
    p.add_argument("--channels", choices=["rgb", "bgr", "gray"],
                   help="channel order (default: gray for a 1-channel input, else rgb; OpenCV-trained models: bgr)")
    p.add_argument("--layout", choices=["nchw", "nhwc", "nhw"], help="default: guessed from where the 1 or 3 channels are")
    p.add_argument("--limit", type=_positive, default=256, metavar="N",
                   help="at most N images (default 256: planning reads up to 128, the check holds out up to 64)")
    p.add_argument("--seed", type=_count, default=0, help="the shuffle's seed")
    p.add_argument("--no-shuffle", action="store_true", help="keep the files in the order given (folders sorted)")
    args = p.parse_args(argv)
    return _calib(args)


def _calib(args) -> int:
    import numpy as np

    from onnxprune.images import Preprocess, build, collect, depth, input_layout, per_channel
    from onnxprune.ir import input_specs, load_model_info, parse_input_shapes

    files = collect(args.images)
    model_path = Path(args.model)
    check_target(args.output, "--output", protect=[model_path, *files])
    model, external = load_model_info(model_path)
    check_target(args.output, "--output", protect=[model_path, *external, *files])
    specs = input_specs(model)
    if len(specs) != 1:
        raise UserError(f"the model has {len(specs)} inputs {[s.name for s in specs]}; onnxprune calib builds sets "
                        "for one image input (write the others' arrays with numpy.savez(path, **{name: samples}))")
    spec = specs[0]
    dims = spec.dims
    shapes = parse_input_shapes(args.input_shape) if args.input_shape else {}
    if shapes:
        if set(shapes) != {spec.name}:
            raise UserError(f"--input-shape names {sorted(shapes)}; the model's input is {spec.name!r}")
        dims = tuple(shapes[spec.name])
    at = input_layout(spec.name, dims, args.layout)
    height, width = args.size or (at.height, at.width)
    if not height or not width:
        raise UserError(f"the model input {spec.name!r} leaves its height or width open; give --size H,W")
    if args.size and ((at.height and at.height != height) or (at.width and at.width != width)):
        raise UserError(f"--size {height},{width} differs from the input {spec.name!r}'s fixed {at.height},{at.width}")
    channels = args.channels or ("gray" if at.depth == 1 else "rgb")
    if at.depth and at.depth != depth(channels):
        raise UserError(f"--channels {channels} gives {depth(channels)} channel(s); the input {spec.name!r} takes "
                        f"{at.depth}")
    scale, mean, std = NORMS[args.norm]
    scale = scale if args.scale is None else args.scale
    mean = per_channel(args.mean or mean, depth(channels), "--mean")
    std = per_channel(args.std or std, depth(channels), "--std")
    if not math.isfinite(scale) or any(s == 0 for s in std):
        raise UserError("--scale must be finite and --std nonzero")
    integer = spec.dtype.kind in "iub"
    if integer and (args.norm != "unit" or args.scale is not None or args.mean or args.std):
        raise UserError(f"the input {spec.name!r} takes {spec.dtype} values: its pixels go in as they are "
                        "(no --norm, --scale, --mean or --std)")
    if integer:
        scale, mean, std = 1.0, (0.0,), (1.0,)
    pre = Preprocess(height, width, channels, at.layout, scale, mean, std, args.fit, args.pad_value)

    from onnxprune.tables import calib_table, out, progress

    with progress() as update:
        built = build(files, pre, spec.dtype, args.limit, None if args.no_shuffle else args.seed,
                      progress=lambda done, total: update("reading images", done, total))
    from onnxprune.evidence.calibration import check_calibration
    from onnxprune.ir import runs_on

    arrays = check_calibration({spec.name: built.array}, specs, Path(args.output).name)
    problem = runs_on(model, {spec.name: built.array[:1]})
    if problem:
        raise UserError(f"the model does not run on the first sample ({built.used[0]}): {problem}")
    with Transaction() as tx:
        with open(tx.temporary(args.output), "wb") as f:
            np.savez(f, **arrays)
        tx.commit()
    out.print(calib_table(args.output, spec.name, built, pre, len(files), arrays.held_out_count))
    for _, why in built.skipped[:5]:
        _say(f"onnxprune calib: skipped {why}")
    if len(built.skipped) > 5:
        _say(f"onnxprune calib: skipped {len(built.skipped) - 5} more unreadable files")
    return 0


COMMANDS = {"inspect": run_inspect, "eval": run_eval, "calib": run_calib}
#: Options whose value may start with a minus sign that argparse would take for an option
#: (``--input-range -0.95,2.15``).
SIGNED_VALUES = ("--input-range", "--mean", "--pad-value")


def attach_signed_values(argv: list[str]) -> list[str]:
    """``--opt -1,2`` becomes ``--opt=-1,2`` for the options in SIGNED_VALUES."""
    out, k = [], 0
    while k < len(argv):
        if argv[k] in SIGNED_VALUES and k + 1 < len(argv) and argv[k + 1].startswith("-") and argv[k + 1][1:2] in "0123456789.":
            out.append(f"{argv[k]}={argv[k + 1]}")
            k += 2
            continue
        out.append(argv[k])
        k += 1
    return out


def _say(message: str, error: bool = False) -> None:
    """One line on stderr (red on a terminal when ``error``): no rich, so that it is fast."""
    if error and sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        message = f"\x1b[31m{message}\x1b[0m"
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        # inside the try: a signal that lands while the handlers are being installed (the
        # first is live before the second is) unwinds like any other
        handle_signals()
        argv = attach_signed_values(list(sys.argv[1:] if argv is None else argv))
        command = COMMANDS.get(argv[0]) if argv else None
        return command(argv[1:]) if command else run_prune(argv)
    except OnnxPruneError as exc:
        kind = "error" if isinstance(exc, UserError) else "internal error (a bug, please report it)"
        _say(f"onnxprune: {kind}: {_one_line(exc)}", error=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _interrupted(exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
    except Exception as exc:  # a bug: say so, keep the traceback for those who ask
        if interrupted_by() is not None:  # the signal's exception came back as another one
            return _interrupted(interrupted_by())
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        _say(f"onnxprune: internal error (a bug, please report it; ONNXPRUNE_DEBUG=1 shows the traceback): "
             f"{type(exc).__name__}: {_one_line(exc)}", error=True)
        return 1
    finally:
        release_signals()


def _interrupted(signum: int) -> int:
    remove_live_temporaries()
    _say("onnxprune: interrupted; nothing written", error=True)
    return 128 + int(signum)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
